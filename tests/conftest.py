"""Fixtures shared by the integration tests: the real broker, and real servers.

Integration tests talk to a real RabbitMQ and fail, never skip, when it does not answer.
Which one is the broker under test:

* ``FIBRPC_TEST_BROKER=rabbitmq4``: a private RabbitMQ 4 node started for the session
  (``tests/privatenode.py``, every deprecated feature denied, as RabbitMQ 4.3 ships);
* otherwise (``local``): ``$FIBRPC_TEST_URL``, by default the local broker as guest.

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
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pika
import pytest
from privatenode import DENY_DEPRECATED, PrivateNode, private_node

from fibrpc.pytest_plugin import FibrpcServer, delete_queue, private_queue
from fibrpc.pytest_plugin import start_server as _start_server

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BROKER = os.environ.get("FIBRPC_TEST_BROKER", "local")
#: The broker under test (set for ``rabbitmq4`` when the session starts).
URL = os.environ.get("FIBRPC_TEST_URL", LOCAL_URL)
#: The RabbitMQ of private nodes, and their configuration: as the broker under test's.
NODE_VERSION = "4" if BROKER == "rabbitmq4" else None
NODE_CONFIG = DENY_DEPRECATED if BROKER == "rabbitmq4" else ""

_session = contextlib.ExitStack()
#: The session's RabbitMQ 4 node, for ``rabbitmq4``.
SESSION_NODE: PrivateNode | None = None


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
    global URL, SESSION_NODE  # the test modules read them at import, after this
    if BROKER not in ("local", "rabbitmq4"):
        raise pytest.UsageError(f"FIBRPC_TEST_BROKER must be local or rabbitmq4, not {BROKER!r}")
    if BROKER == "rabbitmq4":
        try:
            SESSION_NODE = start_private_node(_session, prefix="fibrpc-session")
            URL = SESSION_NODE.url()
        except BaseException as exc:  # pytest.fail's exception is no Exception
            _session.close()
            raise pytest.UsageError(f"The RabbitMQ 4 node did not start: {exc}") from exc


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


def pytest_report_header(config: pytest.Config) -> str:
    return f"broker under test: {BROKER} at {URL}"


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
