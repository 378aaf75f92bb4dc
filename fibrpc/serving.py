"""Starting and stopping a ``fibrpc serve`` subprocess: the one way, for ``fibrpc bench
--spawn`` (``fibrpc.bench``), the pytest plugin (``fibrpc.pytest_plugin``) and fibrpc's
own tests.

A server runs in a session (and process group) of its own, logging to a file; the broker
URLs reach it in ``FIBRPC_URL``, not in its command line, where ``ps`` would show the
passwords. Stopping is SIGTERM (a drain), then SIGKILL to the whole group (its workers
too) in every case. Importing this module is cheap: no pika (``delete_queue`` loads it
only when called).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from fibrpc.config import DEFAULT_URL
from fibrpc.errors import SpawnError

if TYPE_CHECKING:
    from fibrpc.client import Client

#: Seconds a server may take to log "ready:" (the first start of a machine compiles the
#: kernels: a few seconds; later ones, under one).
READY_TIMEOUT: Final = 60.0
#: Seconds a server may take to drain after SIGTERM before its process group is killed.
STOP_TIMEOUT: Final = 20.0
#: Seconds the processes of a killed server's group may take to be gone (reaped).
GONE_WITHIN: Final = 5.0
#: What a server logs once it consumes (``fibrpc serve``'s supervisor, at info).
READY: Final = "ready:"
#: Characters of a server's log quoted in an error.
LOG_TAIL: Final = 4000
#: The environment variable ``fibrpc serve`` reads its broker URLs from.
URL_ENV: Final = "FIBRPC_URL"


def private_queue(prefix: str = "fibrpc-test") -> str:
    """A queue name nothing else uses: ``prefix``, a dash and 10 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class ServerProcess:
    """A running ``fibrpc serve`` subprocess, its log, and where it serves: ``url`` (the
    first broker URL) and ``queue``."""

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

    def wait_ready(self, timeout: float) -> None:
        """Wait (``timeout`` seconds at most) until the server logs that it is ready.

        Raises ``SpawnError`` with the log's end if it exits first or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.text:
                return
            if self.proc.poll() is not None:
                raise SpawnError(
                    f"fibrpc serve on queue {self.queue!r} exited with code "
                    f"{self.proc.returncode} before it was ready; its log ends:\n{self.tail()}",
                    queue=self.queue,
                )
            time.sleep(0.01)
        raise SpawnError(
            f"fibrpc serve on queue {self.queue!r} was not ready within {timeout} s; its "
            f"log ends:\n{self.tail()}",
            queue=self.queue,
        )

    def wait_for_log(self, needle: str, timeout: float = READY_TIMEOUT, count: int = 1) -> None:
        """Wait until the log holds ``needle`` ``count`` times (a test's check); raise
        ``AssertionError`` with the log's end after ``timeout`` seconds, or as soon as the
        server exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text.count(needle) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"fibrpc serve did not log {needle!r} (x{count}) within {timeout} s "
            f"(exit code {self.proc.poll()}); its log ends:\n{self.tail()}"
        )

    def check(self) -> None:
        """Raise ``AssertionError``, with the log's end, if the server has exited."""
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(
                f"fibrpc serve on queue {self.queue!r} exited with code {code}; its log "
                f"ends:\n{self.tail()}"
            )

    def tail(self) -> str:
        """The end of the log (``LOG_TAIL`` characters)."""
        return self.text[-LOG_TAIL:]

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
        """SIGTERM (a drain), and SIGKILL to the whole process group, whether or not it
        has exited within ``timeout`` seconds; the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout)
        finally:
            self.kill_group()
        return self.proc.wait(5)

    def kill_group(self) -> None:
        """SIGKILL every process left in the server's process group (workers too), and
        wait up to ``GONE_WITHIN`` seconds until none is left: the supervisor is reaped
        here, and a worker it left behind is gone only once init has reaped it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + GONE_WITHIN
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(GONE_WITHIN)  # this process's child: a zombie until then
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.01)


def start(
    urls: Sequence[str],
    queue: str,
    *args: str,
    log: Path,
    workers: int = 1,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> ServerProcess:
    """Start ``python -m fibrpc serve`` on ``queue`` at ``urls`` (in ``FIBRPC_URL``; none
    if ``args`` name them with ``--url``) with ``workers`` workers and more ``args``,
    logging to the file ``log``, in a session of its own; return at once (``wait_ready``
    waits). ``env`` is added to this process's environment; ``preexec_fn`` runs in the
    child before ``exec`` (only safe while this process has a single thread)."""
    cmd = [sys.executable, "-m", "fibrpc", "serve"]
    cmd += ["--queue", queue, "--workers", str(workers), *args]
    environment = dict(os.environ)
    if urls:
        environment[URL_ENV] = ",".join(urls)
    environment.update(env or {})
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=environment,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - the caller's to make safe
        )
    named = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--url"]
    return ServerProcess(proc, log, (list(urls) or named or [DEFAULT_URL])[0], queue)


def delete_queue(urls: str | Sequence[str], queue: str) -> None:
    """Delete ``queue`` at the first of ``urls`` that answers, if it is there; never
    raises (the queue may be gone, the broker too: a leftover queue is harmless)."""
    with contextlib.suppress(Exception):
        from fibrpc import amqp  # noqa: PLC0415 - pika only when asked for

        nodes = [urls] if isinstance(urls, str) else list(urls)
        connection, _ = amqp.connect_any(nodes, name="fibrpc-serving", connect_timeout=10)
        try:
            connection.channel().queue_delete(queue)
        finally:
            amqp.close_within(connection)
