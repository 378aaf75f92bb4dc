"""Fixtures shared by the integration tests: the real broker, and real servers.

Integration tests talk to the RabbitMQ broker at ``$FIBRPC_TEST_URL`` (default: the local
one as guest) and fail, never skip, when it does not answer. Every server a test starts
is a real ``fibrpc serve`` subprocess in its own process group, stopped (and if need be
killed, with its workers) when the test ends; every queue a test uses is its own, and is
deleted afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

URL = os.environ.get("FIBRPC_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
READY_TIMEOUT = 60.0


def broker_connection() -> pika.BlockingConnection:
    """A connection to the test broker, or a test failure saying how to start one."""
    try:
        return pika.BlockingConnection(pika.URLParameters(URL))
    except pika.exceptions.AMQPError as exc:
        pytest.fail(
            f"No RabbitMQ at {URL} ({exc!r}); start it with scripts/ensure-broker.sh",
            pytrace=False,
        )


@pytest.fixture
def broker() -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on the real broker (closed afterwards)."""
    conn = broker_connection()
    try:
        yield conn.channel()
    finally:
        with contextlib.suppress(Exception):
            conn.close()


@pytest.fixture
def queue() -> Iterator[str]:
    """A request queue name of this test's own, deleted when the test ends."""
    name = f"fibrpc-test-{uuid.uuid4().hex[:10]}"
    yield name
    conn = broker_connection()
    with contextlib.suppress(Exception):
        conn.channel().queue_delete(name)
    with contextlib.suppress(Exception):
        conn.close()


class Server:
    """A running ``fibrpc serve`` subprocess and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = READY_TIMEOUT, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text.count(needle) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{needle!r} not logged (x{count}) within {timeout}s; exit={self.proc.poll()}\n"
            f"{self.text[-4000:]}"
        )

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(p) for p in out.split()]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; kill the whole group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        self.kill_group()
        return self.proc.wait(5)

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_server(
    queue: str,
    tmp_path: Path,
    *args: str,
    workers: int = 2,
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> Server:
    """Start ``fibrpc serve`` on ``queue`` and (by default) wait until it is ready."""
    log = tmp_path / f"serve-{uuid.uuid4().hex[:6]}.log"
    cmd = [
        sys.executable,
        "-m",
        "fibrpc",
        "serve",
        "--url",
        URL,
        "--queue",
        queue,
        "--workers",
        str(workers),
        *args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    server = Server(proc, log)
    if wait:
        try:
            server.wait_for_log("ready:")
        except BaseException:
            server.stop()
            raise
    return server


@pytest.fixture
def serve(queue: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers on this test's queue; all are stopped when the test ends."""
    servers: list[Server] = []

    def start(*args: str, **kwargs: object) -> Server:
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
