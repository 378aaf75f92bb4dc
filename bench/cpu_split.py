"""Where the CPU goes: microseconds of CPU per call in the client, each worker and the broker.

Usage (from the repository, with its virtualenv)::

    .venv/bin/python bench/cpu_split.py pipelined            # 5,000 then 20,000 calls
    .venv/bin/python bench/cpu_split.py batched --calls 500000 3000000
    .venv/bin/python bench/cpu_split.py sequential --broker-pid 12345 --url amqp://...

On a 2-core machine the client, the workers and RabbitMQ share the cores, so calls/s says
little about *which* of them to make cheaper. CPU time does: it is charged to the process
that spent it, whatever else runs, so it holds up on a noisy machine where wall-clock
figures do not. This starts ``fibrpc serve --workers 2`` on a queue of its own, runs
``fibrpc bench --scenario S`` twice (N1 then N2 calls), reads each process's CPU time from
/proc before and after, and divides the difference between the two runs by N2 - N1, so
that start-up and warm-up (the same in both runs) cancel out. Checking each result
against the oracle is work per call, and counts in the client's figure.

A worker's figure is its CPU over *all* calls; each worker serves about half of them, so
the cost of one request in one worker is the sum of the two. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from fibrpc import serving
from fibrpc.config import DEFAULT_URL
from fibrpc.errors import SpawnError
from fibrpc.urls import split_urls

TICK = os.sysconf("SC_CLK_TCK")
DEFAULT_CALLS = {
    "sequential": (1_000, 4_000),
    "pipelined": (5_000, 20_000),
    "batched": (500_000, 3_000_000),
    "tasks": (50_000, 200_000),
    "threads": (20_000, 80_000),
}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children_cpu() -> float:
    """CPU time of this process's waited-for children (the bench runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def broker_pid() -> int:
    """The pid of the local RabbitMQ node's beam.smp (the only one, or fail)."""
    found = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True, check=False)
    out = found.stdout
    pids = [int(p) for p in out.split()]
    if len(pids) != 1:
        raise SystemExit(f"cpu_split: found beam.smp pids {pids}; pass --broker-pid.")
    return pids[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(DEFAULT_CALLS))
    parser.add_argument("--calls", type=int, nargs=2, metavar=("N1", "N2"))
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", ""))
    parser.add_argument("--broker-pid", type=int)
    parser.add_argument("bench_args", nargs="*", help="more fibrpc bench options, after --")
    args = parser.parse_args(argv)
    n1, n2 = args.calls or DEFAULT_CALLS[args.scenario]
    env = dict(os.environ)
    if args.url:
        env["FIBRPC_URL"] = args.url
    broker = args.broker_pid or broker_pid()
    queue = serving.private_queue("fibrpc-cpu")
    urls = split_urls(args.url) if args.url else []
    with tempfile.TemporaryDirectory(prefix="fibrpc-cpu-") as tmp:
        server = serving.start(urls, queue, log=Path(tmp) / "serve.log", workers=2)
        try:
            try:
                server.wait_ready(serving.READY_TIMEOUT)
            except SpawnError as exc:
                raise SystemExit(f"cpu_split: the server did not start: {exc}") from exc
            workers = server.worker_pids()
            pids = {"broker": broker} | {f"worker {i}": w for i, w in enumerate(workers, 1)}
            runs = []
            for calls in (n1, n2):
                before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                client_before = children_cpu()
                cmd = [sys.executable, "-m", "fibrpc", "bench", "--queue", queue]
                cmd += ["--scenario", args.scenario, "--calls", str(calls), "--no-progress"]
                done = subprocess.run(
                    [*cmd, *args.bench_args], env=env, capture_output=True, text=True, check=False
                )
                if done.returncode != 0 or "lost the connection" in done.stderr:
                    raise SystemExit(f"cpu_split: {' '.join(cmd)} failed:\n{done.stderr}")
                used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
                used["client"] = children_cpu() - client_before
                runs.append(used)
                print(done.stdout.strip())
        finally:
            server.stop(30)
            serving.delete_queue(urls or [DEFAULT_URL], queue)
    print(f"\nCPU per call, {args.scenario} (runs of {n1:,} and {n2:,} calls):")
    total = 0.0
    for name in ["client", *pids]:
        per_call = (runs[1][name] - runs[0][name]) / (n2 - n1) * 1e6
        total += per_call
        print(f"  {name:<10} {per_call:9.2f} us")
    print(f"  {'total':<10} {total:9.2f} us  (2 cores: at most {2e6 / total:,.0f} calls/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
