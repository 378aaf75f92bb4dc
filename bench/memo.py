"""One memo per server: repeats of a large call end to end, and what the memo's store costs.

    .venv/bin/python bench/memo.py [--url URL] [--n 10000000] [--repeats 6]
    .venv/bin/python bench/memo.py --stores        # the store alone, in this process

End to end: one ``fibrpc serve --workers 2`` (``fibrpc.bench.spawned_server``), then
``Client.call_text(n)`` once (a miss: computed and memoised) and ``--repeats`` times more
(RabbitMQ alternates the workers, so half the repeats go to the worker that did not
compute it); then both workers are killed with ``kill -9`` and, once their replacements
consume, ``--repeats`` calls more: fresh workers, warm memo. Each repeat is printed as a
fraction of the first call; one memo per server means every one is a hit.

``--stores``: get and put of a 0.87 MB binary entry (F(10^7)'s magnitude) and a 2.09 MB
decimal one (its text), a 2 KB entry, and a miss, for ``fibrpc.memo.SharedMemo`` (files
on /dev/shm) and, when they are installed, the candidates it was chosen over: diskcache
(sqlite index and value files, LRU) and lmdb (no eviction of its own); then the cost of a
miss in ``FastFib`` (compute, then store) with a process's own memo and with the shared
one, for n from 10,001 to 10^7.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gmpy2

from fibrpc import Client
from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL


def end_to_end(url: str, n: int, repeats: int) -> dict[str, object]:
    with spawned_server(url, 2) as server:
        client = Client(url, queue=server.queue, timeout=120)
        try:
            started = time.perf_counter()
            expected = client.call_text(n)
            first = time.perf_counter() - started
            warm = [timed(lambda: client.call_text(n), expected) for _ in range(repeats)]
            old = set(server.worker_pids())
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pids = set(server.worker_pids())
                if len(pids) == 2 and not pids & old:
                    break
                time.sleep(0.05)
            time.sleep(1.0)  # the replacements connect and consume
            fresh = [timed(lambda: client.call_text(n), expected) for _ in range(repeats)]
        finally:
            client.close()
    return {
        "n": n,
        "first_ms": ms(first),
        "repeats_ms": [ms(t) for t in warm],
        "after_kill_ms": [ms(t) for t in fresh],
        "worst_repeat_over_first": round(max(warm + fresh) / first, 3),
    }


def timed(call: Callable[[], str], expected: str) -> float:
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    assert result == expected
    return seconds


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def median_us(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1e6, 1)


def stores() -> dict[str, object]:
    from fibrpc.memo import SharedMemo, root  # noqa: PLC0415 - end_to_end runs on older fibrpc

    f = gmpy2.fib(10**7)
    magnitude = int(f).to_bytes((f.bit_length() + 7) // 8, "little")
    text = f.digits().encode()
    small = gmpy2.fib(10_001).digits().encode()
    candidates: dict[str, tuple[Callable[[str, bytes], object], Callable[[str], object]]] = {}
    directory = Path(tempfile.mkdtemp(prefix="fibrpc-memo-bench-", dir=root()))
    shared = SharedMemo(directory / "files", 256 << 20)
    (directory / "files").mkdir()
    candidates["files (SharedMemo)"] = (shared.put, shared.get)
    try:
        import diskcache  # type: ignore[import-untyped]  # noqa: PLC0415

        cache = diskcache.Cache(
            str(directory / "diskcache"),
            size_limit=256 << 20,
            eviction_policy="least-recently-used",
        )
        candidates["diskcache"] = (cache.set, cache.get)
    except ImportError:
        pass
    try:
        import lmdb  # noqa: PLC0415

        env = lmdb.open(str(directory / "lmdb"), map_size=1 << 30, sync=False)

        def lmdb_put(key: str, value: bytes) -> None:
            with env.begin(write=True) as tx:
                tx.put(key.encode(), value)

        def lmdb_get(key: str) -> object:
            with env.begin() as tx:
                return tx.get(key.encode())

        candidates["lmdb"] = (lmdb_put, lmdb_get)
    except ImportError:
        pass
    rows: dict[str, object] = {}
    try:
        for name, (put, get) in candidates.items():
            rows[name] = measure(put, get, magnitude, text, small)
        rows["FastFib miss (compute + store), local / shared"] = miss_costs(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def measure(
    put: Callable[[str, bytes], object],
    get: Callable[[str], object],
    magnitude: bytes,
    text: bytes,
    small: bytes,
) -> dict[str, float]:
    counter = iter(range(10**9))  # a fresh key per put: a put that finds its key does nothing
    return {
        "put_0.87MB_us": median_us(lambda: put(f"m{next(counter)}", magnitude), 15),
        "put_2.09MB_us": median_us(lambda: put(f"t{next(counter) - 15}", text), 15),
        "put_2KB_us": median_us(lambda: put(f"s{next(counter) - 30}", small), 200),
        "get_0.87MB_us": median_us(lambda: get("m0"), 30),
        "get_2.09MB_us": median_us(lambda: get("t0"), 30),
        "get_2KB_us": median_us(lambda: get("s0"), 200),
        "miss_us": median_us(lambda: get("absent"), 500),
    }


def miss_costs(directory: Path) -> dict[str, str]:
    from fibrpc.kernels import FastFib  # noqa: PLC0415
    from fibrpc.memo import LocalMemo, SharedMemo  # noqa: PLC0415

    out = {}
    for n, reps in ((10_001, 200), (100_000, 30), (1_000_000, 5), (10_000_000, 3)):
        local_times, shared_times = [], []
        for k in range(reps):  # alternate, each n + k a miss in both
            local = FastFib(memo=LocalMemo(256 << 20))
            shared = FastFib(memo=SharedMemo(directory / "files", 256 << 20))
            local_times.append(median_us(lambda: local.text(n + k), 1))  # noqa: B023
            shared_times.append(median_us(lambda: shared.text(n + k), 1))  # noqa: B023
        out[str(n)] = (
            f"{statistics.median(local_times):.0f} / {statistics.median(shared_times):.0f} us"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--stores", action="store_true", help="measure the store alone")
    args = parser.parse_args()
    if args.stores:
        print(json.dumps(stores(), indent=1))
        return
    print(json.dumps(end_to_end(args.url, args.n, args.repeats), indent=1))


if __name__ == "__main__":
    main()
