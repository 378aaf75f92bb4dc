"""fibrpc through the real broker: a ``fibrpc serve --workers 2`` and one client.

Every round's results are checked. The figures include RabbitMQ on loopback and every
process sharing the machine's cores: compare them with each other and with the baselines
run on the same machine (bench/compare.py), not with another machine's.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from conftest import URL
from pytest_benchmark.fixture import BenchmarkFixture

from fibrpc import Client
from fibrpc.kernels import FAST_TABLE

T = TypeVar("T")


def pedantic(benchmark: BenchmarkFixture, target: Callable[..., T], *args: Any) -> T:
    """Five timed rounds after one warm-up: these targets take tens of milliseconds."""
    result: T = benchmark.pedantic(  # type: ignore[no-untyped-call]
        target, args=args, rounds=5, warmup_rounds=1
    )
    return result


NS_1000 = [n % 91 for n in range(1000)]
NS_100K = [n % 91 for n in range(100_000)]
EXPECTED_1000 = [FAST_TABLE[n] for n in NS_1000]
EXPECTED_100K = [FAST_TABLE[n] for n in NS_100K]


def test_call_sequential_one(benchmark: BenchmarkFixture, client: Client) -> None:
    """One round trip: the tutorial's pattern, and the latency floor of a call."""
    client.call(90)
    assert benchmark(client.call, 90) == FAST_TABLE[90]


def test_submit_1000_pipelined(benchmark: BenchmarkFixture, client: Client) -> None:
    """1000 calls, one message each, up to the client's window (256) in flight."""

    def pipelined() -> list[int]:
        futures = [client.submit(n) for n in NS_1000]
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]

    assert pedantic(benchmark, pipelined) == EXPECTED_1000


def test_map_100000_batched(benchmark: BenchmarkFixture, client: Client) -> None:
    """100,000 calls in batches of 1000 (the client's automatic size), 256 in flight."""
    result = pedantic(benchmark, client.map, NS_100K)
    assert result == EXPECTED_100K


def test_map_100000_batched_window_8(benchmark: BenchmarkFixture, server_queue: str) -> None:
    """The same with 8 batches in flight, raw_batched.py's window."""
    with Client(URL, queue=server_queue, window=8) as narrow:
        result = pedantic(benchmark, narrow.map, NS_100K)
    assert result == EXPECTED_100K
