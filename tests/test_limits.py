"""Every limit on a request is configurable, documented, and named when a request breaks it;
and a worker's memory stays bounded under a flood of distinct large requests.

The limits: the body's size (``--max-body-bytes``), a batch's length (``--max-batch``),
the largest n of ``naive`` and ``fast`` (``--naive-max-n``, ``--fast-max-n``; ``iter``'s
93 is fixed by 64 bits), the size of one reply (``--max-reply-bytes``) and the bytes of
results a worker remembers (``--memo-bytes``).
"""

from __future__ import annotations

import json
import random
import time
import uuid
from pathlib import Path
from typing import Any

import gmpy2
import pika
import pytest
from conftest import URL, run_cli
from rawclient import DIRECT, RawClient

from fibrpc.kernels import estimate_digits

JSON = "application/json"

#: Each limit, its option, and its environment variable: small values, so that a request
#: just under every limit is quick and one just over it is cheap to build.
LIMITS = {
    "--max-body-bytes": ("FIBRPC_MAX_BODY_BYTES", 1000),
    "--max-batch": ("FIBRPC_MAX_BATCH", 10),
    "--naive-max-n": ("FIBRPC_NAIVE_MAX_N", 20),
    "--fast-max-n": ("FIBRPC_FAST_MAX_N", 5000),
    "--max-reply-bytes": ("FIBRPC_MAX_REPLY_BYTES", 3000),
}


def fib(n: int) -> str:
    return str(gmpy2.fib(n).digits())


def batch(ns: list[int], algo: str = "fast") -> bytes:
    return json.dumps({"n": ns, "algo": algo}).encode()


# Each row: the limit, a request just within it with its reply (the body of a text reply,
# the document of a JSON one), and a request just
# over it with its error code and the sizes its message must name.
F5000 = fib(5000)  # 1,045 digits: two of them fit a reply limit of 3,000 bytes, three do not
CASES = [
    (
        "--max-body-bytes",
        (b"0" * 999 + b"7", {}, b"13"),  # 1,000 bytes: leading zeros do not make n larger
        (b"0" * 1000 + b"7", {}, "body_too_large", ["1,001 bytes", "1,000 bytes"]),
    ),
    (
        "--max-batch",
        (batch([7] * 10), {"content_type": JSON}, {"results": ["13"] * 10}),
        (batch([7] * 11), {"content_type": JSON}, "batch_too_large", ["11 values", "10"]),
    ),
    (
        "--naive-max-n",
        (b"20", {"type": "naive"}, b"6765"),
        (b"21", {"type": "naive"}, "out_of_range", ["21", "20"]),
    ),
    (
        "--fast-max-n",
        (b"5000", {}, F5000.encode()),
        (b"5001", {}, "out_of_range", ["5001", "5,000"]),
    ),
    (
        "--max-reply-bytes",
        (batch([5000] * 2), {"content_type": JSON}, {"results": [F5000] * 2}),
        (batch([5000] * 3), {"content_type": JSON}, "reply_too_large", ["3,000 bytes"]),
    ),
]


@pytest.mark.parametrize("how", ["options", "environment"])
def test_every_limit_is_configurable_and_a_request_over_it_is_refused_naming_it(serve, queue, how):
    if how == "options":
        server = serve(*[str(a) for option, (_, v) in LIMITS.items() for a in (option, v)])
    else:
        server = serve(env={var: str(value) for var, value in LIMITS.values()})
    raw = RawClient(URL, queue)
    try:
        sent = []
        for option, within, over in CASES:
            body, props, answer = within
            sent.append((option, raw.publish(body, **props), answer))
            body, props, code, sizes = over
            sent.append((option, raw.publish(body, **props), (code, sizes)))
        raw.wait(len(sent))
        for option, corr_id, expected in sent:
            props, body = raw.reply(corr_id)
            if isinstance(expected, tuple):
                code, sizes = expected
                error = json.loads(body)["error"]
                assert error["code"] == code, (option, error)
                for text in [option, *sizes]:
                    assert text in error["message"], (option, text, error["message"])
            elif isinstance(expected, bytes):
                assert body == expected, (option, body[:200])
            else:
                assert json.loads(body) == expected, (option, body[:200])
    finally:
        raw.close()
    assert "died" not in server.text


def test_every_limit_has_an_option_and_an_environment_variable_in_help_and_the_docs():
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    readme = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    for option, (variable, _) in {**LIMITS, "--memo-bytes": ("FIBRPC_MEMO_BYTES", 0)}.items():
        assert option in result.stdout
        assert variable in result.stdout
        assert option in readme


# -- memory under a flood --------------------------------------------------------------

MEMO_BYTES = 8_000_000
FLOOD = 2000  # distinct n, each answer 20,900 to 62,700 digits: about 84 MB in all
#: Peak memory a worker may gain beyond its memo: the requests it holds at once (its
#: prefetch, 64) each cost their reply about three times over while in flight (GMP's
#: text, the reply's bytes, the frame being written): 64 x 63 KB x 3 is 12 MB, plus
#: malloc's slack. With --memo-bytes 0 the same flood measures under 3 MB.
ALLOWANCE = 16_000_000
#: Once the memo is full, a flood as large again may not raise the peak by more than this.
PLATEAU = 8_000_000


def peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


class Flooder:
    """Asks for F(n) of many n at once and checks the length of each answer as it arrives,
    without keeping the answers (the test's own memory is not the point)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.conn = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.conn.channel()
        self.lengths: dict[str, int] = {}
        self.channel.basic_consume(DIRECT, self._on_reply, auto_ack=True)

    def _on_reply(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.lengths[props.correlation_id] = len(body) if body.isdigit() else -1

    def run(self, ns: list[int], timeout: float = 60.0) -> None:
        self.lengths.clear()
        sent = {}
        for n in ns:
            corr_id = uuid.uuid4().hex
            properties = pika.BasicProperties(reply_to=DIRECT, correlation_id=corr_id)
            self.channel.basic_publish("", self.queue, str(n).encode(), properties)
            sent[corr_id] = n
        deadline = time.monotonic() + timeout
        while len(self.lengths) < len(ns) and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.1)
        assert len(self.lengths) == len(ns), f"{len(ns) - len(self.lengths)} unanswered"
        for corr_id, n in sent.items():  # F(n) has one or two digits fewer than the bound
            assert estimate_digits(n) - 2 <= self.lengths[corr_id] <= estimate_digits(n), n

    def close(self) -> None:
        self.conn.close()


def test_a_flood_of_distinct_large_requests_leaves_a_workers_peak_memory_within_its_memo(
    serve, queue
):
    server = serve("--memo-bytes", str(MEMO_BYTES), workers=1)
    [worker] = server.worker_pids()
    ns = random.Random(20).sample(range(100_000, 300_001), FLOOD)
    total = sum(estimate_digits(n) for n in ns)
    flooder = Flooder(queue)
    try:
        flooder.run([99_999, 99_998])  # every code path warm before the first reading
        before = peak_rss(worker)
        started = time.monotonic()
        flooder.run(ns[: FLOOD // 2])
        half = peak_rss(worker)
        flooder.run(ns[FLOOD // 2 :])
        after = peak_rss(worker)
        seconds = time.monotonic() - started
    finally:
        flooder.close()
    mb = 1e6
    print(
        f"\nflood: {FLOOD:,} distinct n in 100,000..300,000, {total / mb:.1f} MB of results "
        f"in {seconds:.1f} s; --memo-bytes {MEMO_BYTES / mb:.0f} MB; worker peak RSS "
        f"{before / mb:.1f} MB before, {half / mb:.1f} MB after half, {after / mb:.1f} MB "
        f"after all: +{(after - before) / mb:.1f} MB (bound {(MEMO_BYTES + ALLOWANCE) / mb:.0f} "
        f"MB), +{(after - half) / mb:.1f} MB in the second half"
    )
    assert total > 3 * (MEMO_BYTES + ALLOWANCE)  # so that the bound means something
    assert after - before < MEMO_BYTES + ALLOWANCE
    assert after - half < PLATEAU
    assert server.worker_pids() == [worker]
