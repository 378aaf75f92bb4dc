"""Large replies through the client against a plain pika consumer, same server, same run.

    .venv/bin/python bench/intake.py [--url URL] [--rounds 5]    # prints a table and JSON

For each reply size (1 KB to 16 MB: F(n) for n of about size / 0.209 digits), one
``fibrpc serve --workers 1`` answers from its memo (a first call fills it), and the
time of one round trip is measured for:

* ``Client.call_text(n)``: fibrpc's client, decimal text (no int conversion);
* a plain ``pika.BlockingConnection`` that publishes the tutorial's request (``b"n"``)
  with direct reply-to and waits in ``process_data_events`` for the reply.

The two alternate, ``--rounds`` times each; the figures are medians and the ratio is the
median of the rounds' ratios. Taking in a message must cost time linear in its size:
the ratio stays flat from 1 KB to 16 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

import pika

from fibrpc import Client
from fibrpc.bench import spawned_server
from fibrpc.config import DEFAULT_URL

SIZES = [1_000, 64_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000, 16_000_000]
#: Decimal digits of F(n) per unit of n: log10 of the golden ratio.
DIGITS_PER_N = 0.20898764


class PikaCaller:
    """The least a pika program does for one call: direct reply-to, one consumer."""

    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        self.body: bytes | None = None
        self.channel.basic_consume("amq.rabbitmq.reply-to", self._on_reply, auto_ack=True)

    def _on_reply(self, channel: object, method: object, props: object, body: bytes) -> None:
        self.body = body

    def call(self, n: int) -> bytes:
        self.body = None
        props = pika.BasicProperties(
            reply_to="amq.rabbitmq.reply-to", correlation_id=uuid.uuid4().hex
        )
        self.channel.basic_publish("", self.queue, str(n).encode(), props)
        while self.body is None:
            self.conn.process_data_events(time_limit=None)
        return self.body

    def close(self) -> None:
        self.conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("FIBRPC_URL", DEFAULT_URL))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    options = ("--fast-max-n", "100000000", "--max-reply-bytes", "20000000")
    options += ("--memo-bytes", str(64 << 20))
    rows = []
    with spawned_server(args.url, 1, options=options) as server:
        client = Client(args.url, queue=server.queue, timeout=120)
        plain = PikaCaller(args.url, server.queue)
        try:
            for size in SIZES:
                n = round(size / DIGITS_PER_N)
                expected = client.call_text(n)  # fills the memo
                assert plain.call(n).decode() == expected
                ours, theirs, ratios = [], [], []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    text = client.call_text(n)
                    ours.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    body = plain.call(n)
                    theirs.append(time.perf_counter() - started)
                    assert text == expected and len(body) == len(expected)
                    ratios.append(ours[-1] / theirs[-1])
                rows.append(
                    {
                        "bytes": len(expected),
                        "fibrpc_ms": round(statistics.median(ours) * 1000, 2),
                        "pika_ms": round(statistics.median(theirs) * 1000, 2),
                        "ratio": round(statistics.median(ratios), 2),
                    }
                )
        finally:
            client.close()
            plain.close()
    print(f"{'reply bytes':>12} {'fibrpc ms':>10} {'pika ms':>10} {'ratio':>6}")
    for row in rows:
        print(f"{row['bytes']:>12,} {row['fibrpc_ms']:>10} {row['pika_ms']:>10} {row['ratio']:>6}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
