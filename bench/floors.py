"""The issue's other floors, measured in one run against fresh servers on one broker.

    .venv/bin/python bench/floors.py [--url URL]      # prints one JSON document

* ready: seconds from starting ``fibrpc serve --workers 2`` to its "ready:" line, with
  numba's cache warm (a first start fills it);
* memory: resident (RSS) and unique (USS: private pages) memory of the supervisor and
  each worker, from /proc, once ready;
* compute-bound scaling: naive n=27 requests, one message each, through 1 worker and then
  2 workers (ratio of calls/s), three rounds;
* large n: ``fast`` F(10^6) end to end (``Client.call_text``) on a fresh server, against
  ``gmpy2.fib(10**6).digits()`` in this process; then the same call again (a memo hit);
  three fresh servers.

Figures from a few seconds of work move with whatever else the machine runs, so each is
measured in three rounds and reported with its median; a ratio is the median of the
rounds' ratios (each round's two figures are measured back to back). Every server is
stopped afterwards; every result is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import gmpy2

from fibrpc import Client
from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL
from fibrpc.kernels import FAST_TABLE

ROUNDS = 3


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MB: resident pages, and the private ones only this process holds."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields["Rss"] / 1024, uss / 1024


def naive_rate(url: str, workers: int, calls: int = 60) -> float:
    with spawned_server(url, workers) as server, Client(url, queue=server.queue, timeout=120) as c:
        c.call(27, algo="naive")  # warm
        started = time.perf_counter()
        results = c.map([27] * calls, algo="naive", batch_size=1)
        seconds = time.perf_counter() - started
    assert results == [FAST_TABLE[27]] * calls
    return calls / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    args = parser.parse_args()
    url = args.url
    out: dict[str, object] = {}

    with spawned_server(url, 2):
        pass  # fills numba's cache if it is cold
    ready = []
    for _ in range(3):
        started = time.monotonic()
        with spawned_server(url, 2) as server:
            ready.append(time.monotonic() - started)
            if len(ready) == 3:
                time.sleep(0.5)
                out["memory_mb"] = {
                    "supervisor": memory_mb(server.pid),
                    "workers": [memory_mb(pid) for pid in server.worker_pids()],
                }
    out["ready_s"] = {"runs": [round(r, 3) for r in ready], "median": statistics.median(ready)}

    rounds = [(naive_rate(url, 1), naive_rate(url, 2)) for _ in range(ROUNDS)]
    out["naive27"] = {
        "one_worker": [round(one, 1) for one, _ in rounds],
        "two_workers": [round(two, 1) for _, two in rounds],
        "ratios": [round(two / one, 2) for one, two in rounds],
        "ratio": round(statistics.median(two / one for one, two in rounds), 2),
    }

    local = []
    for _ in range(3):
        started = time.perf_counter()
        digits = gmpy2.fib(10**6).digits()
        local.append(time.perf_counter() - started)
    colds, hits = [], []
    for _ in range(ROUNDS):
        with (
            spawned_server(url, 1) as server,
            Client(url, queue=server.queue, timeout=60) as client,
        ):
            client.call(10)
            started = time.perf_counter()
            first = client.call_text(10**6)
            colds.append(time.perf_counter() - started)
            for _ in range(5):
                started = time.perf_counter()
                again = client.call_text(10**6)
                hits.append(time.perf_counter() - started)
        assert first == again == digits
    cold, hit = statistics.median(colds), statistics.median(hits)
    out["fib_1e6"] = {
        "local_ms": round(min(local) * 1e3, 2),
        "end_to_end_first_ms": [round(c * 1e3, 2) for c in colds],
        "ratio_to_local": round(cold / min(local), 2),
        "memo_hit_ms": round(hit * 1e3, 2),
        "hit_over_first": round(hit / cold, 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
