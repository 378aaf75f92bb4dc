"""`fibrpc status` against live servers: the queue as RabbitMQ counts it, the workers as
their state files report them (within the one-second reporting delay), and the
management API both missing (for real: a port nobody listens on) and answering (a tiny
local HTTP server with a canned reply, to test our reading of it)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import URL, run_cli

from fibrpc import Client, describe, state
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE
from fibrpc.status import management_stats, parse_queue_stats
from fibrpc.urls import redact


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def no_management() -> str:
    """A management URL where nothing listens: the degraded path, for real."""
    return f"http://127.0.0.1:{closed_port()}"


def status(queue: str, state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "status", "--url", URL, "--queue", queue, *args, env={"FIBRPC_STATE_DIR": str(state_dir)}
    )


def status_json(queue: str, state_dir: Path, *args: str) -> tuple[int, dict]:
    result = status(queue, state_dir, "--json", *args)
    return result.returncode, json.loads(result.stdout)


def poll(check, timeout: float = 5.0):
    """Call ``check`` until it returns a true value; fail with its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value[0] or time.monotonic() > deadline:
            assert value[0], value[1]
            return value[1]
        time.sleep(0.2)


# -- a live server ----------------------------------------------------------------------


def test_status_json_counts_the_queue_and_each_workers_served_requests(
    serve, queue, state_dir, no_management
):
    server = serve(workers=2, env={"FIBRPC_STATE_DIR": str(state_dir)})
    calls = 60
    with Client(URL, queue=queue) as client:
        assert client.map(range(calls), batch_size=1) == list(FAST_TABLE[:calls])

    def served_all():
        code, report = status_json(queue, state_dir, "--management-url", no_management)
        [local] = report["servers"]
        return sum(w.get("served", 0) for w in local["workers"]) == calls, (code, report)

    code, report = poll(served_all)
    assert code == ExitCode.OK
    assert report["exists"] is True
    assert report["messages"] == 0
    assert report["consumers"] == 2
    assert report["url"] == redact(URL)
    [local] = report["servers"]
    assert local["pid"] == server.proc.pid
    assert local["queue"] == queue
    assert sorted(w["pid"] for w in local["workers"]) == sorted(server.worker_pids())
    assert [w["index"] for w in local["workers"]] == [0, 1]
    for worker in local["workers"]:
        assert worker["restarts"] == 0
        assert worker["errors"] == 0
        assert 0 < worker["uptime"] < 120
    management = report["management"]
    assert management["reachable"] is False
    assert management["error"].startswith(f"management API not reachable at {no_management}")
    assert "rabbitmq_management" in management["error"]


def test_status_text_shows_depth_consumers_rates_and_a_workers_table(
    serve, queue, state_dir, no_management
):
    server = serve(workers=2, env={"FIBRPC_STATE_DIR": str(state_dir)})
    with Client(URL, queue=queue) as client:
        client.map(range(10), batch_size=1)
    result = status(queue, state_dir, "--management-url", no_management)
    assert result.returncode == ExitCode.OK, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"queue {queue!r} at {redact(URL)}"
    assert "  messages ready:  0" in lines
    assert "  consumers:       2" in lines
    assert (
        f"  message rates:   none (no management API at {no_management}: "
        "rabbitmq-plugins enable rabbitmq_management)"
    ) in lines
    assert any(line.startswith(f"server pid {server.proc.pid} on this machine") for line in lines)
    header = lines.index(next(line for line in lines if line.split()[:1] == ["worker"]))
    assert lines[header].split() == ["worker", "pid", "uptime", "served", "errors", "restarts"]
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert sorted(int(row[1]) for row in rows) == sorted(server.worker_pids())
    assert "guest:guest" not in result.stdout + result.stderr


def test_status_counts_a_restart_and_shows_the_replacement_worker(serve, queue, state_dir):
    server = serve(workers=2, env={"FIBRPC_STATE_DIR": str(state_dir)})
    first, second = server.worker_pids()
    os.kill(first, signal.SIGKILL)

    def replaced():
        _code, report = status_json(queue, state_dir)
        workers = report["servers"][0]["workers"] if report["servers"] else []
        pids = sorted(w["pid"] for w in workers)
        return len(pids) == 2 and first not in pids and pids == sorted(server.worker_pids()), report

    report = poll(replaced)
    restarts = {w["pid"]: w["restarts"] for w in report["servers"][0]["workers"]}
    assert restarts[second] == 0
    assert sorted(restarts.values()) == [0, 1]
    assert not state.worker_path(state_dir, server.proc.pid, first).exists()


def test_a_server_removes_its_state_files_when_it_stops(serve, state_dir):
    server = serve(workers=2, env={"FIBRPC_STATE_DIR": str(state_dir)})
    poll(lambda: (len(list(state_dir.glob("*.json"))) == 3, list(state_dir.iterdir())))
    assert server.stop() == 0
    assert list(state_dir.iterdir()) == []


# -- no server ----------------------------------------------------------------------------


def test_status_of_a_queue_nobody_declared_exits_5_and_says_how_to_start_a_server(
    queue, state_dir, no_management
):
    result = status(queue, state_dir, "--management-url", no_management)
    assert result.returncode == ExitCode.NO_SERVER
    assert "the queue does not exist: no server has declared it" in result.stdout
    assert f"fibrpc serve --queue {queue}" in result.stdout
    assert f"no server for {queue!r} runs on this machine" in result.stdout
    code, report = status_json(queue, state_dir, "--management-url", no_management)
    assert code == ExitCode.NO_SERVER
    assert report["exists"] is False
    assert report["servers"] == []


def test_status_of_a_queue_without_consumers_exits_5(queue, broker, state_dir, no_management):
    broker.queue_declare(queue, durable=True)
    result = status(queue, state_dir, "--management-url", no_management)
    assert result.returncode == ExitCode.NO_SERVER
    assert "  consumers:       0  (no server consumes the queue)" in result.stdout


def test_status_with_the_broker_down_exits_6_and_shows_no_password(queue, state_dir):
    url = f"amqp://guest:hunter2@127.0.0.1:{closed_port()}/%2F"
    result = run_cli(
        "status", "--url", url, "--queue", queue, env={"FIBRPC_STATE_DIR": str(state_dir)}
    )
    assert result.returncode == ExitCode.BROKER_UNREACHABLE
    assert "hunter2" not in result.stdout + result.stderr
    assert result.stderr.strip().startswith(
        "fibrpc: Cannot connect to RabbitMQ at amqp://guest:***@"
    )


def test_status_with_a_wrong_password_exits_7(queue, state_dir):
    url = "amqp://guest:hunter2@127.0.0.1:5672/%2F"
    result = run_cli(
        "status", "--url", url, "--queue", queue, env={"FIBRPC_STATE_DIR": str(state_dir)}
    )
    assert result.returncode == ExitCode.ACCESS_REFUSED
    assert "hunter2" not in result.stdout + result.stderr


def test_state_files_of_a_supervisor_that_is_gone_are_ignored(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    state.write_json(state.server_path(tmp_path, pid), {"pid": pid, "queue": "q", "workers": []})
    assert state.read_servers(tmp_path) == []
    # A running process that is not fibrpc (a reused pid) is not taken for a server either.
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            path = state.server_path(tmp_path, sleeper.pid)
            state.write_json(path, {"pid": sleeper.pid, "queue": "q", "workers": []})
            assert state.read_servers(tmp_path) == []
        finally:
            sleeper.kill()


def test_a_killed_server_leaves_no_process_once_kill_group_returns(serve):
    """``ServerProcess.kill_group`` (the pytest plugin's and bench's last step) returns
    only once the whole group is gone, reaped: a worker orphaned by its supervisor's
    kill -9 included (CI once found one still there after the plugin's teardown)."""
    server = serve(workers=2)
    assert len(server.worker_pids()) == 2
    os.kill(server.pid, signal.SIGKILL)  # the workers are orphaned, and told to drain
    server.kill_group()
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)


def test_a_starting_server_removes_the_files_a_killed_one_left(serve, state_dir):
    killed = serve(workers=1, env={"FIBRPC_STATE_DIR": str(state_dir)})
    killed.kill_group()  # SIGKILL: no clean-up
    killed.proc.wait(10)
    left = sorted(p.name for p in state_dir.glob("*.json"))
    assert f"{killed.proc.pid}.json" in left
    survivor = serve(workers=1, env={"FIBRPC_STATE_DIR": str(state_dir)})
    names = {p.name for p in state_dir.glob("*.json")}
    assert not any(
        name.startswith((f"{killed.proc.pid}.", f"{killed.proc.pid}-")) for name in names
    )
    assert f"{survivor.proc.pid}.json" in names


# -- the management API, answering ------------------------------------------------------


QUEUE_STATS = {
    "name": "rpc_queue",
    "messages": 3,
    "messages_unacknowledged": 2,
    "consumers": 4,
    "message_stats": {
        "publish": 1000,
        "publish_details": {"rate": 125.5},
        "deliver_get": 990,
        "deliver_get_details": {"rate": 120.25},
        "ack": 990,
        "ack_details": {"rate": 119.0},
    },
}


class _Management(http.server.BaseHTTPRequestHandler):
    """Answers GET /api/queues/... with QUEUE_STATS (or ``status`` if not 200)."""

    status = 200
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        type(self).requests.append((self.path, self.headers.get("Authorization")))
        body = json.dumps(QUEUE_STATS if self.status == 200 else {"error": "x"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def management(status: int = 200) -> Iterator[tuple[str, type[_Management]]]:
    handler = type("Handler", (_Management,), {"status": status, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_status_reads_message_rates_from_the_management_api_with_the_amqp_credentials(
    serve, queue, state_dir
):
    serve(workers=1, env={"FIBRPC_STATE_DIR": str(state_dir)})
    with management() as (address, handler):
        result = status(queue, state_dir, "--management-url", address)
        _code, report = status_json(queue, state_dir, "--management-url", address)
    assert result.returncode == ExitCode.OK, result.stderr
    assert "  message rates:   publish 125.5/s, deliver 120.2/s, ack 119.0/s, redeliver 0.0/s" in (
        result.stdout.splitlines()
    )
    assert "  unacked:         2" in result.stdout.splitlines()
    assert report["management"] == {
        "url": address,
        "reachable": True,
        "error": None,
        "rates": {"publish": 125.5, "deliver": 120.25, "ack": 119.0, "redeliver": 0.0},
        "messages_unacknowledged": 2,
    }
    path, authorization = handler.requests[0]
    assert path == f"/api/queues/%2F/{queue}"
    assert authorization == "Basic " + base64.b64encode(b"guest:guest").decode()


def test_a_management_url_with_its_own_user_is_asked_with_that_user_and_shown_without_it():
    with management(status=401) as (address, handler):
        url = address.replace("http://", "http://monitor:s3cret@")
        stats = management_stats(url, "amqp://guest:guest@127.0.0.1:5672/vh", "my queue")
    assert handler.requests == [
        ("/api/queues/vh/my%20queue", "Basic " + base64.b64encode(b"monitor:s3cret").decode())
    ]
    assert stats["reachable"] is True
    assert stats["rates"] is None
    assert stats["error"] == (
        f"the management API at {address} refused user 'monitor' (HTTP 401); it needs a user "
        "with the 'monitoring' or 'management' tag"
    )
    assert "s3cret" not in json.dumps(stats)


def test_a_queue_without_traffic_yet_has_zero_rates():
    assert parse_queue_stats({"messages_unacknowledged": 0}) == {
        "rates": {"publish": 0.0, "deliver": 0.0, "ack": 0.0, "redeliver": 0.0},
        "messages_unacknowledged": 0,
    }


@pytest.mark.any_line
def test_status_watch_refreshes_and_shows_a_worker_that_stopped_answering_as_stuck(
    serve, queue, state_dir
):
    # A stopped worker (SIGSTOP: alive, but its I/O loop no longer turns) stops reporting;
    # its neighbour answers the describe and says so once SILENT_AFTER has passed.
    server = serve(workers=2, env={"FIBRPC_STATE_DIR": str(state_dir)})
    stopped, _ = server.worker_pids()
    cmd = [sys.executable, "-m", "fibrpc", "status", "--url", URL, "--queue", queue]
    watch = subprocess.Popen(
        [*cmd, "--watch", "0.5"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "FIBRPC_STATE_DIR": str(state_dir)},
    )
    shown: list[bytes] = []
    reader = threading.Thread(target=lambda: shown.extend(iter(watch.stdout.readline, b"")))
    reader.start()
    os.kill(stopped, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + describe.SILENT_AFTER + 40
        while b"STUCK" not in b"".join(shown):
            assert watch.poll() is None, b"".join(shown)[-2000:]
            assert time.monotonic() < deadline, b"".join(shown)[-2000:]
            time.sleep(0.2)
    finally:
        os.kill(stopped, signal.SIGCONT)
        watch.send_signal(signal.SIGINT)
        code = watch.wait(10)
        reader.join(10)
        watch.stdout.close()
    text = b"".join(shown).decode()
    # Each screen ends with this line (on a pipe, click leaves out the escape codes that
    # clear the terminal before each).
    screens = text.split("(every 0.5 s; Ctrl-C ends)")
    assert len(screens) >= 3  # refreshed
    last = screens[-2]  # the last whole screen
    assert "2 worker(s), 1 STUCK" in last, last
    [stuck] = [line for line in last.splitlines() if "STUCK:" in line]
    assert f"pid {stopped}," in stuck and "stopped answering" in stuck, last
    assert "STUCK" not in screens[0]  # it was not stuck before it stopped
    assert code == ExitCode.OK
