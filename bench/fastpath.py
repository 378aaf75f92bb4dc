"""What fibrpc's fast path (``fibrpc.fastpath``) still buys, on and off in the same run.

    .venv/bin/python bench/fastpath.py [--url URL] [--rounds 3]

``fibrpc bench --spawn 2 --json`` once per scenario (sequential, pipelined, batched),
alternately with ``FIBRPC_FAST_PATH=1`` and ``=0`` (client and spawned server alike),
``--rounds`` times, over plaintext AMQP to ``--url`` and over TLS to a private RabbitMQ
node with a TLS listener and a throwaway CA (``tests/privatenode.py``; its version is
the machine's own RabbitMQ). Medians, and the median of the rounds' on/off ratios (calls/s
on over off; above 1 the fast path is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fibrpc.config import DEFAULT_URL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from privatenode import issue_certificate, make_ca, private_node, spare_ports

CALLS = {"sequential": 3_000, "pipelined": 20_000, "batched": 2_000_000}


def bench(url: str, scenario: str, fast: bool, extra: list[str]) -> float:
    """calls/s of one ``fibrpc bench`` scenario."""
    env = {**os.environ, "FIBRPC_FAST_PATH": "1" if fast else "0"}
    cmd = [sys.executable, "-m", "fibrpc", "bench", "--spawn", "2", "--json", "--url", url]
    cmd += ["--scenario", scenario, "--calls", str(CALLS[scenario]), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, timeout=600)
    [result] = json.loads(out.stdout)["scenarios"]
    if result["errors"]:
        raise SystemExit(f"{scenario}: {result['errors']} errors")
    return float(result["calls_per_s"])


@contextlib.contextmanager
def tls_broker() -> Iterator[tuple[str, list[str]]]:
    """A private node with a TLS listener: its amqps URL and the options to reach it."""
    with tempfile.TemporaryDirectory(prefix="fibrpc-bench-tls-") as tmp:
        root = Path(tmp) / "node" / "tls"
        root.mkdir(parents=True)
        ca = make_ca(root, "fibrpc-bench-ca")
        server = issue_certificate(
            root, "localhost", ca, usage="serverAuth", alt_names="DNS:localhost"
        )
        (port,) = spare_ports(1)
        config = "\n".join(
            [
                "listeners.tcp = none",
                f"listeners.ssl.1 = 127.0.0.1:{port}",
                f"ssl_options.cacertfile = {ca[0]}",
                f"ssl_options.certfile = {server[0]}",
                f"ssl_options.keyfile = {server[1]}",
                "ssl_options.verify = verify_none",
                "loopback_users = none",
                "",
            ]
        )
        with private_node(Path(tmp) / "node", config, prefix="fibrpc-bench-tls"):
            yield f"amqps://guest:guest@localhost:{port}/%2F", ["--tls-ca-file", str(ca[0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report: dict[str, dict[str, float]] = {}
    with tls_broker() as (tls_url, tls_extra):
        for transport, url, extra in [("plain", args.url, []), ("tls", tls_url, tls_extra)]:
            for scenario in CALLS:
                on, off, ratios = [], [], []
                for _ in range(args.rounds):
                    on.append(bench(url, scenario, True, extra))
                    off.append(bench(url, scenario, False, extra))
                    ratios.append(on[-1] / off[-1])
                report[f"{transport} {scenario}"] = {
                    "on_calls_per_s": round(statistics.median(on)),
                    "off_calls_per_s": round(statistics.median(off)),
                    "on_over_off": round(statistics.median(ratios), 2),
                }
                row = report[f"{transport} {scenario}"]
                print(f"{transport:>5} {scenario:>10}: {row}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
