"""How far the independent callers' figures can go in CPython on this machine, with no
broker, no encoding and no fibrpc: the floor under ``fibrpc bench --scenario threads``
and ``--scenario tasks`` (issue #23).

    .venv/bin/python bench/bounds.py [--seconds 3]

* ``threads``: 32 threads each make blocking calls that a second thread answers, the way
  ``Client.call`` hands a call to the I/O thread: append to a locked deque, wake the
  answerer through a pipe (pika's ``wake``), wait on a lock of its own, which the
  answerer releases. What it costs is thread switches and the GIL's hand-overs.
* ``tasks``: 2,000 asyncio tasks each await calls that a second thread answers in
  batches, the way ``AsyncClient`` does: a future per call, the calls made in one turn
  of the loop handed over at once, a batch resolved with one ``call_soon_threadsafe``.

Each prints calls/s and the process's CPU seconds (user + system) per second of run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import resource
import select
import threading
import time
from typing import Any

THREADS = 32
TASKS = 2000


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def threads(seconds: float) -> tuple[float, float]:
    """Calls/s of ``THREADS`` threads, and the CPU seconds per second they took."""
    outbox: collections.deque[threading.Lock] = collections.deque()
    guard = threading.Lock()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    stop = time.monotonic() + seconds
    done = threading.Event()
    counts = [0] * THREADS

    def answerer() -> None:
        while not done.is_set():
            select.select([wake_r], [], [], 0.05)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            with guard:
                batch = list(outbox)
                outbox.clear()
            for waiter in batch:
                waiter.release()

    def caller(index: int) -> None:
        mine = threading.Lock()
        while time.monotonic() < stop:
            mine.acquire()
            with guard:
                first = not outbox
                outbox.append(mine)
            if first:
                os.write(wake_w, b"x")
            mine.acquire(timeout=1)
            mine.release()
            counts[index] += 1

    serving = threading.Thread(target=answerer)
    serving.start()
    callers = [threading.Thread(target=caller, args=(i,)) for i in range(THREADS)]
    started, cpu = time.monotonic(), _cpu()
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    elapsed, used = time.monotonic() - started, _cpu() - cpu
    done.set()
    serving.join()
    os.close(wake_r)
    os.close(wake_w)
    return sum(counts) / elapsed, used / elapsed


def tasks(seconds: float) -> tuple[float, float]:
    """Calls/s of ``TASKS`` tasks, and the CPU seconds per second they took."""

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        made: list[tuple[asyncio.Future[int], int]] = []
        box: collections.deque[tuple[asyncio.Future[int], int]] = collections.deque()
        ready = threading.Condition()
        stop = time.monotonic() + seconds
        done = threading.Event()
        count = 0

        def answerer() -> None:
            while not done.is_set():
                with ready:
                    ready.wait_for(lambda: box or done.is_set(), 0.05)
                    batch = list(box)
                    box.clear()
                if batch:
                    loop.call_soon_threadsafe(resolve, batch)

        def resolve(batch: list[tuple[asyncio.Future[int], int]]) -> None:
            for future, n in batch:
                if not future.done():
                    future.set_result(n)

        def hand_over() -> None:
            with ready:
                box.extend(made)
                ready.notify()
            made.clear()

        async def call(n: int) -> int:
            future = loop.create_future()
            if not made:
                loop.call_soon(hand_over)
            made.append((future, n))
            answer: int = await future
            return answer

        async def caller(n: int) -> None:
            nonlocal count
            while time.monotonic() < stop:
                assert await call(n) == n
                n += 1
                count += 1

        serving = threading.Thread(target=answerer)
        serving.start()
        started, cpu = time.monotonic(), _cpu()
        await asyncio.gather(*(caller(i) for i in range(TASKS)))
        elapsed, used = time.monotonic() - started, _cpu() - cpu
        done.set()
        serving.join()
        return count / elapsed, used / elapsed

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    scenarios: dict[str, Any] = {f"{THREADS} threads": threads, f"{TASKS:,} tasks": tasks}
    for name, run in scenarios.items():
        rate, cores = run(args.seconds)
        print(f"{name:<12} {rate:>10,.0f} calls/s  {cores:.2f} CPU s per s (no broker)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
