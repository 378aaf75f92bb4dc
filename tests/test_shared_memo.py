"""One memo per server: real ``fibrpc serve`` processes, a real broker, real ``kill -9``.

Whichever worker computed a large result, every worker of the server answers it from the
memo; a respawned worker finds the memo warm; the memo stays within ``--memo-bytes``; and
the server leaves nothing behind when it exits, or (killed with ``kill -9``) the next one
to start removes what it left. Hits and misses are read from each worker's counters (the
files behind ``fibrpc status``), never from timings.
"""

from __future__ import annotations

import mmap
import os
import signal
import time
from pathlib import Path
from typing import Any

import gmpy2
import pytest

from fibrpc import Client, memo, state

N = 200_000  # memo-eligible (above 10,000), 41,798 digits: quick to compute
TIMEOUT = 30.0
PAGE = mmap.PAGESIZE  # tmpfs gives an entry whole pages, and the memo counts them

pytestmark = pytest.mark.broker


def memo_dir(server: Any) -> Path:
    return memo.root() / f"{memo.PREFIX}{server.proc.pid}"


def workers(state_dir: Path, queue: str, expect: int) -> list[dict[str, Any]]:
    """The counters of the server's workers once ``expect`` of them have reported."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        servers = state.read_servers(state_dir, queue)
        found = [w for s in servers for w in s["workers"] if "memo_misses" in w]
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def settled(state_dir: Path, queue: str, expect: int, served: int) -> list[dict[str, Any]]:
    """The workers' counters once they add up to ``served`` messages (each worker
    reports at most once a second)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = workers(state_dir, queue, expect)
        if sum(w["served"] for w in found) >= served or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def respawned(state_dir: Path, queue: str, dead: int) -> None:
    """Wait until a worker other than ``dead`` consumes (it reports as it starts)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(w["pid"] != dead for w in workers(state_dir, queue, 1)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no worker replaced pid {dead} within {TIMEOUT} s")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    return directory


def test_a_result_one_worker_computed_is_a_hit_on_the_other(serve, queue, state_dir, broker_url):
    server = serve(workers=2, env={"FIBRPC_STATE_DIR": str(state_dir)})
    expected = gmpy2.fib(N).digits()
    with Client(broker_url, queue=queue, timeout=TIMEOUT) as client:
        for _ in range(6):
            assert client.call_text(N) == expected
    counters = settled(state_dir, queue, 2, 6)
    served = [w["served"] for w in counters]
    assert len(served) == 2 and min(served) >= 1, (
        f"RabbitMQ gave every call to one worker: {counters}"
    )
    assert sum(w["memo_misses"] for w in counters) == 1, counters  # computed once per server
    assert sum(w["memo_hits"] for w in counters) == 5, counters
    other = next(w for w in counters if w["memo_misses"] == 0)
    assert other["memo_hits"] == other["served"] >= 1  # all its answers from the other's work
    entries = sorted(p.name for p in memo_dir(server).iterdir() if not p.name.startswith("."))
    assert entries == [f"t{N}"]


def test_a_respawned_worker_finds_the_memo_warm(serve, queue, state_dir, broker_url):
    server = serve(workers=1, env={"FIBRPC_STATE_DIR": str(state_dir)})
    expected = gmpy2.fib(N).digits()
    with Client(broker_url, queue=queue, timeout=TIMEOUT) as client:
        assert client.call_text(N) == expected
        (first,) = server.worker_pids()
        assert settled(state_dir, queue, 1, 1)[0]["memo_misses"] == 1
        os.kill(first, signal.SIGKILL)
        server.wait_for_log("restarting")
        respawned(state_dir, queue, first)
        assert client.call_text(N) == expected
        (second,) = server.worker_pids()
    assert second != first
    (counters,) = settled(state_dir, queue, 1, 1)
    assert counters["pid"] == second
    assert (counters["memo_hits"], counters["memo_misses"]) == (1, 0)


def test_the_memo_of_a_server_stays_within_its_bound(serve, queue, broker_url):
    bound = 200_000  # room for four texts of about 42,000 digits
    server = serve("--memo-bytes", str(bound), workers=2)
    directory = memo_dir(server)
    with Client(broker_url, queue=queue, timeout=TIMEOUT) as client:
        for k in range(12):
            n = N + k
            assert client.call_text(n) == gmpy2.fib(n).digits()
            held = [p for p in directory.iterdir() if not p.name.startswith(".")]
            assert sum(-(-p.stat().st_size // PAGE) * PAGE for p in held) <= bound
    assert 0 < len(held) < 12
    assert f"t{N + 11}" in {p.name for p in held}  # the newest stays


def test_a_server_removes_its_memo_when_it_stops(serve, queue, broker_url):
    server = serve(workers=2)
    directory = memo_dir(server)
    with Client(broker_url, queue=queue, timeout=TIMEOUT) as client:
        client.call_text(N)
    assert directory.is_dir()
    assert server.stop() == 0
    assert not directory.exists()


def test_the_memo_of_a_killed_server_is_removed_by_the_next_one(serve, queue, broker_url):
    killed = serve(workers=1)
    directory = memo_dir(killed)
    with Client(broker_url, queue=queue, timeout=TIMEOUT) as client:
        client.call_text(N)
    killed.kill_group()  # kill -9 the supervisor and its worker: no clean-up runs
    killed.proc.wait(10)
    assert directory.is_dir()
    serve(workers=1)
    assert not directory.exists()


def test_with_memo_bytes_0_no_memo_is_made(serve, queue, broker_url):
    server = serve("--memo-bytes", "0", workers=1)
    with Client(broker_url, queue=queue, timeout=TIMEOUT) as client:
        assert client.call_text(N) == gmpy2.fib(N).digits()
    assert not memo_dir(server).exists()
