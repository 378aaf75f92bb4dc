"""compose.yaml and the Dockerfile, checked without Docker.

Neither file can be run here, so this reads them: every command they give fibrpc must
parse with fibrpc's own click commands (option values and FIBRPC_* environment values
included, as click would read them at start-up), every FIBRPC_* variable must belong to an
option, and what makes ``--scale`` and a graceful ``docker compose down`` work must be
there. No broker, no processes: nothing here runs ``serve``.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from fibrpc import amqp
from fibrpc.cli import main
from fibrpc.urls import redact

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()

#: fibrpc/supervisor.py, ``Supervisor._stop``: after SIGTERM, the supervisor gives its
#: workers the drain timeout and this many seconds more before it kills them.
SUPERVISOR_MARGIN = 5.0


# -- reading the files -----------------------------------------------------------------------


def dockerfile_exec_form(instruction: str) -> list[str]:
    """The argument list of the Dockerfile's last ``instruction`` (the one Docker uses),
    which must be in exec form (a JSON array): in shell form, ``sh -c`` would be PID 1
    and the stop signal would never reach fibrpc."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [ln.strip() for ln in text.splitlines()]
    found = [ln.split(None, 1)[1] for ln in lines if ln.upper().startswith(instruction + " ")]
    assert found, f"the Dockerfile has no {instruction}"
    try:
        value = json.loads(found[-1])
    except json.JSONDecodeError:
        pytest.fail(f"{instruction} {found[-1]} is not in exec form (a JSON array)")
    assert isinstance(value, list), f"{instruction} {found[-1]} is not a JSON array"
    assert all(isinstance(arg, str) for arg in value)
    return value


def fibrpc_services() -> Iterator[tuple[str, dict[str, Any]]]:
    """The services that run this repository's image (those compose builds)."""
    for name, service in SERVICES.items():
        if "build" in service:
            yield name, service


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as compose passes it, whether written as a map or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def argv(service: Mapping[str, Any]) -> list[str]:
    """What a service runs: its entrypoint and command, or else the image's."""
    entrypoint = service.get("entrypoint", dockerfile_exec_form("ENTRYPOINT"))
    command = service.get("command", dockerfile_exec_form("CMD"))
    for value in (entrypoint, command):
        # In string form compose splits words itself; lists say exactly what runs.
        assert isinstance(value, list), f"{value!r} is not in list form"
    return [*entrypoint, *command]


def parse_fibrpc(
    args: list[str], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> click.Context:
    """The context click builds for ``fibrpc ARGS`` in environment ``env``, without
    invoking the command: click converts and checks every value, from the command line
    or from a FIBRPC_* variable, and the test fails naming the first bad one."""
    for name in [n for n in os.environ if n.startswith("FIBRPC_")]:
        monkeypatch.delenv(name)  # only compose's settings, not the ones the tests run under
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        group_ctx = main.make_context("fibrpc", list(args))
        name, command, rest = main.resolve_command(group_ctx, list(args))
        assert command is not None and name is not None
        return command.make_context(name, rest, parent=group_ctx)
    except click.UsageError as exc:
        settings = " ".join(
            f"{k}={redact(v) if k == 'FIBRPC_URL' else v}"
            for k, v in env.items()
            if k.startswith("FIBRPC_")
        )
        pytest.fail(f"`{settings} fibrpc {' '.join(args)}`: {exc.format_message()}")


def option_envvars(command: click.Command) -> set[str]:
    """The environment variables of ``command``'s options."""
    names: set[str] = set()
    for param in command.params:
        if isinstance(param.envvar, str):
            names.add(param.envvar)
        elif param.envvar:
            names.update(param.envvar)
    return names


def all_envvars() -> set[str]:
    """The environment variables of every option of every fibrpc command."""
    return set().union(*(option_envvars(c) for c in main.commands.values()))


def seconds(duration: str) -> float:
    """A compose duration ("45s", "1m30s", "1.5s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"{duration!r} is not a compose duration such as '45s' or '1m30s'.")
    return sum(float(n) * units[u] for n, u in parts)


def fixed_host_port(port: str | int | Mapping[str, Any]) -> bool:
    """Whether a ``ports:`` entry names its host port ("8000:8000", "127.0.0.1:8000:8000",
    ``published: 8000``) rather than letting Docker pick one ("8000", "127.0.0.1::8000")."""
    if isinstance(port, Mapping):
        return bool(port.get("published"))
    parts = str(port).split(":")
    return len(parts) >= 2 and parts[-2] != ""


def broker_service(url: str) -> dict[str, Any]:
    """The compose service a broker URL points at, by its service name."""
    host = urllib.parse.urlsplit(url).hostname
    assert host in SERVICES, f"{redact(url)} does not point at a compose service"
    return SERVICES[host]


SERVERS = list(fibrpc_services())
SERVER_IDS = [name for name, _ in SERVERS]


# -- the tests ----------------------------------------------------------------------------


def test_compose_builds_at_least_one_fibrpc_service_from_the_dockerfile():
    assert SERVERS, "no service in compose.yaml has `build:`"
    for name, service in SERVERS:
        build = service["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").is_file(), f"{name} builds no Dockerfile"


def test_the_image_runs_fibrpc_and_its_default_command_is_a_valid_invocation(monkeypatch):
    assert dockerfile_exec_form("ENTRYPOINT") == ["fibrpc"]
    ctx = parse_fibrpc(dockerfile_exec_form("CMD"), {}, monkeypatch)
    assert ctx.command.name == "serve"


def test_the_image_runs_as_a_user_other_than_root():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert users, "the Dockerfile never sets USER, so the server runs as root"
    assert users[-1] not in {"root", "0", "0:0"}


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_every_fibrpc_service_runs_a_valid_fibrpc_invocation(name, service, monkeypatch):
    program, *args = argv(service)
    assert program == "fibrpc", f"{name} runs {program!r}, not fibrpc"
    ctx = parse_fibrpc(args, environment(service), monkeypatch)
    assert ctx.command.name == "serve", f"{name} does not serve"
    workers = ctx.params["workers"]  # a string click leaves to `serve` itself to check
    assert workers == "auto" or (workers.isdigit() and int(workers) >= 1), workers
    for url in ctx.params["urls"]:
        amqp.parameters(url)  # ConfigError on a URL pika cannot read


def test_every_fibrpc_variable_in_compose_is_the_environment_variable_of_an_option():
    known = all_envvars()
    assert "FIBRPC_URL" in known  # the walk over the commands found their options
    used = set(re.findall(r"\bFIBRPC_[A-Z0-9_]+", (ROOT / "compose.yaml").read_text()))
    assert used, "compose.yaml configures fibrpc through no FIBRPC_* variable"
    assert used <= known, f"not the variable of any option: {sorted(used - known)}"


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_each_server_is_configured_only_with_variables_its_command_reads(
    name, service, monkeypatch
):
    ctx = parse_fibrpc(argv(service)[1:], environment(service), monkeypatch)
    reads = option_envvars(ctx.command)
    given = {key for key in environment(service) if key.startswith("FIBRPC_")}
    assert given <= reads, f"{name}: `{ctx.command.name}` ignores {sorted(given - reads)}"


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_servers_start_only_once_every_service_they_depend_on_is_healthy(name, service):
    depends_on = service.get("depends_on")
    assert isinstance(depends_on, dict) and depends_on, f"{name} waits for nothing"
    for dependency, how in depends_on.items():
        assert how.get("condition") == "service_healthy", f"{name} -> {dependency}"
        healthcheck = SERVICES[dependency].get("healthcheck")
        assert healthcheck and healthcheck.get("test"), f"{dependency} has no health check"
        assert not healthcheck.get("disable", False)


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_the_broker_health_check_runs_rabbitmq_diagnostics_with_its_timings(
    name, service, monkeypatch
):
    urls = parse_fibrpc(argv(service)[1:], environment(service), monkeypatch).params["urls"]
    for url in urls:
        healthcheck = broker_service(url)["healthcheck"]
        assert healthcheck["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
        for key in ("interval", "timeout", "start_period"):
            assert seconds(healthcheck[key]) > 0, key
        assert healthcheck["retries"] >= 1


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_the_broker_is_a_supported_rabbitmq_4(name, service, monkeypatch):
    urls = parse_fibrpc(argv(service)[1:], environment(service), monkeypatch).params["urls"]
    for url in urls:
        image = broker_service(url)["image"]
        repository, _, tag = image.partition(":")
        assert repository == "rabbitmq", image
        major, minor = (int(part) for part in tag.split("-")[0].split(".")[:2])
        assert (major, minor) >= (4, 0), f"{image}: RabbitMQ before 4.0 is out of support"


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_servers_connect_as_the_user_the_broker_service_creates(name, service, monkeypatch):
    urls = parse_fibrpc(argv(service)[1:], environment(service), monkeypatch).params["urls"]
    for url in urls:
        broker = environment(broker_service(url))
        parts = urllib.parse.urlsplit(url)
        assert parts.username == broker.get("RABBITMQ_DEFAULT_USER"), (
            f"{name} connects as {parts.username!r}; the broker creates only "
            f"{broker.get('RABBITMQ_DEFAULT_USER')!r} (and guest may not log in remotely)"
        )
        assert parts.password == broker.get("RABBITMQ_DEFAULT_PASS")


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_servers_are_stopped_by_sigterm_which_drains_them(name, service):
    assert service.get("stop_signal") == "SIGTERM"


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_the_stop_grace_period_outlasts_the_drain_so_docker_never_kills_a_draining_server(
    name, service, monkeypatch
):
    drain = parse_fibrpc(argv(service)[1:], environment(service), monkeypatch).params[
        "drain_timeout"
    ]
    grace = seconds(str(service.get("stop_grace_period", "10s")))  # compose's default
    assert grace > drain + SUPERVISOR_MARGIN, (
        f"{name}: stop_grace_period {grace:g} s does not exceed the drain timeout "
        f"{drain:g} s plus the supervisor's {SUPERVISOR_MARGIN:g} s"
    )


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_servers_can_be_scaled_they_have_no_container_name_and_no_fixed_host_port(name, service):
    assert "container_name" not in service, f"{name} has a container_name"
    for port in service.get("ports", []):
        assert not fixed_host_port(port), (
            f"{name} publishes {port!r} on a fixed host port: a second copy could not start"
        )


@pytest.mark.parametrize(("name", "service"), SERVERS, ids=SERVER_IDS)
def test_servers_restart_unless_stopped_on_purpose(name, service):
    assert service.get("restart") == "unless-stopped"


@pytest.mark.parametrize(
    ("duration", "expected"), [("45s", 45.0), ("1m30s", 90.0), ("1.5s", 1.5), ("500ms", 0.5)]
)
def test_compose_durations_are_read_as_compose_reads_them(duration, expected):
    assert seconds(duration) == pytest.approx(expected)


@pytest.mark.parametrize("duration", ["45", "45 s", "1m30", "", "s"])
def test_anything_but_a_compose_duration_is_refused(duration):
    with pytest.raises(ValueError, match="is not a compose duration"):
        seconds(duration)


@pytest.mark.parametrize(
    ("port", "fixed"),
    [
        ("8000", False),
        ("127.0.0.1::8000", False),
        ({"target": 8000}, False),
        ("8000:8000", True),
        ("127.0.0.1:8000:8000", True),
        ({"target": 8000, "published": 8000}, True),
    ],
)
def test_a_port_is_fixed_when_it_names_its_host_port(port, fixed):
    assert fixed_host_port(port) is fixed


# -- the cluster profile ------------------------------------------------------------------

CLUSTER_SERVERS = [(n, s) for n, s in SERVERS if "cluster" in s.get("profiles", [])]
CLUSTER_NODES = {
    n: s for n, s in SERVICES.items() if "image" in s and "cluster" in s.get("profiles", [])
}


def test_the_cluster_profile_runs_three_nodes_of_one_cluster():
    assert len(CLUSTER_NODES) == 3, sorted(CLUSTER_NODES)
    configs = {json.dumps(s.get("configs"), sort_keys=True) for s in CLUSTER_NODES.values()}
    assert len(configs) == 1, "every node mounts the same cookie and cluster configuration"
    cluster_conf = COMPOSE["configs"]["rabbitmq-cluster-conf"]["content"]
    for name, node in CLUSTER_NODES.items():
        assert node["hostname"] == name  # the node names the peer discovery lists
        assert f"rabbit@{name}" in cluster_conf


def test_the_cluster_servers_use_every_node_a_quorum_queue_and_start_on_different_nodes(
    monkeypatch,
):
    assert len(CLUSTER_SERVERS) >= 2
    firsts = set()
    for name, service in CLUSTER_SERVERS:
        ctx = parse_fibrpc(argv(service)[1:], environment(service), monkeypatch)
        hosts = [urllib.parse.urlsplit(url).hostname for url in ctx.params["urls"]]
        assert sorted(hosts) == sorted(CLUSTER_NODES), f"{name} does not list every node"
        assert ctx.params["queue_type"] == "quorum", name
        firsts.add(hosts[0])
    assert len(firsts) == len(CLUSTER_SERVERS), "the servers start on the same node"
