"""fibrpc beside the baselines, on one broker, in one go: the figures bench/README.md quotes.

Usage (from the repository, with its virtualenv)::

    .venv/bin/python bench/compare.py              # one round, about a minute
    .venv/bin/python bench/compare.py --rounds 3   # three rounds, and the median of each figure

Each round runs, one after the other so that they never share the CPUs:

1. ``tutorial_server.py --iter`` (one server, prefetch 1) and ``tutorial_client.py 3000 90``;
2. two ``raw_pipeline.py serve 64`` and ``raw_pipeline.py call 20000 90 128``;
3. two ``raw_batched.py serve Q`` and ``raw_batched.py call Q 2000000 1000 8``;
4. ``fibrpc bench --spawn 2 --json --window 128 --batch-window 8``, once per scenario
   (``--scenario S --calls N``), with the baselines' counts: ``batched`` at fibrpc's own
   batch size (the client's automatic one, 10,000 a message), and once more at the
   probe's 1,000 a message (``batched_1000``); then the independent callers of issue
   #23, ``tasks`` (2,000 asyncio tasks each awaiting single calls) and ``threads`` (32
   threads each calling ``Client.call``), whose calls the clients coalesce.

The baselines come from ``$(dirname repo)/shared/baselines`` (``--baselines`` overrides).
Every queue but ``raw_rpc`` (hard-coded in raw_pipeline.py) is named for this run, and
all are deleted at the end. Every process started here runs in a process group of its
own and is stopped (SIGTERM, then SIGKILL to the group) when its step ends, and again at
exit, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika

from fibrpc.bench import signals_as_exit

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO.parent / "shared" / "baselines"
BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"
RAW_PIPELINE_QUEUE = "raw_rpc"


class Processes:
    """Every process this script started, so that each can be stopped, and all at exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Path:
        """Start ``cmd`` in a session of its own, its output in a log; return the log."""
        log = self.logs / f"{name}-{len(self.running)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.running.append(proc)
        return log

    def stop_all(self) -> None:
        """SIGTERM every process group, wait a little, then SIGKILL what is left."""
        for proc in self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for proc in self.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.running.clear()


def consumers(queue: str) -> int | None:
    """Consumers on ``queue``, or None when it does not exist."""
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def wait_for_consumers(queue: str, count: int, logs: list[Path], timeout: float = 30) -> None:
    """Block until ``count`` servers consume ``queue``; fail with their logs if they don't."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (consumers(queue) or 0) >= count:
            return
        time.sleep(0.1)
    tails = "\n".join(f"{log}:\n{log.read_text(errors='replace')[-1500:]}" for log in logs)
    raise SystemExit(f"compare: {count} consumer(s) on {queue!r} never appeared.\n{tails}")


def delete_queues(*queues: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(BROKER))
    try:
        for queue in queues:
            with contextlib.suppress(Exception):
                conn.channel().queue_delete(queue)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a client to completion and return its stdout; exit with its output if it fails."""
    print(f"  $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"compare: {cmd} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    if "lost the connection" in done.stderr:
        raise SystemExit(f"compare: the broker dropped a connection during {cmd}; run again.")
    return done.stdout


def field(text: str, name: str) -> float:
    """The number after ``name=`` in a baseline's output line."""
    match = re.search(rf"\b{re.escape(name)}=([0-9.]+)", text)
    if match is None:
        raise SystemExit(f"compare: no {name}= in {text!r}")
    return float(match.group(1))


def one_round(args: argparse.Namespace, procs: Processes, tag: str) -> dict[str, dict[str, float]]:
    """Run every system once; return {system: {figure: value}}."""
    py = sys.executable
    base = args.baselines
    figures: dict[str, dict[str, float]] = {}

    tutorial_queue = f"bench-tutorial-{tag}"
    env = {"TUTORIAL_QUEUE": tutorial_queue}
    log = procs.start("tutorial-server", [py, str(base / "tutorial_server.py"), "--iter"], env)
    wait_for_consumers(tutorial_queue, 1, [log])
    out = run([py, str(base / "tutorial_client.py"), str(args.sequential), "90"], env)
    figures["tutorial"] = {k: field(out, k) for k in ("calls/s", "p50_ms", "p99_ms")}
    procs.stop_all()

    if consumers(RAW_PIPELINE_QUEUE):
        raise SystemExit(f"compare: queue {RAW_PIPELINE_QUEUE!r} already has consumers.")
    logs = [procs.start("raw-pipeline", [py, str(base / "raw_pipeline.py"), "serve", "64"])]
    logs += [procs.start("raw-pipeline", [py, str(base / "raw_pipeline.py"), "serve", "64"])]
    wait_for_consumers(RAW_PIPELINE_QUEUE, 2, logs)
    out = run([py, str(base / "raw_pipeline.py"), "call", str(args.pipelined), "90", "128"])
    figures["raw_pipeline"] = {k: field(out, k) for k in ("calls/s", "p50_ms", "p99_ms")}
    procs.stop_all()

    batched_queue = f"bench-raw-batched-{tag}"
    cmd = [py, str(base / "raw_batched.py"), "serve", batched_queue]
    logs = [procs.start("raw-batched", cmd), procs.start("raw-batched", cmd)]
    wait_for_consumers(batched_queue, 2, logs)
    out = run(
        [py, str(base / "raw_batched.py"), "call", batched_queue, str(args.batched), "1000", "8"]
    )
    figures["raw_batched"] = {"calls/s": field(out, "calls/s")}
    procs.stop_all()

    runs = [("sequential", args.sequential, []), ("pipelined", args.pipelined, [])]
    runs += [
        ("batched", args.batched, []),
        ("batched_1000", args.batched, ["--batch-size", "1000"]),
        ("tasks", args.tasks, []),
        ("threads", args.threads, []),
    ]
    for name, calls, extra in runs:
        scenario = name.partition("_")[0]
        out = run(
            [
                *(py, "-m", "fibrpc", "bench", "--spawn", "2", "--json", "--no-progress"),
                *("--scenario", scenario, "--calls", str(calls), "--max-n", "90"),
                *("--window", "128", "--batch-window", "8", *extra),
            ],
            {"FIBRPC_URL": BROKER},
        )
        (result,) = json.loads(out)["scenarios"]
        if result["errors"]:
            raise SystemExit(f"compare: fibrpc bench counted errors: {result}")
        figures[f"fibrpc_{name}"] = {
            "calls/s": result["calls_per_s"],
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
        }
    delete_queues(tutorial_queue, RAW_PIPELINE_QUEUE, batched_queue)
    return figures


RATIOS = (
    ("fibrpc batched / tutorial", "fibrpc_batched", "tutorial", "calls/s"),
    ("fibrpc batched / raw_batched", "fibrpc_batched", "raw_batched", "calls/s"),
    ("fibrpc batched at 1,000 / raw_batched", "fibrpc_batched_1000", "raw_batched", "calls/s"),
    ("fibrpc pipelined / tutorial", "fibrpc_pipelined", "tutorial", "calls/s"),
    ("fibrpc pipelined / raw_pipeline", "fibrpc_pipelined", "raw_pipeline", "calls/s"),
    ("fibrpc sequential / tutorial", "fibrpc_sequential", "tutorial", "calls/s"),
    ("fibrpc sequential p50 / tutorial p50", "fibrpc_sequential", "tutorial", "p50_ms"),
    ("fibrpc tasks / raw_pipeline", "fibrpc_tasks", "raw_pipeline", "calls/s"),
    ("fibrpc threads / raw_pipeline", "fibrpc_threads", "raw_pipeline", "calls/s"),
)


def median_figures(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        system: {k: statistics.median(r[system][k] for r in rounds) for k in rounds[0][system]}
        for system in rounds[0]
    }


def ratios(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every ratio of ``RATIOS`` for one round's figures."""
    return {name: figures[a][key] / figures[b][key] for name, a, b, key in RATIOS}


def print_tables(
    figures: dict[str, dict[str, float]], title: str, shown: dict[str, float] | None = None
) -> None:
    """The figures, then the ratios (``shown``, or those of ``figures``)."""
    print(f"\n{title}")
    print(f"{'system':<20} {'calls/s':>12} {'p50 ms':>9} {'p99 ms':>9}")
    for system, f in figures.items():
        p50 = f"{f['p50_ms']:.3f}" if "p50_ms" in f else "-"
        p99 = f"{f['p99_ms']:.3f}" if "p99_ms" in f else "-"
        print(f"{system:<20} {f['calls/s']:>12,.0f} {p50:>9} {p99:>9}")
    print(f"\n{'ratio':<38} {'value':>8}")
    for name, value in (shown or ratios(figures)).items():
        print(f"{name:<38} {value:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baselines", type=Path, default=BASELINES)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sequential", type=int, default=3_000)
    parser.add_argument("--pipelined", type=int, default=20_000)
    parser.add_argument("--batched", type=int, default=2_000_000)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=50_000)
    parser.add_argument("--json", type=Path, help="also write every round's figures here")
    args = parser.parse_args(argv)
    if not (args.baselines / "tutorial_server.py").exists():
        parser.error(f"no baselines in {args.baselines}; pass --baselines DIR")
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="fibrpc-compare-") as tmp, signals_as_exit():
        procs = Processes(Path(tmp))
        tag = uuid.uuid4().hex[:8]
        try:
            for i in range(args.rounds):
                print(f"round {i + 1} of {args.rounds}", file=sys.stderr, flush=True)
                load_before = os.getloadavg()[0]
                rounds.append(one_round(args, procs, tag))
                load_after = os.getloadavg()[0]
                print_tables(rounds[-1], f"round {i + 1}")
                # Another busy process on a 2-core machine moves every figure: say so.
                print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
        finally:
            procs.stop_all()
            with contextlib.suppress(Exception):
                delete_queues(f"bench-tutorial-{tag}", f"bench-raw-batched-{tag}")
    if args.rounds > 1:
        # Each ratio is taken within a round (same conditions), then the median over rounds.
        per_round = [ratios(r) for r in rounds]
        median_ratios = {k: statistics.median(r[k] for r in per_round) for k in per_round[0]}
        title = f"median of {args.rounds} rounds (ratios: median of each round's ratio)"
        print_tables(median_figures(rounds), title, median_ratios)
    if args.json:
        document: dict[str, Any] = {"rounds": rounds}
        args.json.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
