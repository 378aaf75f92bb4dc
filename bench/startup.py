"""One call as a whole process: ``fibrpc call 30`` against the tutorial's client.

    .venv/bin/python bench/startup.py [--url URL] [--runs 9]

Against one ``fibrpc serve --workers 1``, the two commands run alternately ``--runs``
times each, wall-clock from start to exit:

* ``python -m fibrpc call 30`` (what the ``fibrpc`` script runs);
* the tutorial's client (``../shared/baselines/tutorial_client.py 1 90``: its own
  connection, exclusive reply queue, one call, its timing printout).

Medians, and the median of the runs' ratios. ``fibrpc call`` must import nothing of the
server side (numba, numpy): see ``python -X importtime -m fibrpc call 30``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL

BASELINES = Path(__file__).resolve().parents[2] / "shared" / "baselines"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=60)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--baselines", type=Path, default=BASELINES)
    args = parser.parse_args()
    ours, theirs, ratios = [], [], []
    with spawned_server(args.url, 1) as server:
        env = {**os.environ, "FIBRPC_URL": args.url, "TUTORIAL_QUEUE": server.queue}
        fibrpc = [sys.executable, "-m", "fibrpc", "call", "30", "--queue", server.queue]
        tutorial = [sys.executable, str(args.baselines / "tutorial_client.py"), "1", "90"]
        timed(fibrpc, env)  # the first run of each warms the page cache
        timed(tutorial, env)
        for _ in range(args.runs):
            ours.append(timed(fibrpc, env))
            theirs.append(timed(tutorial, env))
            ratios.append(ours[-1] / theirs[-1])
    report = {
        "fibrpc_call_ms": round(statistics.median(ours) * 1000, 1),
        "tutorial_one_call_ms": round(statistics.median(theirs) * 1000, 1),
        "ratio": round(statistics.median(ratios), 2),
        "runs": args.runs,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
