"""A computation longer than RabbitMQ's consumer timeout, on a private node of one line.

    .venv/bin/python bench/consumer_timeout.py --line trixie                  # 4.0, ~2 min
    .venv/bin/python bench/consumer_timeout.py --line sid --queue-type quorum  # 4.3

Starts a private RabbitMQ node (``tests/privatenode.py``; the roots are built by
``scripts/dev.sh test``) whose ``consumer_timeout`` is ``--timeout-ms`` (5,000), one
``fibrpc serve --workers 1 --naive-max-n 45`` on it, and times ``fibrpc call N --algo
naive`` (N 44: about 100 s of naive recursion here), then prints how the broker ended
the deliveries it timed out (the worker's log lines) and whether the call was answered.
Not a test: on 4.0 the broker checks the timeout once a minute.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from privatenode import deny_deprecated, private_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", choices=["trixie", "sid"], default="trixie")
    parser.add_argument("--queue-type", choices=["classic", "quorum"], default="classic")
    parser.add_argument("--timeout-ms", type=int, default=5_000)
    parser.add_argument("--n", type=int, default=44)
    args = parser.parse_args()
    fibrpc = str(Path(sys.executable).with_name("fibrpc"))
    config = deny_deprecated(args.line) + f"consumer_timeout = {args.timeout_ms}\n"
    with (
        tempfile.TemporaryDirectory(prefix="fibrpc-ct-") as root,
        private_node(Path(root) / "node", config, prefix="fibrpc-ct", version=args.line) as node,
        tempfile.TemporaryFile("w+") as log,
    ):
        url, version = node.url(), node.server_version()
        where = ["--url", url, "--queue", "ct"]
        kind = ["--queue-type", args.queue_type]
        serve = subprocess.Popen(
            [fibrpc, "serve", "--workers", "1", "--naive-max-n", "45", *where, *kind],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(5)  # ready
            started = time.monotonic()
            call = subprocess.run(
                [fibrpc, "call", str(args.n), "--algo", "naive", *where, "--timeout", "400"],
                capture_output=True,
                text=True,
                check=False,
            )
            took = time.monotonic() - started
        finally:
            serve.terminate()
            serve.wait(300)
        log.seek(0)
        lines = log.read().splitlines()
    print(f"RabbitMQ {version}, {args.queue_type} queue, consumer_timeout {args.timeout_ms} ms")
    for line in lines:
        if "WARNING" in line or "stopped:" in line:
            print("  " + line[:300])
    print(f"fibrpc call {args.n} --algo naive: exit {call.returncode} after {took:.1f} s")
    print("  " + (call.stdout or call.stderr).strip()[:300])


if __name__ == "__main__":
    main()
