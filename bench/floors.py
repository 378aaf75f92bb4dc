"""The issue's other floors, measured in one run against fresh servers on one broker.

    .venv/bin/python bench/floors.py [--url URL]      # prints one JSON document

* ready: seconds from starting ``fibrpc serve --workers 2`` to its "ready:" line, with
  numba's cache warm (a first start fills it);
* memory: resident (RSS) and unique (USS: private pages) memory of the supervisor and
  each worker, from /proc, once ready;
* compute-bound scaling: naive n=27 requests, one message each, through 1 worker and then
  2 workers (ratio of calls/s);
* large n: ``fast`` F(10^6) end to end (``Client.call_text``) on a fresh server, against
  ``gmpy2.fib(10**6).digits()`` in this process; then the same call again (a memo hit).

Every server is stopped afterwards; every result is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import gmpy2

from fibrpc import Client
from fibrpc.config import DEFAULT_URL
from fibrpc.kernels import FAST_TABLE


class Server:
    """A ``fibrpc serve`` subprocess on a private queue."""

    def __init__(self, url: str, workers: int) -> None:
        self.queue = f"fibrpc-floors-{uuid.uuid4().hex[:8]}"
        self.log = Path(tempfile.mkstemp(suffix=".log")[1])
        self.started = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fibrpc",
                    "serve",
                    "--url",
                    url,
                    "--queue",
                    self.queue,
                    "--workers",
                    str(workers),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = self.started + 60
        while "ready:" not in self.log.read_text():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(self.log.read_text()[-2000:])
            time.sleep(0.005)
        self.ready_after = time.monotonic() - self.started

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.unlink(missing_ok=True)


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MB: resident pages, and the private ones only this process holds."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:]}
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields["Rss"] / 1024, uss / 1024


def naive_rate(url: str, workers: int, calls: int = 60) -> float:
    server = Server(url, workers)
    try:
        with Client(url, queue=server.queue, timeout=120) as client:
            client.call(27, algo="naive")  # warm
            started = time.perf_counter()
            results = client.map([27] * calls, algo="naive", batch_size=1)
            seconds = time.perf_counter() - started
        assert results == [FAST_TABLE[27]] * calls
        return calls / seconds
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    args = parser.parse_args()
    url = args.url
    out: dict[str, object] = {}

    Server(url, 2).stop()  # fills numba's cache if it is cold
    ready = []
    for _ in range(3):
        server = Server(url, 2)
        ready.append(server.ready_after)
        if len(ready) == 3:
            time.sleep(0.5)
            out["memory_mb"] = {
                "supervisor": memory_mb(server.proc.pid),
                "workers": [memory_mb(pid) for pid in server.pids()],
            }
        server.stop()
    out["ready_s"] = {"runs": [round(r, 3) for r in ready], "median": statistics.median(ready)}

    one, two = naive_rate(url, 1), naive_rate(url, 2)
    out["naive27"] = {
        "one_worker": round(one, 1),
        "two_workers": round(two, 1),
        "ratio": round(two / one, 2),
    }

    local = []
    for _ in range(3):
        started = time.perf_counter()
        digits = gmpy2.fib(10**6).digits()
        local.append(time.perf_counter() - started)
    server = Server(url, 1)
    try:
        with Client(url, queue=server.queue, timeout=60) as client:
            client.call(10)
            started = time.perf_counter()
            first = client.call_text(10**6)
            cold = time.perf_counter() - started
            hits = []
            for _ in range(5):
                started = time.perf_counter()
                again = client.call_text(10**6)
                hits.append(time.perf_counter() - started)
    finally:
        server.stop()
    assert first == again == digits
    out["fib_1e6"] = {
        "local_ms": round(min(local) * 1e3, 2),
        "end_to_end_first_ms": round(cold * 1e3, 2),
        "ratio_to_local": round(cold / min(local), 2),
        "memo_hit_ms": round(statistics.median(hits) * 1e3, 2),
        "hit_over_first": round(statistics.median(hits) / cold, 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
