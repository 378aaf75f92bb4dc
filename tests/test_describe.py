"""Servers that say what they are (#24, part 2), on real servers.

Two servers with separate state directories (two machines, as far as their state goes)
on a private node, each with the server permissions of docs/security.md (their request
queue, and the names of their control path); ``fibrpc status`` run from a third directory
with the client's least-privilege user (write on ``amq.default`` only) shows both, each
once. And the JSON Schema of docs/schema/ checks the code's messages, failing when one
changes shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
from conftest import delete_queue, run_cli, start_private_node
from privatenode import PrivateNode
from test_coalesce_form import EXAMPLE_REPLY, EXAMPLE_REQUEST

from fibrpc import Client, coalesce, control, describe, protocol
from fibrpc.aio import AsyncClient
from fibrpc.config import Limits
from fibrpc.errors import ErrorCode, RequestError

SCHEMA = Path(__file__).parent.parent / "docs" / "schema"
#: Nothing answers HTTP here: status reports the management API missing at once.
NO_MANAGEMENT = "http://127.0.0.1:9"


def client_permissions(queue: str) -> tuple[str, str, str]:
    """docs/security.md's client permissions (configure, write, read): write on the
    default exchange, and on the queue for its passive declare (RabbitMQ 4.2.6 and later
    refuse it without some permission on the queue)."""
    return "^$", f"^(amq\\.default|{re.escape(queue)})$", "^$"


def server_permissions(queue: str) -> tuple[str, str, str]:
    """docs/security.md's server permissions: the queue and its control path's names."""
    own = f"^{re.escape(queue)}(\\..+)?$"
    return own, f"^(amq\\.default|{re.escape(queue)}\\..+)$", own


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with contextlib.ExitStack() as stack:
        yield start_private_node(stack, prefix="fibrpc-describe")


@pytest.fixture
def broker_url(node: PrivateNode) -> str:
    return node.url()


@pytest.fixture(scope="module")
def users(node: PrivateNode) -> dict[str, Any]:
    queue = f"fibrpc-test-describe-{secrets.token_hex(4)}"
    made = {"queue": queue}
    for role, permissions in (
        ("server", server_permissions(queue)),
        ("client", client_permissions(queue)),
    ):
        name, password = f"fibrpc-describe-{role}", secrets.token_hex(12)
        node.checked("add_user", name, password)
        node.checked("set_permissions", "-p", "/", name, *permissions)
        made[role] = node.url(name, password)
    return made


@pytest.fixture
def queue(users: dict[str, Any], broker_url: str) -> Iterator[str]:
    delete_queue(broker_url, users["queue"])
    yield users["queue"]
    delete_queue(broker_url, users["queue"])


@pytest.fixture
def two_servers(serve: Any, users: dict[str, Any], queue: str, tmp_path: Path) -> list[Any]:
    """Two servers on ``queue``, each with a state directory of its own."""
    return [
        serve(
            "--url",
            users["server"],
            workers=workers,
            env={"FIBRPC_STATE_DIR": str(tmp_path / f"machine-{i}")},
        )
        for i, workers in ((1, 1), (2, 2))
    ]


def test_status_from_a_third_directory_with_the_clients_permissions_shows_both_servers(
    two_servers, users, queue, tmp_path
):
    with Client(users["client"], queue=queue, timeout=30) as client:
        assert client.call(30) == 832040
    third = tmp_path / "machine-3"
    result = run_cli(
        "status", "--url", users["client"], "--queue", queue, "--state-dir", str(third),
        "--management-url", NO_MANAGEMENT, "--json", "--describe-wait", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["servers"] == []  # nothing on this "machine"
    shown = report["described"]
    assert sorted(s["pid"] for s in shown) == sorted(s.pid for s in two_servers)
    assert len({s["id"] for s in shown}) == 2  # each server once, not once per worker
    assert sorted(len(s["workers"]) for s in shown) == [1, 2]
    assert all(s["stuck"] == [] for s in shown)
    text = run_cli(
        "status", "--url", users["client"], "--queue", queue, "--state-dir", str(third),
        "--management-url", NO_MANAGEMENT, "--describe-wait", "2",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    for server in two_servers:
        assert re.search(rf"^server \w+ on \S+ \(pid {server.pid}, fibrpc ", text.stdout, re.M)
    assert "STUCK" not in text.stdout


def test_client_describe_returns_each_server_typed_with_its_counts(two_servers, users, queue):
    with Client(users["client"], queue=queue, timeout=30) as client:
        client.map(range(50), batch_size=1)
        with pytest.raises(RequestError):
            client.call(94, algo="iter")
        # a worker reports its counts once a second at most: they may lag that much
        deadline = time.monotonic() + 30
        while True:
            found = client.describe(2.0)
            served = sum(d.counts["fast"].served for d in found if "fast" in d.counts)
            if served == 50 or time.monotonic() > deadline:
                break
    assert served == 50
    assert sorted(d.pid for d in found) == sorted(s.pid for s in two_servers)
    for description in found:
        assert isinstance(description, describe.Description)
        assert description.queue == queue
        limits = Limits()
        assert description.algorithms == {
            "naive": limits.naive_max_n, "iter": 93, "fast": limits.fast_max_n
        }  # fmt: skip
        assert description.max_batch == Limits().max_batch
        assert control.CANCEL in description.control_types
        # every form a server of this version reads, the coalesced calls' included
        assert set(description.request_types) == {
            "text/plain",
            protocol.JSON,
            protocol.U64,
            protocol.CALLS,
        }
        assert protocol.CALLS in description.reply_types
        assert description.uptime >= 0
    refused = [d.counts["unknown"].refused for d in found if "unknown" in d.counts]
    assert refused == [{ErrorCode.OUT_OF_RANGE: 1}]


def test_the_asyncio_client_describes_the_servers_too(two_servers, users, queue):
    async def look() -> list[describe.Description]:
        async with AsyncClient(users["client"], queue=queue, timeout=30) as client:
            return await client.describe(2.0)

    assert sorted(d.pid for d in asyncio.run(look())) == sorted(s.pid for s in two_servers)


# -- the schema -------------------------------------------------------------------------


def _registry() -> referencing.Registry[Any]:
    """Every schema of docs/schema/ under its ``$id``, for the ``$ref`` between them."""
    resources = []
    for path in sorted(SCHEMA.glob("*.json")):
        document = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(document)
        resources.append((document["$id"], referencing.Resource.from_contents(document)))
    return referencing.Registry().with_resources(resources)


def schema(name: str) -> jsonschema.Draft202012Validator:
    document = json.loads((SCHEMA / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(document, registry=_registry())


def raw_descriptions(client: Client, wait: float = 2.0) -> list[bytes]:
    """The bodies servers answer a describe with, as they came."""
    answers: list[bytes] = []
    corr_id = "schema.describe"
    client._driver.control(
        control.DESCRIBE, control.encode_describe(), corr_id, 2000,
        lambda content_type, body: answers.append(body),
    )  # fmt: skip
    time.sleep(wait)
    client._driver.unlisten(corr_id)
    return answers


def test_the_servers_descriptions_match_the_schema(two_servers, users, queue):
    with Client(users["client"], queue=queue, timeout=30) as client:
        client.call(25, algo="naive")
        bodies = raw_descriptions(client)
    assert len(bodies) == 2
    validator = schema("description")
    for body in bodies:
        validator.validate(json.loads(body))


def test_the_code_s_requests_replies_and_control_messages_match_the_schema():
    request, reply = schema("request"), schema("reply")
    for n, algo in ((30, "fast"), ([1, 2, 3], "iter"), (5, "naive")):
        body, content_type, _ = protocol.encode_request(n, algo, binary=False)
        if content_type == protocol.JSON:
            request.validate(json.loads(body))
    reply.validate(json.loads(protocol.encode_result("832040", protocol.JSON)))
    reply.validate(json.loads(protocol.encode_results(["0", "1"])))
    for code in ErrorCode:
        reply.validate(json.loads(protocol.encode_error(RequestError(code, "Why."))))
    schema("cancel").validate(json.loads(control.encode_cancel(["a.1", "a.2"])))
    schema("describe").validate(json.loads(control.encode_describe()))


def test_coalesced_calls_and_their_replies_match_the_schema():
    calls, answers = schema("calls"), schema("calls-reply")
    calls.validate(json.loads(EXAMPLE_REQUEST))
    answers.validate(json.loads(EXAMPLE_REPLY))
    sent = [
        coalesce.Outgoing("a.1", 30, "fast"),
        coalesce.Outgoing("a.2", 0, "naive", deadline_ms=1, ttl_ms=2),
    ]
    calls.validate(json.loads(coalesce.encode_calls(sent)))
    answered = [coalesce.Answer("a.1", "832040")]
    answered += [coalesce.Answer("a.2", error=RequestError(code, "Why.")) for code in ErrorCode]
    answers.validate(json.loads(coalesce.encode_answers(answered)))


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("calls", [{"id": "a.1", "n": "30"}]),  # n as text
        ("calls", [{"n": 30}]),  # no id
        ("calls", [{"id": "a.1", "n": 30, "window": 8}]),  # a key added
        ("calls", {"id": "a.1", "n": 30}),  # not an array
        ("calls-reply", [{"id": "a.1", "result": 832040}]),  # a number, not decimal text
        ("calls-reply", [{"id": "a.1", "error": {"code": "late", "message": "x"}}]),
        ("calls-reply", [{"result": "832040"}]),  # no id
    ],
    ids=[
        "n-text",
        "no-id",
        "key-added",
        "not-array",
        "result-number",
        "code-unknown",
        "no-id-reply",
    ],
)
def test_the_schema_fails_coalesced_calls_that_changed_shape(name, body):
    with pytest.raises(jsonschema.ValidationError):
        schema(name).validate(body)


def a_description() -> dict[str, Any]:
    tally = describe.Tally()
    tally.answered("fast", None, 0.01)
    tally.answered("iter", "out_of_range", 0.0)
    tally.count("naive", "abandoned")
    return describe.build(
        server={"id": "s", "pid": 1, "queue": "q", "started": 0.0,
                "workers": [{"index": 0, "pid": 2, "ready": True, "started": 0.0}]},
        reports={2: {"algos": tally.as_dict(), "alive": 9.0, "busy_since": 8.0,
                     "busy_until": 99.0}},
        limits=Limits(), broker_max_message=None, version="v", host="h", answered_by=2, now=10.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["server"].pop("version"),  # a field gone
        lambda d: d["server"].update(build="x"),  # a field added
        lambda d: d["counts"]["fast"].update(served="1"),  # a type changed
        lambda d: d["workers"][0].pop("late"),
        lambda d: d.update(extra=True),
    ],
    ids=["field-gone", "field-added", "type-changed", "worker-field-gone", "top-level-added"],
)
def test_the_schema_fails_a_description_that_changed_shape(change):
    validator = schema("description")
    description = a_description()
    validator.validate(description)
    change(description)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(description)


def test_the_schema_fails_a_cancel_or_a_reply_that_changed_shape():
    with pytest.raises(jsonschema.ValidationError):
        schema("cancel").validate({"cancel": ["a"], "reason": "timeout"})
    with pytest.raises(jsonschema.ValidationError):
        schema("reply").validate({"result": 832040})  # a number, not decimal text
