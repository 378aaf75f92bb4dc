"""pytest fixtures for applications that call fibrpc: a real server, or none at all.

Loaded into every pytest session of a project that installs fibrpc (the ``pytest11``
entry point ``fibrpc``), so importing it is cheap and changes nothing: no pika, no numba,
no fibrpc client until a fixture is used. ``-p no:fibrpc`` leaves it out.

Fixtures (docs/testing.md has examples):

``fibrpc_broker_url`` (session)
    The RabbitMQ the tests name: ``--fibrpc-url``, else the ``fibrpc_url`` ini option,
    else ``$FIBRPC_URL``, else ``amqp://guest:guest@127.0.0.1:5672/%2F``. A project may
    override the fixture.
``fibrpc_server`` (session)
    A real ``fibrpc serve --workers 1`` on a private queue (``fibrpc-test-<hex>``) of that
    broker, ready: a ``FibrpcServer`` (``.url``, ``.queue``, ``.client(**kwargs)``).
    Stopped (SIGTERM, then SIGKILL to its whole process group) and its queue deleted when
    the session ends, whatever happened (failed tests, a crashed server).
``fibrpc_serve`` (function)
    ``fibrpc_serve(*args, workers=1)`` starts another server of the test's own, on a
    private queue, with more ``fibrpc serve`` options (``"--naive-max-n", "20"``);
    stopped and its queue deleted when the test ends.
``fibrpc_client`` (function)
    A ``fibrpc.Client`` on ``fibrpc_server``, closed when the test ends.
``fibrpc_stub`` (function)
    A ``fibrpc.testing.StubClient``: no broker, no server, the same answers and errors.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

from fibrpc import config
from fibrpc import serving as processes

if TYPE_CHECKING:
    from fibrpc.client import Client
    from fibrpc.testing import StubClient

#: The broker when the tests name none.
DEFAULT_URL: Final = config.DEFAULT_URL
#: Seconds a server may take to log "ready:", and to drain after SIGTERM.
READY_TIMEOUT: Final = processes.READY_TIMEOUT
STOP_TIMEOUT: Final = processes.STOP_TIMEOUT


#: A running ``fibrpc serve`` (``fibrpc.serving.ServerProcess``): ``.url``, ``.queue``,
#: ``.client(**kwargs)``, ``.text`` (its log), ``.wait_for_log``, ``.stop()``...
FibrpcServer = processes.ServerProcess
private_queue = processes.private_queue


def start_server(
    url: str | Sequence[str],
    queue: str,
    *args: str,
    log_dir: Path,
    workers: int = 1,
    env: dict[str, str] | None = None,
    wait: bool = True,
    ready_timeout: float = READY_TIMEOUT,
) -> FibrpcServer:
    """Start ``python -m fibrpc serve`` on ``queue`` at ``url`` (one URL or several; none
    if ``args`` name them with ``--url``) with ``workers`` workers and more ``args``,
    logging to a file in ``log_dir``; wait (if ``wait``) until it is ready
    (``fibrpc.serving.start``).

    Raises ``fibrpc.errors.SpawnError`` with the server's log if it is not ready within
    ``ready_timeout`` seconds or exits first (and then leaves nothing running).
    """
    urls = [url] if isinstance(url, str) else list(url)
    log = log_dir / f"serve-{uuid.uuid4().hex[:6]}.log"
    server = processes.start(urls, queue, *args, log=log, workers=workers, env=env)
    if wait:
        try:
            server.wait_ready(ready_timeout)
        except BaseException:
            server.stop(STOP_TIMEOUT)
            raise
    return server


def delete_queue(url: str, queue: str) -> None:
    """Delete ``queue`` at ``url`` if it is there; never raises (the queue may be gone,
    the broker too)."""
    processes.delete_queue(url, queue)


def check_broker(url: str) -> None:
    """Fail the test at once, saying why, when ``url`` has no broker that lets us in (a
    server would wait for one until ``READY_TIMEOUT``)."""
    from fibrpc import amqp  # noqa: PLC0415 - pika only when asked for
    from fibrpc.errors import FibrpcError  # noqa: PLC0415

    try:
        connection = amqp.connect(url, name="fibrpc-pytest", connect_timeout=10)
    except FibrpcError as exc:
        why = str(exc)
    else:
        with contextlib.suppress(Exception):
            connection.close()
        return
    # Outside the except block: the failure is the broker's answer, not a second error.
    pytest.fail(
        f"No fibrpc server could be started: {why} (--fibrpc-url, the fibrpc_url ini "
        "option or $FIBRPC_URL name the broker.)",
        pytrace=False,
    )


@contextlib.contextmanager
def serving(
    url: str, *args: str, log_dir: Path, workers: int = 1, queue: str | None = None
) -> Iterator[FibrpcServer]:
    """A ready server on a private queue (or ``queue``) at ``url``; afterwards, whatever
    happened, stopped and its queue deleted. Fails the test at once when no broker
    answers at ``url``."""
    queue = queue or private_queue()
    check_broker(url)
    try:
        # Readiness is read from the log: info, unless ``args`` say otherwise.
        server = start_server(
            url, queue, "--log-level", "info", *args, log_dir=log_dir, workers=workers
        )
        try:
            yield server
        finally:
            server.stop(STOP_TIMEOUT)
    finally:
        delete_queue(url, queue)


# -- the plugin -------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fibrpc", "fibrpc fixtures (fibrpc_server, fibrpc_client...)")
    group.addoption(
        "--fibrpc-url",
        dest="fibrpc_url",
        metavar="URL",
        default=None,
        # argparse formats help with %: the default URL's %2F is written %%2F.
        help="RabbitMQ for the fibrpc_server fixture (else the fibrpc_url ini option, "
        f"else $FIBRPC_URL, else {DEFAULT_URL.replace('%', '%%')}).",
    )
    parser.addini("fibrpc_url", "RabbitMQ for the fibrpc_server fixture.", default=None)


@pytest.fixture(scope="session")
def fibrpc_broker_url(pytestconfig: pytest.Config) -> str:
    """The broker URL of the fibrpc fixtures: ``--fibrpc-url``, the ``fibrpc_url`` ini
    option, ``$FIBRPC_URL``, or the local RabbitMQ as guest, the first that is set."""
    url: str | None = pytestconfig.getoption("fibrpc_url") or pytestconfig.getini("fibrpc_url")
    return url or os.environ.get("FIBRPC_URL") or DEFAULT_URL


@pytest.fixture(scope="session")
def fibrpc_server(
    fibrpc_broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FibrpcServer]:
    """A ready ``fibrpc serve --workers 1`` on a private queue, for the whole session."""
    with serving(fibrpc_broker_url, log_dir=tmp_path_factory.mktemp("fibrpc")) as server:
        yield server


@pytest.fixture
def fibrpc_serve(
    fibrpc_broker_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., FibrpcServer]]:
    """``fibrpc_serve(*args, workers=1)``: a ready server with more ``fibrpc serve``
    options, on a private queue; every one is stopped, its queue deleted, after the test."""
    with contextlib.ExitStack() as stack:

        def serve(*args: str, workers: int = 1) -> FibrpcServer:
            log_dir = tmp_path_factory.mktemp("fibrpc")
            return stack.enter_context(
                serving(fibrpc_broker_url, *args, log_dir=log_dir, workers=workers)
            )

        yield serve


@pytest.fixture
def fibrpc_client(fibrpc_server: FibrpcServer) -> Iterator[Client]:
    """A ``fibrpc.Client`` on ``fibrpc_server``, closed after the test."""
    fibrpc_server.check()
    with fibrpc_server.client() as client:
        yield client


@pytest.fixture
def fibrpc_stub() -> Iterator[StubClient]:
    """A ``fibrpc.testing.StubClient`` (no broker), closed after the test."""
    from fibrpc.testing import StubClient  # noqa: PLC0415 - only when asked for

    with StubClient() as stub:
        yield stub
