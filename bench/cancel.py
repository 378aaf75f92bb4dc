"""How soon a worker is free again after its caller gives up on a heavy call (#24).

    .venv/bin/python bench/cancel.py [--url URL] [--rounds 5]

Against one ``fibrpc serve --workers 1 --naive-max-n 40`` (naive(40) takes 10 s or more
here), each round gives up on ``naive(40)`` twice, once by its timeout
(``call(40, algo="naive", timeout=1)``) and once by ``Future.cancel()`` half a second
after submitting it, and times from the moment the caller gave up to the answer of the
next heavy call, ``naive(25)``: the abandoned worker's replacement's start-up included.
Then a storm: the time of 1,000 pipelined calls of another client beside 10,000 calls
submitted and cancelled at once, against beside the same 10,000 calls left to be
answered (what the storm's cancels change, not what its requests cost).
Medians and the largest of the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from fibrpc import CallTimeoutError, Client
from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL


def timed_out(client: Client) -> float:
    with contextlib.suppress(CallTimeoutError):
        client.call(40, algo="naive", timeout=1)
    gave_up = time.perf_counter()
    assert client.call(25, algo="naive") == 75025
    return time.perf_counter() - gave_up


def cancelled(client: Client) -> float:
    future = client.submit(40, algo="naive")
    time.sleep(0.5)
    assert future.cancel()
    gave_up = time.perf_counter()
    assert client.call(25, algo="naive") == 75025
    return time.perf_counter() - gave_up


def pipelined(client: Client) -> float:
    started = time.perf_counter()
    futures = [client.submit(n % 90, algo="iter") for n in range(1000)]
    for future in futures:
        future.result()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with spawned_server(args.url, 1, options=("--naive-max-n", "40")) as server:
        with Client(args.url, queue=server.queue, timeout=60) as client:
            client.call(25, algo="naive")  # warm
            after_timeout = [timed_out(client) for _ in range(args.rounds)]
            after_cancel = [cancelled(client) for _ in range(args.rounds)]
        with (
            Client(args.url, queue=server.queue, timeout=60, window=10_000) as storm,
            Client(args.url, queue=server.queue, timeout=60, window=1000) as other,
        ):
            beside_calls, beside_cancels = [], []
            for _ in range(args.rounds):
                futures = [storm.submit(n % 90, algo="iter") for n in range(10_000)]
                beside_calls.append(pipelined(other))
                for future in futures:
                    future.result()
                futures = [storm.submit(n % 90, algo="iter") for n in range(10_000)]
                for future in futures:
                    future.cancel()
                beside_cancels.append(pipelined(other))
            messages = storm._driver.cancels_sent
    for what, times in (("timed-out", after_timeout), ("cancelled", after_cancel)):
        print(
            f"next heavy call after a {what} naive(40): median "
            f"{statistics.median(times):.2f} s, max {max(times):.2f} s"
        )
    print(
        f"1,000 pipelined calls beside 10,000 calls: median "
        f"{statistics.median(beside_calls) * 1000:.0f} ms answered, "
        f"{statistics.median(beside_cancels) * 1000:.0f} ms cancelled ({messages} cancel "
        f"messages for {args.rounds * 10_000:,} cancelled calls)"
    )


if __name__ == "__main__":
    main()
