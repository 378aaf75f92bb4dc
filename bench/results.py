"""A large result end to end against the same work done locally, in the same run.

    .venv/bin/python bench/results.py [--url URL] [--n 10000000] [--pairs 9]

One ``fibrpc serve --workers 2`` (``fibrpc.bench.spawned_server``) for the whole run, and
``--pairs`` pairs of measurements, each pair the local work then the same through the
server, back to back (a machine whose speed drifts moves both alike):

* **call**: ``int(gmpy2.fib(m))`` here (an int, as ``Client.call`` returns), then
  ``Client.call(m)`` (computed by a worker, not memoised yet, sent in binary);
* **call_text**: ``gmpy2.fib(m).digits()`` here, then ``Client.call_text(m)``;
* **repeat**: ``Client.call(n)`` again (from the memo, whichever worker takes it), and one
  message of the size of F(n)'s magnitude published to a queue and consumed back with
  plain pika over the same broker: what moving those bytes costs, without fibrpc.

Each pair takes a value of m not asked before (n, n - 1, ...: the same cost), so that
every "first" call is one. Prints the median of the pairs' ratios with their range, for
the issue's bars: call / local int (≤ 1.3), call_text / local digits (≤ 1.15); and the
median repeat against the median transfer (≤ transfer + 5 ms).
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import gmpy2
import pika

from fibrpc import Client
from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


class Transfer:
    """Plain pika: publish bytes to a queue of its own and consume them back."""

    def __init__(self, url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        self.queue = f"bench-transfer-{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(self.queue, exclusive=True)
        self.got: list[bytes] = []
        self.channel.basic_consume(self.queue, self._on_message, auto_ack=True)

    def _on_message(self, ch: Any, method: Any, props: Any, data: bytes) -> None:
        self.got.append(data)

    def seconds(self, body: bytes) -> float:
        self.got.clear()
        started = time.perf_counter()
        self.channel.basic_publish("", self.queue, body)
        while not self.got:
            self.conn.process_data_events(time_limit=0.001)
        return time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


def ratios(pairs: list[tuple[float, float]]) -> str:
    per_pair = [remote / local for local, remote in pairs]
    return (
        f"{statistics.median(per_pair):.2f} (pairs {min(per_pair):.2f}-{max(per_pair):.2f}; "
        f"medians: here {1000 * statistics.median(p[0] for p in pairs):.1f} ms, through "
        f"fibrpc {1000 * statistics.median(p[1] for p in pairs):.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--pairs", type=int, default=9)
    args = parser.parse_args()
    n = args.n
    value = int(gmpy2.fib(n))
    size = (value.bit_length() + 7) // 8
    ints: list[tuple[float, float]] = []
    texts: list[tuple[float, float]] = []
    repeats: list[float] = []
    transfers: list[float] = []
    with (
        spawned_server(args.url, 2) as server,
        Client(args.url, queue=server.queue, timeout=120) as client,
    ):
        transfer = Transfer(args.url)
        try:
            assert client.call(n) == value  # memoised: the repeats' value
            for k in range(args.pairs):
                m = n - 1 - k
                local, expected = timed(lambda: int(gmpy2.fib(m)))  # noqa: B023
                remote, got = timed(lambda: client.call(m))  # noqa: B023
                assert got == expected
                ints.append((local, remote))
                m = n - 1001 - k
                local, expected = timed(lambda: gmpy2.fib(m).digits())  # noqa: B023
                remote, got = timed(lambda: client.call_text(m))  # noqa: B023
                assert got == expected
                texts.append((local, remote))
                seconds, got = timed(lambda: client.call(n))
                assert got == value
                repeats.append(seconds)
                transfers.append(transfer.seconds(bytes(size)))
                print(
                    f"pair {k + 1}: int here {1000 * ints[-1][0]:.1f} ms, call "
                    f"{1000 * ints[-1][1]:.1f}; digits here {1000 * texts[-1][0]:.1f}, "
                    f"call_text {1000 * texts[-1][1]:.1f}; repeat {1000 * repeats[-1]:.1f}, "
                    f"transfer {1000 * transfers[-1]:.1f}",
                    flush=True,
                )
        finally:
            transfer.close()
    print(f"F({n:,}) and its neighbours: {size:,} bytes, {len(str(gmpy2.fib(n))):,} digits")
    print(f"  call / local int (bar 1.3):          {ratios(ints)}")
    print(f"  call_text / local digits (bar 1.15): {ratios(texts)}")
    print(
        f"  call repeat from the memo: median {1000 * statistics.median(repeats):.1f} ms, worst "
        f"{1000 * max(repeats):.1f} ms; transfer of its bytes: median "
        f"{1000 * statistics.median(transfers):.1f} ms (bar: transfer + 5 ms)"
    )


if __name__ == "__main__":
    main()
