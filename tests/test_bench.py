"""``fibrpc bench``: a short real run against a spawned server, and its result checking.

The long runs live in bench/ and are run on purpose; these only prove that the command
measures what it says, checks every result, and leaves nothing running behind it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import gmpy2
import pika
import pytest
from conftest import URL, broker_connection, run_cli

from fibrpc import bench
from fibrpc.errors import ErrorCode
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE

SCENARIO_KEYS = {
    "name", "calls", "seconds", "calls_per_s", "p50_ms", "p99_ms", "errors", "failures"
}  # fmt: skip


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a private queue name)."""
    out = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()


def children(pid: int) -> str:
    """Command lines of the children of ``pid``."""
    cmd = ["ps", "-ww", "-o", "args=", "--ppid", str(pid)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return out.stdout


def queue_exists(name: str) -> bool:
    conn = broker_connection()
    try:
        conn.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        conn.close()


@pytest.mark.broker
def test_bench_spawn_measures_every_scenario_and_leaves_nothing_behind() -> None:
    result = run_cli(
        "bench", "--spawn", "1", "--calls", "200", "--batch-size", "50", "--json", "--url", URL
    )
    assert result.returncode == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert [s["name"] for s in doc["scenarios"]] == ["sequential", "pipelined", "batched"]
    for scenario in doc["scenarios"]:
        assert set(scenario) == SCENARIO_KEYS
        assert scenario["calls"] == 200
        assert scenario["errors"] == 0
        assert scenario["failures"] == {}
        assert scenario["calls_per_s"] > 0
        assert 0 < scenario["p50_ms"] <= scenario["p99_ms"]
    assert doc["spawn"] == 1
    assert "guest:***@" in doc["url"]
    queue = doc["queue"]
    assert queue.startswith("fibrpc-bench-")
    assert processes_naming(queue) == []
    assert not queue_exists(queue)


@pytest.mark.broker
def test_bench_counts_refused_calls_as_errors_and_exits_1_without_stopping() -> None:
    # n is drawn from 0..100 and 'iter' refuses n > 93: some calls fail, the run goes on.
    result = run_cli(
        "bench",
        "--spawn",
        "1",
        "--calls",
        "100",
        "--algo",
        "iter",
        "--max-n",
        "100",
        "--scenario",
        "pipelined",
        "--scenario",
        "batched",
        "--batch-size",
        "10",
        "--json",
        "--url",
        URL,
    )
    assert result.returncode == ExitCode.FAILURE, result.stderr
    doc = json.loads(result.stdout)
    pipelined, batched = doc["scenarios"]
    assert pipelined["calls"] == batched["calls"] == 100
    refused = sum(n > 93 for n in bench.draw_ns(100, 100, bench.DEFAULT_SEED))
    assert pipelined["errors"] == refused > 0
    assert batched["errors"] >= refused  # a refused batch fails all of its values
    assert "failed or were wrong" in result.stderr
    # and says why: the first refusal of each kind, with the server's message
    assert list(pipelined["failures"]) == [ErrorCode.OUT_OF_RANGE]
    assert "'iter'" in pipelined["failures"][ErrorCode.OUT_OF_RANGE]
    assert list(batched["failures"]) == [ErrorCode.OUT_OF_RANGE]
    assert f"  {ErrorCode.OUT_OF_RANGE}, the first of them: " in result.stderr


@pytest.mark.broker
def test_ctrl_c_during_a_spawned_run_stops_the_server() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fibrpc", "bench", "--spawn", "1", "--url", URL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        # As a terminal's Ctrl-C finds it, however this suite was started: a background
        # job or a CI runner may start it with SIGINT ignored, which a child inherits.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    try:
        deadline = time.monotonic() + 60
        server = ""
        while time.monotonic() < deadline and "fibrpc-bench-" not in server:
            server = children(proc.pid)
            time.sleep(0.1)
        assert "fibrpc-bench-" in server, "the spawned server never appeared"
        assert "guest:guest" not in server, "the password shows in ps"
        queue = next(word for word in server.split() if word.startswith("fibrpc-bench-"))
        time.sleep(1.5)  # let the run start
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == ExitCode.INTERRUPTED, stderr
    assert processes_naming(queue) == []


def test_a_wrong_result_is_counted_and_a_failed_call_is_not_counted_twice() -> None:
    ns = [0, 10, 90, 93, 94, 1000]
    right = [FAST_TABLE[n] for n in ns[:4]] + [int(gmpy2.fib(94)), int(gmpy2.fib(1000))]
    assert bench.count_mismatches(ns, right) == 0
    wrong = list(right)
    wrong[2] += 1  # table range
    wrong[5] -= 1  # GMP range
    assert bench.count_mismatches(ns, wrong) == 2
    failed = [None, *right[1:]]
    assert bench.count_mismatches(ns, failed) == 0


def test_the_oracle_agrees_with_gmp_across_the_table_boundary() -> None:
    for n in (0, 1, 92, 93, 94, 500):
        assert bench.expected(n) == int(gmpy2.fib(n))


def test_percentiles_use_the_nearest_rank() -> None:
    latencies = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    assert bench.percentile_ms(latencies, 0.50) == 50.0
    assert bench.percentile_ms(latencies, 0.99) == 99.0
    assert bench.percentile_ms([], 0.5) == 0.0


def test_the_values_of_n_are_uniform_in_range_and_reproducible() -> None:
    ns = bench.draw_ns(10_000, 90, seed=7)
    assert ns == bench.draw_ns(10_000, 90, seed=7)
    assert min(ns) == 0 and max(ns) == 90
    assert all(type(n) is int for n in ns)


@pytest.mark.parametrize("calls", [None, 5])
def test_calls_per_scenario_default_to_each_scenarios_own_count(calls: int | None) -> None:
    settings = bench.BenchSettings(calls=calls)
    for name in bench.SCENARIOS:
        assert settings.calls_for(name) == (calls or bench.DEFAULT_CALLS[name])


def test_bench_spawn_with_the_broker_down_exits_6_at_once_saying_so() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = run_cli(
        "bench", "--spawn", "1", "--url", f"amqp://guest:guest@127.0.0.1:{port}/%2F", timeout=60
    )
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert time.monotonic() - started < 15  # the interpreter's start, then one refusal
    assert f"127.0.0.1:{port}" in result.stderr
    assert "guest:guest" not in result.stderr


def test_bench_on_a_queue_nobody_serves_says_so_after_one_call_not_ten(queue: str) -> None:
    with broker_connection() as connection:
        connection.channel().queue_declare(queue, durable=True)  # there, and no consumer
    started = time.monotonic()
    result = run_cli(
        "bench", "--url", URL, "--queue", queue, "--scenario", "sequential", "--calls", "10",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == ExitCode.NO_SERVER, result.stderr
    assert "No fibrpc server is serving queue" in result.stderr
    # One warm-up call's no-server wait (about 1.5 s), not ten of them in a row (15 s).
    assert time.monotonic() - started < 10
