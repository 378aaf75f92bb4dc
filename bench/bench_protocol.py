"""The pure per-message work of a worker and a client, without a broker.

These set the ceiling of one worker: ``Handler.handle`` of a 1000-value batch is all the
Python a worker runs per batch message outside pika.
"""

from __future__ import annotations

import json

from pytest_benchmark.fixture import BenchmarkFixture

from fibrpc import protocol
from fibrpc.config import Limits
from fibrpc.handler import Handler
from fibrpc.kernels import FAST_TABLE_TEXT

LIMITS = Limits()
BATCH = [n % 91 for n in range(1000)]
BATCH_BODY = json.dumps({"n": BATCH, "algo": "fast"}, separators=(",", ":")).encode()
TEXTS = [FAST_TABLE_TEXT[n] for n in BATCH]
REPLY_BODY = protocol.encode_results(TEXTS)


def test_decode_request_text_single(benchmark: BenchmarkFixture) -> None:
    request = benchmark(protocol.decode_request, b"90", None, None, LIMITS)
    assert request.ns == [90]


def test_decode_request_json_single(benchmark: BenchmarkFixture) -> None:
    request = benchmark(protocol.decode_request, b'{"n":90}', protocol.JSON, None, LIMITS)
    assert request.ns == [90]


def test_decode_request_json_batch_of_1000(benchmark: BenchmarkFixture) -> None:
    request = benchmark(protocol.decode_request, BATCH_BODY, protocol.JSON, None, LIMITS)
    assert request.ns == BATCH


def test_encode_request_batch_of_1000(benchmark: BenchmarkFixture) -> None:
    """The client's side of a batch request."""
    body, content_type, _ = benchmark(protocol.encode_request, BATCH, "fast")
    assert content_type == protocol.JSON
    assert body == BATCH_BODY


def test_encode_results_of_1000(benchmark: BenchmarkFixture) -> None:
    assert benchmark(protocol.encode_results, TEXTS) == REPLY_BODY


def test_decode_reply_of_a_1000_batch(benchmark: BenchmarkFixture) -> None:
    assert benchmark(protocol.decode_reply, REPLY_BODY, protocol.JSON) == TEXTS


def test_decode_reply_and_to_int_of_a_1000_batch(benchmark: BenchmarkFixture) -> None:
    """What the client does per batch reply: decode, then an int per text."""
    from fibrpc.client import to_ints  # noqa: PLC0415 - only this benchmark needs it

    def decode() -> list[int]:
        return to_ints(protocol.decode_reply(REPLY_BODY, protocol.JSON))  # type: ignore[arg-type]

    assert benchmark(decode)[90] == int(FAST_TABLE_TEXT[90])


def test_handler_handle_text_single(benchmark: BenchmarkFixture) -> None:
    handler = Handler(LIMITS)
    reply = benchmark(handler.handle, b"90", None, None)
    assert reply.body == FAST_TABLE_TEXT[90].encode()


def test_handler_handle_batch_of_1000_fast(benchmark: BenchmarkFixture) -> None:
    handler = Handler(LIMITS)
    reply = benchmark(handler.handle, BATCH_BODY, protocol.JSON, None)
    assert reply.body == REPLY_BODY


def test_handler_handle_batch_of_1000_iter(benchmark: BenchmarkFixture) -> None:
    handler = Handler(LIMITS)
    body = json.dumps({"n": BATCH, "algo": "iter"}).encode()
    handler.handle(body, protocol.JSON, None)  # numba's kernels loaded before timing
    reply = benchmark(handler.handle, body, protocol.JSON, None)
    assert reply.body == REPLY_BODY
