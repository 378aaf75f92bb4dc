"""The client's memory under a long pipelined run with a long timeout.

    .venv/bin/python bench/soak.py [--url URL] [--calls 1000000] [--timeout 600]

One ``fibrpc serve --workers 2`` and one ``Client(timeout=600)``: ``--calls`` single calls
(n uniform in 0..90, one message each, a window of 256 in flight) through ``imap``,
every result checked. The client's resident memory (RSS, from /proc) is sampled every
tenth of the run. Memory must follow the calls in flight, not the call rate times the
timeout: after warm-up, RSS stays flat (the last sample within a few MB of the second).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from fibrpc import Client
from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL
from fibrpc.numbers import FAST_TABLE


def rss_mb() -> float:
    """This process's resident memory in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    rng = random.Random(1)
    ns = [rng.randint(0, 90) for _ in range(args.calls)]
    step = max(1, args.calls // 10)
    samples = []
    started = time.perf_counter()
    with (
        spawned_server(args.url, 2) as server,
        Client(args.url, queue=server.queue, timeout=args.timeout) as client,
    ):
        for i, value in enumerate(client.imap(ns, batch_size=1)):
            if value != FAST_TABLE[ns[i]]:
                raise SystemExit(f"wrong result for n={ns[i]}: {value}")
            if (i + 1) % step == 0:
                samples.append({"calls": i + 1, "rss_mb": round(rss_mb(), 1)})
                print(f"{i + 1:>10,} calls  RSS {samples[-1]['rss_mb']:7.1f} MB", flush=True)
    seconds = time.perf_counter() - started
    report = {
        "calls": args.calls,
        "timeout_s": args.timeout,
        "calls_per_s": round(args.calls / seconds),
        "samples": samples,
        "growth_after_warmup_mb": round(samples[-1]["rss_mb"] - samples[1]["rss_mb"], 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
