"""A large result end to end against the same work done locally, in the same run.

    .venv/bin/python bench/results.py [--url URL] [--n 10000000] [--rounds 3]

Each round, on a fresh ``fibrpc serve --workers 2`` (a fresh memo):

* **local**: ``int(gmpy2.fib(n))`` (an int, as ``Client.call`` returns) and
  ``gmpy2.fib(n).digits()`` (decimal text, as ``call_text``), in this process;
* **call**: ``Client.call(n)`` first (computed, sent in binary), then six repeats (from
  the memo, whichever worker takes them);
* **call_text**: ``Client.call_text(n)`` first on another fresh server, then six repeats;
* **transfer**: one message of the size of F(n)'s magnitude published to a queue and
  consumed back with plain pika over the same broker: what moving those bytes costs,
  without fibrpc.

Prints the medians over the rounds (of each round's first call; of each round's worst
repeat) and the ratios the issue sets bars on: call first / local int (≤ 1.3),
call_text first / local digits (≤ 1.15), call repeat - transfer (≤ 5 ms).
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


def first_and_repeats(url: str, fn: str, n: int, expected: Any) -> tuple[float, float]:
    """Seconds of the first call on a fresh server, and of its worst of six repeats."""
    with spawned_server(url, 2) as server, Client(url, queue=server.queue, timeout=120) as c:
        call = getattr(c, fn)
        c.call(10)  # the connection and both workers are warm; the memo holds nothing
        c.call(11)
        first, value = timed(lambda: call(n))
        assert value == expected
        repeats = []
        for _ in range(6):
            seconds, value = timed(lambda: call(n))
            assert value == expected
            repeats.append(seconds)
        return first, max(repeats)


def transfer(url: str, size: int) -> float:
    """Seconds to publish ``size`` bytes to a queue and consume them back, plain pika."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        queue = f"bench-transfer-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, exclusive=True)
        body = bytes(size)
        got: list[bytes] = []

        def on_message(ch: Any, method: Any, props: Any, data: bytes) -> None:
            got.append(data)

        channel.basic_consume(queue, on_message, auto_ack=True)
        best = float("inf")
        for _ in range(5):
            got.clear()
            started = time.perf_counter()
            channel.basic_publish("", queue, body)
            while not got:
                conn.process_data_events(time_limit=0.001)
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.n
    value = int(gmpy2.fib(n))
    digits = gmpy2.fib(n).digits()
    size = (value.bit_length() + 7) // 8
    rows: dict[str, list[float]] = {k: [] for k in ("int", "digits", "call", "call_rep")}
    rows |= {"text": [], "text_rep": [], "transfer": []}
    for k in range(args.rounds):
        rows["int"].append(timed(lambda: int(gmpy2.fib(n)))[0])
        rows["digits"].append(timed(lambda: gmpy2.fib(n).digits())[0])
        first, repeat = first_and_repeats(args.url, "call", n, value)
        rows["call"].append(first)
        rows["call_rep"].append(repeat)
        first, repeat = first_and_repeats(args.url, "call_text", n, digits)
        rows["text"].append(first)
        rows["text_rep"].append(repeat)
        rows["transfer"].append(transfer(args.url, size))
        print(
            f"round {k + 1}: local int {1000 * rows['int'][-1]:.1f} ms, digits "
            f"{1000 * rows['digits'][-1]:.1f} ms; call first {1000 * rows['call'][-1]:.1f}, "
            f"worst repeat {1000 * rows['call_rep'][-1]:.1f} ms; call_text first "
            f"{1000 * rows['text'][-1]:.1f}, worst repeat {1000 * rows['text_rep'][-1]:.1f} "
            f"ms; transfer of {size:,} bytes {1000 * rows['transfer'][-1]:.1f} ms",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"F({n:,}): {size:,} bytes of magnitude, {len(digits):,} digits; medians of {args.rounds}"
    )
    print(f"  call first / local int          {med['call'] / med['int']:.2f}  (bar 1.3)")
    print(f"  call_text first / local digits  {med['text'] / med['digits']:.2f}  (bar 1.15)")
    print(
        f"  call repeat {1000 * med['call_rep']:.1f} ms = transfer {1000 * med['transfer']:.1f} "
        f"ms + {1000 * (med['call_rep'] - med['transfer']):.1f} ms  (bar: transfer + 5 ms)"
    )
    print(f"  call_text repeat / first        {med['text_rep'] / med['text']:.3f}  (bar 0.2)")


if __name__ == "__main__":
    main()
