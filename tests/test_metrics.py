"""Prometheus metrics: scraped from live servers (`fibrpc serve --metrics-port`), whose
sums over all workers must match what the test sent; and the pieces that need no broker.

Workers flush their counts once a second, so every scrape here polls until the values
arrive (or a few seconds pass)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import URL, start_server
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families
from rawclient import RawClient

from fibrpc import Client, RequestError
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE, fib_naive
from fibrpc.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, _Pending
from fibrpc.protocol import DEADLINE_HEADER

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for_scrape(port: int, expected: dict[tuple[str, frozenset], float], timeout=5.0):
    """Scrape until every expected sample has its value; fail showing the differences."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        wrong = {
            key: (samples.get(key, 0.0), want)
            for key, want in expected.items()
            if samples.get(key, 0.0) != want
        }
        if not wrong:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"(got, expected) after {timeout} s: {wrong}")
        time.sleep(0.2)


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return (name, frozenset(labels.items()))


@pytest.fixture
def metrics_port() -> int:
    return free_port()


# -- a live server ----------------------------------------------------------------------


def test_scraped_metrics_add_up_every_workers_requests_by_algorithm_and_outcome(
    serve, queue, metrics_port
):
    serve("--metrics-port", str(metrics_port), workers=2)
    singles = 40
    with Client(URL, queue=queue, timeout=30) as client:
        assert client.map([n % 90 for n in range(singles)], batch_size=1) == [
            FAST_TABLE[n % 90] for n in range(singles)
        ]
        assert client.map(range(90), algo="iter", batch_size=90) == list(FAST_TABLE[:90])
        for n in (25, 26, 27):
            assert client.call(n, algo="naive") == fib_naive(n)
        with pytest.raises(RequestError):
            client.call(94, algo="iter")  # refused while decoding: algo unknown
        client.call(20_000)
        client.call(20_000)  # memo-eligible: a miss, then a hit or (other worker) a miss
    raw = RawClient(URL, queue)
    try:
        raw.publish(b"30", reply=False)  # nowhere to answer: dropped
        raw.publish(b"30", headers={DEADLINE_HEADER: int(time.time() * 1000) - 1000})  # expired
        raw.settle(0.3)
    finally:
        raw.close()

    fast_ok = singles + 2
    samples = wait_for_scrape(
        metrics_port,
        {
            key("fibrpc_requests_total", algo="fast", outcome="ok"): fast_ok,
            key("fibrpc_requests_total", algo="iter", outcome="ok"): 1,
            key("fibrpc_requests_total", algo="naive", outcome="ok"): 3,
            key("fibrpc_requests_total", algo="unknown", outcome="out_of_range"): 1,
            key("fibrpc_requests_total", algo="unknown", outcome="dropped"): 1,
            key("fibrpc_requests_total", algo="unknown", outcome="expired"): 1,
            key("fibrpc_deadline_skips_total"): 1,
            key("fibrpc_request_seconds_count", algo="fast"): fast_ok,
            key("fibrpc_request_seconds_count", algo="naive"): 3,
            key("fibrpc_batch_size_count"): fast_ok + 1 + 3,  # decoded requests only
            key("fibrpc_batch_size_sum"): fast_ok + 90 + 3,
            key("fibrpc_batch_size_bucket", le="1.0"): fast_ok + 3,
            key("fibrpc_batch_size_bucket", le="50.0"): fast_ok + 3,
            key("fibrpc_batch_size_bucket", le="100.0"): fast_ok + 1 + 3,
            key("fibrpc_workers"): 2,
            key("fibrpc_worker_restarts_total"): 0,
            key("fibrpc_redeliveries_total"): 0,
        },
    )
    assert value(samples, "fibrpc_memo_hits_total") + value(
        samples, "fibrpc_memo_misses_total"
    ) == pytest.approx(2)
    assert value(samples, "fibrpc_memo_misses_total") >= 1
    # The latency histogram is cumulative, ends at +Inf with the count, and is plausible.
    inf = value(samples, "fibrpc_request_seconds_bucket", algo="fast", le="+Inf")
    assert inf == fast_ok
    assert 0 < value(samples, "fibrpc_request_seconds_sum", algo="fast") < fast_ok * 1.0
    bounds = [f"{b}" for b in LATENCY_BUCKETS]
    counts = [value(samples, "fibrpc_request_seconds_bucket", algo="fast", le=b) for b in bounds]
    assert counts == sorted(counts)


def test_a_killed_worker_bumps_restarts_and_redeliveries_and_its_counts_stay_in_the_sums(
    serve, queue, metrics_port
):
    server = serve("--metrics-port", str(metrics_port), "--naive-max-n", "36", workers=1)
    [worker] = server.worker_pids()
    with Client(URL, queue=queue, timeout=60) as client:
        assert client.map(range(10), batch_size=1) == list(FAST_TABLE[:10])
        # Flushed (the scrape shows them) before the kill: they must survive it.
        wait_for_scrape(metrics_port, {key("fibrpc_requests_total", algo="fast", outcome="ok"): 10})
        held = client.submit(33, algo="naive")  # ~0.5 s on the compute thread
        time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        assert held.result(30) == fib_naive(33)  # redelivered to the new worker
    assert server.worker_pids() != [worker]
    wait_for_scrape(
        metrics_port,
        {
            key("fibrpc_requests_total", algo="fast", outcome="ok"): 10,
            key("fibrpc_requests_total", algo="naive", outcome="ok"): 1,
            key("fibrpc_worker_restarts_total"): 1,
            key("fibrpc_redeliveries_total"): 1,
            key("fibrpc_workers"): 1,  # the dead worker's gauge is gone, the new one's there
        },
    )


def test_a_metrics_port_in_use_stops_serve_with_exit_code_8_and_says_which(queue, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server(queue, tmp_path, "--metrics-port", str(port), wait=False)
        try:
            assert server.proc.wait(60) == ExitCode.CONFIG
        finally:
            server.stop()
    assert f"Cannot serve metrics on 127.0.0.1:{port}" in server.text
    assert "starting" not in server.text  # no worker was forked


def test_the_metrics_directory_is_removed_when_the_server_stops(serve, metrics_port):
    server = serve("--metrics-port", str(metrics_port), workers=1)
    [directory] = re.findall(r"workers' files in (\S+)\)", server.text)
    assert os.path.isdir(directory)
    assert os.listdir(directory)  # the processes' files
    assert server.stop() == 0
    assert not os.path.exists(directory)


# -- no broker --------------------------------------------------------------------------


def test_without_a_metrics_port_nothing_imports_prometheus_client():
    code = (
        "import sys, fibrpc.cli, fibrpc.server, fibrpc.supervisor, fibrpc.metrics\n"
        "from fibrpc.server import Worker, WorkerSettings\n"
        "Worker(WorkerSettings())\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "assert not fibrpc.metrics.current().enabled\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("bounds", "observations"),
    [
        (LATENCY_BUCKETS, [0.0, 0.0001, 0.00011, 0.003, 0.5, 1.0, 29.9, 30.0, 31.0, 1e9]),
        (BATCH_BUCKETS, [1, 1, 2, 3, 100, 101, 99_999, 100_000, 100_001]),
    ],
)
def test_pending_observations_flush_to_the_same_histogram_as_observing_each(bounds, observations):
    one_by_one = Histogram("one", "", buckets=bounds, registry=None)
    flushed = Histogram("two", "", buckets=bounds, registry=None)
    pending = _Pending(tuple(float(b) for b in bounds))
    for x in observations:
        one_by_one.observe(x)
        pending.add(x)
    pending.flush_into(flushed)
    pending.flush_into(flushed)  # a second flush adds nothing

    def samples(histogram):
        [family] = histogram.collect()
        return [
            (s.name.split("_", 1)[1], s.labels, s.value)
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert samples(flushed) == samples(one_by_one)
