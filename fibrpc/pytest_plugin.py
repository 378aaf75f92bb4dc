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
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from fibrpc.client import Client
    from fibrpc.testing import StubClient

#: The broker when the tests name none (as ``fibrpc.config.DEFAULT_URL``, which would
#: import more than a plugin should).
DEFAULT_URL: Final = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: Seconds a server may take to log "ready:" (the first start of a machine compiles the
#: kernels: a few seconds; later ones, under one).
READY_TIMEOUT: Final = 60.0
#: Seconds a server may take to drain after SIGTERM before its process group is killed.
STOP_TIMEOUT: Final = 20.0
_READY: Final = "ready:"
_LOG_TAIL: Final = 4000


class FibrpcServer:
    """A running ``fibrpc serve`` subprocess (in a process group of its own), its log,
    and where it serves: ``url`` (the first broker URL) and ``queue``."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, url: str, queue: str) -> None:
        self.proc = proc
        self.log = log
        self.url = url
        self.queue = queue

    @property
    def pid(self) -> int:
        """The supervisor's process id (also its process group's)."""
        return self.proc.pid

    @property
    def text(self) -> str:
        """Everything the server has logged so far."""
        return self.log.read_text(errors="replace")

    def client(self, **kwargs: Any) -> Client:
        """A ``fibrpc.Client`` on this server's broker and queue; ``kwargs`` are its other
        settings (``timeout=5``...). The caller closes it (``with``)."""
        from fibrpc.client import Client  # noqa: PLC0415 - pika only when asked for

        return Client(self.url, queue=self.queue, **kwargs)

    def wait_for_log(self, needle: str, timeout: float = READY_TIMEOUT, count: int = 1) -> None:
        """Wait until the log holds ``needle`` ``count`` times; raise ``AssertionError``
        with the log's end after ``timeout`` seconds, or as soon as the server exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text.count(needle) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"fibrpc serve did not log {needle!r} (x{count}) within {timeout} s "
            f"(exit code {self.proc.poll()}); its log ends:\n{self.text[-_LOG_TAIL:]}"
        )

    def check(self) -> None:
        """Raise ``AssertionError``, with the log's end, if the server has exited."""
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(
                f"fibrpc serve on queue {self.queue!r} exited with code {code}; its log "
                f"ends:\n{self.text[-_LOG_TAIL:]}"
            )

    def worker_pids(self) -> list[int]:
        """The process ids of the server's workers (its children)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(p) for p in out.split()]

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the supervisor."""
        self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (a drain), and SIGKILL to the whole process group if it has not exited
        within ``timeout`` seconds; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill_group()
        return self.proc.wait(5)

    def kill_group(self) -> None:
        """SIGKILL every process left in the server's process group (workers too)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def private_queue() -> str:
    """A queue name no other test uses: ``fibrpc-test-`` and 10 hex digits."""
    return f"fibrpc-test-{uuid.uuid4().hex[:10]}"


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
    logging to a file in ``log_dir``; wait (if ``wait``) until it is ready.

    Raises ``AssertionError`` with the server's log if it is not ready within
    ``ready_timeout`` seconds or exits first (and then leaves nothing running).
    """
    urls = [url] if isinstance(url, str) else list(url)
    log = log_dir / f"serve-{uuid.uuid4().hex[:6]}.log"
    cmd = [sys.executable, "-m", "fibrpc", "serve"]
    for node in urls:
        cmd += ["--url", node]
    cmd += ["--queue", queue, "--workers", str(workers), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    named = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--url"]
    server = FibrpcServer(proc, log, (urls or named or [DEFAULT_URL])[0], queue)
    if wait:
        try:
            server.wait_for_log(_READY, ready_timeout)
        except BaseException:
            server.stop()
            raise
    return server


def delete_queue(url: str, queue: str) -> None:
    """Delete ``queue`` at ``url`` if it is there; never raises (the queue may be gone,
    the broker too)."""
    with contextlib.suppress(Exception):
        from fibrpc import amqp  # noqa: PLC0415 - pika only when asked for

        connection = amqp.connect(url, name="fibrpc-pytest", connect_timeout=10)
        try:
            connection.channel().queue_delete(queue)
        finally:
            with contextlib.suppress(Exception):
                connection.close()


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
            server.stop()
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
