"""What tracing costs the hot path: OpenTelemetry blocked, installed with no provider, and
(for the curious) an SDK provider whose exporter drops every span, in the same run.

    .venv/bin/python bench/tracing.py [--url URL] [--rounds 5] [--with-sdk]

``fibrpc bench --spawn 2 --json`` once per scenario (sequential, pipelined) and mode,
``--rounds`` times, each round starting with the next mode. A mode is a
``sitecustomize`` module put first on the ``PYTHONPATH`` of the bench and of the server
it spawns, so client and workers alike run in it:

* ``blocked``: ``sys.modules['opentelemetry'] = None``: as if the package were absent;
* ``no-provider``: ``opentelemetry.trace`` and ``opentelemetry.propagate`` imported, no
  provider set: each call and each request asks the API for the global provider (the
  case of an application that imports OpenTelemetry but never configures it);
* ``sdk`` (``--with-sdk``): an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` over
  an exporter that drops the spans: every call and request records a span.

Prints the medians, and the median of each round's ratio to ``blocked`` (calls/s; 1.00 is
no difference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fibrpc.config import DEFAULT_URL

CALLS = {"sequential": 3_000, "pipelined": 20_000}

MODES = {
    "blocked": "import sys\nsys.modules['opentelemetry'] = None\n",
    "no-provider": "import opentelemetry.propagate, opentelemetry.trace\n",
    "sdk": (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, "
        "SpanExportResult\n"
        "class Drop(SpanExporter):\n"
        "    def export(self, spans):\n"
        "        return SpanExportResult.SUCCESS\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(BatchSpanProcessor(Drop()))\n"
        "trace.set_tracer_provider(provider)\n"
    ),
}


def bench(url: str, scenario: str, site: Path) -> float:
    """calls/s of one ``fibrpc bench`` scenario, client and server run with ``site``."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("OTEL_TRACES_EXPORTER", None)
    cmd = [sys.executable, "-m", "fibrpc", "bench", "--spawn", "2", "--json", "--url", url]
    cmd += ["--scenario", scenario, "--calls", str(CALLS[scenario])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=600)
    [result] = json.loads(out.stdout)["scenarios"]
    if result["errors"]:
        raise SystemExit(f"{scenario}: {result['errors']} errors")
    return float(result["calls_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--with-sdk", action="store_true")
    args = parser.parse_args()
    modes = [m for m in MODES if m != "sdk" or args.with_sdk]
    report: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fibrpc-bench-tracing-") as tmp:
        sites = {}
        for mode in modes:
            sites[mode] = Path(tmp) / mode
            sites[mode].mkdir()
            (sites[mode] / "sitecustomize.py").write_text(MODES[mode])
        for scenario in CALLS:
            runs: dict[str, list[float]] = {mode: [] for mode in modes}
            ratios: dict[str, list[float]] = {mode: [] for mode in modes[1:]}
            for round_ in range(args.rounds):
                # Each round starts with the next mode: no mode always runs first.
                for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
                    runs[mode].append(bench(args.url, scenario, sites[mode]))
                for mode in modes[1:]:
                    ratios[mode].append(runs[mode][-1] / runs["blocked"][-1])
            row: dict[str, float] = {m: round(statistics.median(r)) for m, r in runs.items()}
            for mode, values in ratios.items():
                row[f"{mode}/blocked"] = round(statistics.median(values), 3)
                row[f"{mode}/blocked range"] = f"{min(values):.2f}-{max(values):.2f}"  # type: ignore[assignment]
            report[scenario] = row
            print(f"{scenario:>10}: {row}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
