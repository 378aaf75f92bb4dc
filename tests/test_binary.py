"""The binary form of results (docs/protocol.md), both ways: what a server writes when a
request names the forms its client reads, what fibrpc's client reads, and that a client
which does not ask gets today's replies byte for byte."""

from __future__ import annotations

import json
import struct

import gmpy2
import pika
import pytest
from conftest import URL
from hypothesis import given
from hypothesis import strategies as st
from rawclient import RawClient
from test_client import StandIn

from fibrpc import Client, RequestError
from fibrpc.config import Limits
from fibrpc.handler import Handler
from fibrpc.kernels import FAST_TABLE
from fibrpc.protocol import (
    ACCEPT_BINARY,
    ACCEPT_HEADER,
    INTS,
    JSON,
    U64,
    binary_forms,
    decode_values,
    encode_magnitudes,
    encode_request,
    encode_values,
    magnitude,
)

BOTH = (U64, INTS)

# -- the codec ---------------------------------------------------------------------------


def test_the_worked_example_of_the_protocol_docs_holds_byte_for_byte():
    # docs/protocol.md: F(10), F(90) in U64; F(100) alone in INTS.
    body, kind = encode_values([FAST_TABLE[10], FAST_TABLE[90]], BOTH)
    assert kind == U64
    assert body.hex(" ") == "37 00 00 00 00 00 00 00 78 78 ba a1 da 0d f8 27"
    body, kind = encode_magnitudes([magnitude(int(gmpy2.fib(100)))], BOTH)
    assert kind == INTS
    assert body.hex(" ") == "09 00 00 00 c3 bf 94 c5 a7 76 db 33 13"
    assert decode_values(body, INTS) == [354224848179261915075]
    body, content_type, type_ = encode_request([10, 90], "iter", binary=True)
    assert (body.hex(" "), content_type, type_) == (
        "0a 00 00 00 00 00 00 00 5a 00 00 00 00 00 00 00",
        U64,
        "iter",
    )


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=50))
def test_u64_values_round_trip(values):
    body, kind = encode_values(values, BOTH)
    assert kind == U64 and len(body) == 8 * len(values)
    assert decode_values(body, U64) == values


@given(st.lists(st.integers(0, 1 << 300), max_size=20))
def test_length_prefixed_values_round_trip(values):
    body, kind = encode_magnitudes([magnitude(v) for v in values], (INTS,))
    assert kind == INTS
    assert decode_values(body, INTS) == values
    if values and max(values) < 1 << 64:  # a client reading U64 gets the short form
        assert encode_magnitudes([magnitude(v) for v in values], BOTH)[1] == U64


def test_a_body_that_does_not_fit_its_form_is_refused_by_the_reader():
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_values(b"\x01" * 9, U64)
    with pytest.raises(ValueError, match="inside a length prefix"):
        decode_values(b"\x01\x00", INTS)
    with pytest.raises(ValueError, match="runs past the end"):
        decode_values(struct.pack("<I", 5) + b"\x01", INTS)


@pytest.mark.parametrize(
    ("accept", "forms"),
    [
        (ACCEPT_BINARY, (U64, INTS)),
        (f" {INTS.upper()} ; q=1", (INTS,)),
        (b"application/vnd.fibrpc.u64", (U64,)),
        ("text/plain, application/vnd.fibrpc.u128", ()),
        (42, ()),
        (None, ()),
    ],
)
def test_the_accept_header_names_forms_and_anything_else_is_ignored(accept, forms):
    assert binary_forms(accept) == forms


# -- the handler ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "algo"), [([0, 1, 2, 90], "iter"), ([5, 93], "fast"), ([10, 20], "naive"), (30, "fast")]
)
def test_results_under_64_bits_are_8_bytes_each(n, algo):
    body, content_type, type_ = encode_request(n, algo)
    reply = Handler().handle(body, content_type, type_, ACCEPT_BINARY)
    ns = n if isinstance(n, list) else [n]
    assert reply.content_type == U64
    assert decode_values(reply.body, U64) == [FAST_TABLE[k] for k in ns]


def test_a_batch_with_a_result_past_64_bits_is_length_prefixed_and_exact():
    ns = [0, 1, 94, 10_000, 90]
    reply = Handler().handle(*encode_request(ns, "fast"), ACCEPT_BINARY)
    assert reply.content_type == INTS
    assert decode_values(reply.body, INTS) == [int(gmpy2.fib(n)) for n in ns]


def test_a_client_reading_only_length_prefixed_gets_it_for_small_results_too():
    reply = Handler().handle(*encode_request([1, 2, 3], "iter"), INTS)
    assert (reply.content_type, decode_values(reply.body, INTS)) == (INTS, [1, 1, 2])


@pytest.mark.parametrize(
    "request_",
    [
        (b"30", None, None),
        (b"90", None, "iter"),
        (b'{"n": 30}', JSON, None),
        (b'{"n": [1, 2, 100], "algo": "fast"}', JSON, None),
        (b'{"n": [1, 2, 3], "algo": "iter"}', JSON, None),
        (b"-1", None, None),
    ],
)
def test_a_request_that_names_no_binary_form_is_answered_as_before_byte_for_byte(request_):
    handler = Handler()
    plain = handler.handle(*request_)
    assert plain == handler.handle(*request_, "text/plain, application/x-unknown")
    assert plain.content_type in ("text/plain", JSON)


def test_refusals_stay_json_envelopes_whatever_the_client_reads():
    reply = Handler(Limits()).handle(*encode_request([1, 94], "iter"), ACCEPT_BINARY)
    assert (reply.content_type, reply.error) == (JSON, "out_of_range")


# -- end to end ---------------------------------------------------------------------------


def test_a_server_answers_binary_only_to_the_request_that_asks(serve, queue):
    serve(workers=1)
    raw = RawClient(URL, queue)
    try:
        plain = raw.publish(b'{"n": [10, 90], "algo": "iter"}', content_type=JSON)
        binary = raw.publish(
            b'{"n": [10, 90], "algo": "iter"}',
            content_type=JSON,
            headers={ACCEPT_HEADER: ACCEPT_BINARY},
        )
        props, body = raw.reply(plain)
        assert (props.content_type, body) == (JSON, b'{"results":["55","2880067194370816120"]}')
        props, body = raw.reply(binary)
        assert props.content_type == U64
        assert body.hex(" ") == "37 00 00 00 00 00 00 00 78 78 ba a1 da 0d f8 27"
    finally:
        raw.conn.close()


def test_fibrpc_s_client_reads_binary_by_default_and_text_when_asked(serve, queue):
    serve(workers=1)
    with Client(URL, queue=queue, timeout=30) as client:
        assert client.call(10**5) == int(gmpy2.fib(10**5))
        assert client.call_text(10**5) == gmpy2.fib(10**5).digits()
        assert client.submit(90, algo="iter").result(30) == FAST_TABLE[90]
        ns = [0, 1, 94, 1000, 93]
        assert client.map(ns) == [int(gmpy2.fib(n)) for n in ns]
        assert client.map(range(94), algo="iter") == list(FAST_TABLE)
        with pytest.raises(RequestError) as refused:
            client.call(-5)
        assert refused.value.code == "negative"


def test_a_server_that_knows_nothing_of_binary_still_answers_fibrpc_s_client(queue):
    """An older server: it ignores x-fibrpc-accept and refuses the binary batch form
    (as fibrpc did before it) with unsupported_content_type; the client re-sends that
    batch as JSON, and every later one, and reads the decimal replies as before."""
    seen: list[str | None] = []

    def older_server(ch, method, props, body):
        seen.append(props.content_type)
        if props.content_type == U64:
            reply = b'{"error": {"code": "unsupported_content_type", "message": "no"}}'
        elif props.content_type == JSON:
            ns = json.loads(body)["n"]
            reply = json.dumps({"results": [str(FAST_TABLE[n]) for n in ns]}).encode()
        else:
            reply = str(FAST_TABLE[int(body)]).encode()
        ch.basic_publish(
            "",
            props.reply_to,
            reply,
            pika.BasicProperties(
                correlation_id=props.correlation_id,
                content_type=JSON if props.content_type else "text/plain",
            ),
        )

    server = StandIn(queue, older_server)
    try:
        with Client(URL, queue=queue, timeout=10) as client:
            assert client.call(30) == 832040
            assert client.map(range(90), batch_size=30) == list(FAST_TABLE[:90])
            assert client.map([5, 6, 7]) == [5, 8, 13]
    finally:
        server.close()
    assert seen[0] is None  # the single call: text, as ever
    # The first map's batches went out together, binary; each refused one went again as
    # JSON (3 + 3), and the next map knew better.
    assert seen[1:] == [U64] * 3 + [JSON] * 4


def test_a_binary_batch_is_checked_as_a_json_one_and_refused_with_the_same_codes():
    handler = Handler()
    body, content_type, type_ = encode_request([1, 2, 94], "iter", binary=True)
    assert (content_type, type_) == (U64, "iter")
    refused = handler.handle(body, content_type, type_)
    assert refused.error == "out_of_range" and b"Batch member 2" in refused.body
    assert handler.handle(b"\x01" * 12, U64, None).error == "malformed"
    assert handler.handle(b"", U64, "bogus").error == "unknown_algorithm"
    assert handler.handle(*encode_request([40] * 3, "naive", binary=True)).error == "out_of_range"
    # A batch the binary form cannot carry (a negative n) goes as JSON, refused as ever.
    assert encode_request([1, -1], "fast", binary=True)[1] == JSON
    ok = handler.handle(*encode_request([0, 10, 100], "fast", binary=True))
    assert json.loads(ok.body)["results"][:2] == ["0", "55"]  # no accept header: JSON


@given(st.lists(st.integers(0, 93), max_size=300), st.sampled_from(["fast", "iter"]))
def test_a_binary_batch_of_small_n_gets_the_bytes_a_json_batch_gets(ns, algo):
    handler = Handler()
    packed = handler.handle(*encode_request(ns, algo, binary=True), ACCEPT_BINARY)
    general = handler.handle(*encode_request(ns, algo), ACCEPT_BINARY)
    assert packed == general
    assert decode_values(packed.body, U64) == [FAST_TABLE[n] for n in ns]


def test_a_call_asks_for_binary_where_it_pays_batches_and_results_past_64_bits():
    from fibrpc.calls import AS_INT, AS_INTS, AS_TEXT, wants_binary  # noqa: PLC0415

    assert wants_binary([1, 2], AS_INTS) and wants_binary([], AS_INTS)
    assert wants_binary(94, AS_INT) and wants_binary(10**7, AS_INT)
    assert not wants_binary(93, AS_INT)  # 20 digits at most: text costs nothing to read
    assert not wants_binary(10**7, AS_TEXT)  # call_text wants the digits
