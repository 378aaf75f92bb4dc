"""Fixtures shared by the integration tests: the real broker, and real servers.

Integration tests talk to a real RabbitMQ and fail, never skip, when it does not answer.
Which one is the broker under test (``FIBRPC_TEST_BROKER``), by the Debian suite whose
RabbitMQ it is:

* ``local`` (the default): ``$FIBRPC_TEST_URL``, by default the local broker as guest
  (Debian 12's RabbitMQ 3.10 on this machine);
* ``trixie``: a private node of Debian 13's RabbitMQ 4.0, started for the session;
* ``sid``: a private node of Debian unstable's RabbitMQ, today's (4.3.6 in December
  2026; sid moves). ``rabbitmq4`` is the old name of ``trixie``.

A private session node (``tests/privatenode.py``) denies every deprecated feature its
line knows. The version that actually ran, read from the broker itself, heads the report
and closes the session's output (``BROKER_VERSION``): when sid moves to a new release,
that line says so.

No test stops, restarts or reconfigures the local broker, or changes its users: tests
that need to do that get a private node (``private_broker``) of the same RabbitMQ version
as the broker under test. A connection to the local broker is held open for the whole
session, and the session fails if it was dropped.

Every server a test starts is a real ``fibrpc serve`` subprocess in its own process group,
stopped (and if need be killed, with its workers) when the test ends; every queue a test
uses is its own, and is deleted afterwards. A module can move all of that to another
broker by overriding the ``broker_url`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pika
import pytest
from privatenode import PrivateNode, deny_deprecated, private_node, root_package

from fibrpc.pytest_plugin import FibrpcServer, delete_queue, private_queue
from fibrpc.pytest_plugin import start_server as _start_server
from fibrpc.urls import redact

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: The broker lines ``FIBRPC_TEST_BROKER`` names, and the suite of their private nodes
#: (None: the machine's own RabbitMQ).
BROKERS: dict[str, str | None] = {"local": None, "trixie": "trixie", "sid": "sid"}
_OLD_NAMES = {"rabbitmq4": "trixie"}
_asked = os.environ.get("FIBRPC_TEST_BROKER", "local")
BROKER = _OLD_NAMES.get(_asked, _asked)
#: The broker under test (a private node's URL for trixie and sid, once the session starts).
URL = os.environ.get("FIBRPC_TEST_URL", LOCAL_URL)
#: The RabbitMQ of private nodes, and their configuration: as the broker under test's.
NODE_VERSION = BROKERS.get(BROKER)
NODE_CONFIG = deny_deprecated(NODE_VERSION)
#: The broker under test's RabbitMQ version as it reports it (e.g. "4.3.6"), once the
#: session starts; "" if it did not answer.
BROKER_VERSION = ""

_session = contextlib.ExitStack()
#: The session's private node, for trixie and sid.
SESSION_NODE: PrivateNode | None = None


def rabbitmq_version(version: str | None = None) -> tuple[int, ...]:
    """A RabbitMQ ``version`` (by default the broker under test's, ``BROKER_VERSION``) as
    numbers, for tests whose broker's behaviour changed at a release: (4, 3, 6). A test
    failure if it is not one."""
    text = BROKER_VERSION if version is None else version
    numbers = re.match(r"\d+(?:\.\d+)*", text)
    if numbers is None:
        pytest.fail(f"{text!r} is not a RabbitMQ version.")
    return tuple(int(part) for part in numbers[0].split("."))


def server_version(url: str, timeout: float = 15.0) -> str:
    """The version RabbitMQ at ``url`` announces when a connection opens (its
    ``server_properties``); "" if it does not answer within ``timeout`` seconds."""
    found: dict[str, object] = {}

    def opened(conn: pika.SelectConnection) -> None:
        found.update(conn.server_properties)
        conn.close()

    conn = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=opened,
        on_open_error_callback=lambda conn, exc: conn.ioloop.stop(),
        on_close_callback=lambda conn, reason: conn.ioloop.stop(),
    )
    conn.ioloop.call_later(timeout, conn.ioloop.stop)
    conn.ioloop.start()
    with contextlib.suppress(Exception):
        conn.ioloop.close()
    version = found.get("version", b"")
    return version.decode() if isinstance(version, bytes) else str(version)


def start_private_node(
    stack: contextlib.ExitStack, config: str = "", *, prefix: str = "fibrpc-test"
) -> PrivateNode:
    """A private node of the broker under test's version, with ``config`` added to its
    configuration, stopped and removed when ``stack`` closes."""
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    return stack.enter_context(
        private_node(root / "node", NODE_CONFIG + config, prefix=prefix, version=NODE_VERSION)
    )


def pytest_configure(config: pytest.Config) -> None:
    global URL, SESSION_NODE, BROKER_VERSION  # the test modules read them at import
    if BROKER not in BROKERS:
        raise pytest.UsageError(
            f"FIBRPC_TEST_BROKER must be one of {', '.join(BROKERS)}, not {_asked!r}"
        )
    if NODE_VERSION is not None:
        try:
            SESSION_NODE = start_private_node(_session, prefix="fibrpc-session")
            URL = SESSION_NODE.url()
        except BaseException as exc:  # pytest.fail's exception is no Exception
            _session.close()
            raise pytest.UsageError(f"The {BROKER} RabbitMQ node did not start: {exc}") from exc
    BROKER_VERSION = server_version(URL)


#: Fixtures that reach a broker. A test that uses one (itself or through another fixture)
#: is marked ``broker``; a test that reaches a broker otherwise carries the mark itself
#: (``pytestmark = pytest.mark.broker``, or ``@pytest.mark.broker``). ``scripts/dev.sh
#: unit`` runs the others: ``pytest -m "not broker"``.
BROKER_FIXTURES = frozenset(
    {
        "broker_url",
        "fibrpc_broker_url",
        "private_broker",
        "broker",
        "queue",
        "serve",
        "fibrpc_server",
        "fibrpc_serve",
        "fibrpc_client",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def pytest_unconfigure(config: pytest.Config) -> None:
    _session.close()


def _describe_broker() -> str:
    """Which RabbitMQ ran: its version, the package it came from, and where."""
    version = f"RabbitMQ {BROKER_VERSION}" if BROKER_VERSION else "RabbitMQ (no answer)"
    if SESSION_NODE is None:
        return f"{BROKER}: {version} at {redact(URL)}"
    package = root_package(SESSION_NODE.root_fs) if SESSION_NODE.root_fs else ""
    source = f"Debian {BROKER}'s rabbitmq-server {package}" if package else f"Debian {BROKER}"
    return (
        f"{BROKER}: {version} ({source}, a private node denying every deprecated feature) "
        f"at {redact(URL)}"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"broker under test: {_describe_broker()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(f"broker under test: {_describe_broker()}")


@pytest.fixture(scope="session", autouse=True)
def _local_broker_left_alone() -> Iterator[None]:
    """A connection to the local broker, open from the first test to the last: the
    session fails if anything dropped it (a test restarting that broker, say)."""
    try:
        conn = pika.BlockingConnection(pika.URLParameters(LOCAL_URL + "?heartbeat=0"))
    except pika.exceptions.AMQPError:
        # No local broker: the unit tests run all the same, and every integration test
        # that needs one fails by itself, saying how to start it.
        yield
        return
    channel = conn.channel()
    witness = channel.queue_declare("", exclusive=True).method.queue
    yield
    try:
        conn.process_data_events(0)
        channel.queue_declare(witness, passive=True)
    except pika.exceptions.AMQPError as exc:
        pytest.fail(
            f"The connection held open to the local broker was dropped during the tests "
            f"({exc!r}): some test disturbed that broker.",
            pytrace=False,
        )
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def paced(ns: Iterable[int], every: int = 20, pause: float = 0.01) -> Iterator[int]:
    """``ns``, with a pause every ``every`` values (about 2,000 a second by default): a
    run of calls that lasts past a fault injected in its middle."""
    for i, n in enumerate(ns):
        if i % every == 0:
            time.sleep(pause)
        yield n


def connect(url: str) -> pika.BlockingConnection:
    """A connection to ``url``, or a test failure saying how to start the broker."""
    try:
        return pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError as exc:
        pytest.fail(
            f"No RabbitMQ at {url} ({exc!r}); start it with scripts/ensure-broker.sh",
            pytrace=False,
        )


def broker_connection() -> pika.BlockingConnection:
    """A connection to the broker under test."""
    return connect(URL)


@pytest.fixture
def broker_url() -> str:
    """The URL the fixtures below use: the broker under test, unless a module overrides
    this fixture (with a private node's, say)."""
    return URL


@pytest.fixture(scope="session")
def fibrpc_broker_url() -> str:
    """The broker of fibrpc's own pytest fixtures (``fibrpc.pytest_plugin``): the broker
    under test."""
    return URL


@pytest.fixture
def private_broker() -> Iterator[PrivateNode]:
    """A private node of the broker under test's version, for a test that restarts or
    reconfigures its broker; stopped and removed afterwards."""
    with contextlib.ExitStack() as stack:
        yield start_private_node(stack)


@pytest.fixture
def broker(broker_url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the broker (closed afterwards)."""
    conn = connect(broker_url)
    try:
        yield conn.channel()
    finally:
        with contextlib.suppress(Exception):
            conn.close()


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    """A request queue name of this test's own, deleted when the test ends."""
    name = private_queue()
    yield name
    delete_queue(broker_url, name)


#: A running ``fibrpc serve`` subprocess and its log: the plugin's, shared with applications.
Server = FibrpcServer


def start_server(
    queue: str,
    tmp_path: Path,
    *args: str,
    workers: int = 2,
    env: dict[str, str] | None = None,
    wait: bool = True,
    url: str | None = None,
) -> FibrpcServer:
    """Start ``fibrpc serve`` on ``queue`` at ``url`` (the broker under test by default)
    and (by default) wait until it is ready."""
    # A --url among ``args`` is the broker: --url may be given several times (a cluster).
    where = () if "--url" in args else (url or URL)
    return _start_server(where, queue, *args, log_dir=tmp_path, workers=workers, env=env, wait=wait)


@pytest.fixture
def serve(queue: str, tmp_path: Path, broker_url: str) -> Iterator[Callable[..., Server]]:
    """Start servers on this test's queue at ``broker_url``; all are stopped when the
    test ends."""
    servers: list[Server] = []

    def start(*args: str, **kwargs: object) -> Server:
        kwargs.setdefault("url", broker_url)
        server = start_server(queue, tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def run_cli(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``fibrpc`` command (as ``python -m fibrpc``) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "fibrpc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )
