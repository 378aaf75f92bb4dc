"""Handling a request without a broker: bytes and properties in, a ``Reply`` out.

Whatever a client sends, ``Handler`` answers with a reply: the result, a refusal with its
stable code, or (for a bug) an ``internal`` error; it never raises.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibrpc import kernels, protocol
from fibrpc.config import Limits
from fibrpc.errors import ErrorCode, RequestError
from fibrpc.handler import Handler, Reply, error_reply
from fibrpc.kernels import ALGORITHMS, FAST_TABLE, fib_naive
from fibrpc.protocol import JSON, TEXT, Request, decode_reply

ERROR_CODES = {v for k, v in vars(ErrorCode).items() if k.isupper()}


def as_json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def request(body: bytes, content_type: str | None = None, algo: str | None = None) -> Request:
    decoded = Handler().decode(body, content_type, algo)
    assert isinstance(decoded, Request), decoded
    return decoded


# --- answers ---------------------------------------------------------------------------


def test_a_text_request_is_answered_with_the_digits_of_f_n_as_text() -> None:
    assert Handler().handle(b"30", None, None) == Reply(b"832040", TEXT, None)


def test_the_type_property_chooses_the_algorithm_of_a_text_request() -> None:
    assert Handler().handle(b"20", TEXT, "naive") == Reply(b"6765", TEXT, None)


def test_a_json_request_for_one_n_is_answered_with_a_json_result() -> None:
    reply = Handler().handle(as_json({"n": 30}), JSON, None)
    assert reply == Reply(b'{"result":"832040"}', JSON, None)
    assert decode_reply(reply.body, reply.content_type) == "832040"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_json_batch_is_answered_in_request_order(algo: str) -> None:
    ns = [5, 0, 20, 1, 2, 13, 5] if algo == "naive" else [93, 0, 50, 1, 2, 92, 50]
    reply = Handler().handle(as_json({"n": ns, "algo": algo}), JSON, None)
    assert reply.error is None
    assert reply.content_type == JSON
    assert decode_reply(reply.body, reply.content_type) == [str(FAST_TABLE[n]) for n in ns]


@given(st.sampled_from(["iter", "fast"]), st.lists(st.integers(0, 93), max_size=50))
@settings(deadline=None)  # the first iter call loads numba's cached machine code
def test_every_batch_of_small_n_agrees_with_the_table(algo: str, ns: list[int]) -> None:
    reply = Handler().handle(as_json({"n": ns, "algo": algo}), JSON, None)
    assert decode_reply(reply.body, reply.content_type) == [str(FAST_TABLE[n]) for n in ns]


def test_an_empty_batch_is_answered_with_no_results() -> None:
    reply = Handler().handle(as_json({"n": []}), JSON, None)
    assert reply == Reply(b'{"results":[]}', JSON, None)
    assert decode_reply(reply.body, reply.content_type) == []


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_agrees_with_the_naive_oracle_for_small_n(algo: str) -> None:
    handler = Handler()
    expected = [str(fib_naive(n)) for n in range(21)]
    singles = [handler.handle(str(n).encode(), None, algo) for n in range(21)]
    assert [reply.body.decode() for reply in singles] == expected
    batch = handler.handle(as_json({"n": list(range(21)), "algo": algo}), JSON, None)
    assert decode_reply(batch.body, batch.content_type) == expected


def test_fast_answers_past_64_bits_with_every_digit() -> None:
    reply = Handler().handle(b"100", None, None)
    assert reply == Reply(b"354224848179261915075", TEXT, None)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "algo", "code"),
    [
        (b"-5", None, None, ErrorCode.NEGATIVE),
        (b"3.5", None, None, ErrorCode.NOT_AN_INTEGER),
        (b"thirty", None, None, ErrorCode.MALFORMED),
        (b"30", None, "slow", ErrorCode.UNKNOWN_ALGORITHM),
        (b"36", None, "naive", ErrorCode.OUT_OF_RANGE),
        (b"30", "application/xml", None, ErrorCode.UNSUPPORTED_CONTENT_TYPE),
        (b'{"n": true}', JSON, None, ErrorCode.NOT_AN_INTEGER),
        (b'{"n": [1, 2, 36], "algo": "naive"}', JSON, None, ErrorCode.OUT_OF_RANGE),
        (b"{", JSON, None, ErrorCode.MALFORMED),
    ],
)
def test_a_refused_request_is_answered_with_a_json_error_envelope(
    body: bytes, content_type: str | None, algo: str | None, code: str
) -> None:
    reply = Handler().handle(body, content_type, algo)
    assert reply.error == code
    assert reply.content_type == JSON
    envelope = json.loads(reply.body)
    assert envelope["error"]["code"] == code
    with pytest.raises(RequestError) as info:
        decode_reply(reply.body, reply.content_type)
    assert info.value.code == code
    assert info.value.message == envelope["error"]["message"]


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        (Limits(max_body_bytes=4), ErrorCode.BODY_TOO_LARGE),
        (Limits(max_batch=2), ErrorCode.BATCH_TOO_LARGE),
        (Limits(max_reply_bytes=10), ErrorCode.REPLY_TOO_LARGE),
        (Limits(fast_max_n=91), ErrorCode.OUT_OF_RANGE),
    ],
)
def test_a_handler_enforces_its_own_limits(limits: Limits, code: str) -> None:
    assert Handler().handle(as_json({"n": [90, 91, 92]}), JSON, None).error is None
    assert Handler(limits).handle(as_json({"n": [90, 91, 92]}), JSON, None).error == code


@pytest.mark.parametrize("body", [b"10000", as_json({"n": 10_000}), as_json({"n": [1, 10_000]})])
def test_a_reply_too_large_is_refused_before_anything_is_computed(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed: list[object] = []
    monkeypatch.setattr(kernels.FastFib, "texts", lambda self, ns: computed.append(ns))
    monkeypatch.setattr(kernels.FastFib, "text", lambda self, n: computed.append(n))
    content_type = None if body.isdigit() else JSON
    reply = Handler(Limits(max_reply_bytes=1_000)).handle(body, content_type, None)
    assert reply.error == ErrorCode.REPLY_TOO_LARGE
    assert computed == []


def test_error_reply_wraps_a_request_error_in_its_envelope() -> None:
    reply = error_reply(RequestError(ErrorCode.POISON, "Delivered 5 times."))
    assert reply == Reply(
        b'{"error": {"code": "poison", "message": "Delivered 5 times."}}', JSON, "poison"
    )


# --- bugs become internal errors -------------------------------------------------------


def boom(*args: object) -> Any:
    raise ZeroDivisionError("a bug in a kernel")


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_kernel_that_raises_becomes_an_internal_error_reply_and_is_logged(
    algo: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    handler = Handler()
    monkeypatch.setattr(kernels, "iter_texts", boom)
    monkeypatch.setattr(kernels, "naive_texts", boom)
    monkeypatch.setattr(handler.fast, "texts", boom)
    with caplog.at_level(logging.ERROR, logger="fibrpc.handler"):
        reply = handler.handle(b"10", None, algo)
    assert reply.error == ErrorCode.INTERNAL
    assert reply.content_type == JSON
    assert json.loads(reply.body)["error"]["code"] == ErrorCode.INTERNAL
    assert "a bug in a kernel" not in reply.body.decode()  # the traceback stays in the log
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.exc_info[0] is ZeroDivisionError


def test_compute_turns_an_unexpected_exception_into_an_internal_error_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = Handler()
    monkeypatch.setattr(handler.fast, "texts", boom)
    reply = handler.compute(Request("fast", [1_000], batch=False, form=TEXT))
    assert reply.error == ErrorCode.INTERNAL


def test_a_bug_while_decoding_becomes_an_internal_error_reply(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(protocol, "decode_request", boom)
    with caplog.at_level(logging.ERROR, logger="fibrpc.handler"):
        reply = Handler().handle(b"30", None, None)
    assert reply.error == ErrorCode.INTERNAL
    assert len(caplog.records) == 1


# --- heavy requests --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "algo"),
    [
        (b"30", None, "naive"),
        (b"1000000", None, None),
        (as_json({"n": [22] * 10, "algo": "naive"}), JSON, None),  # small n, large total
        (as_json({"n": [10_000] * 6}), JSON, None),  # ditto for fast
    ],
)
def test_a_request_that_takes_long_is_heavy(
    body: bytes, content_type: str | None, algo: str | None
) -> None:
    assert Handler().is_heavy(request(body, content_type, algo))


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("n", [0, 20, 22])
def test_a_request_for_a_small_n_is_not_heavy(algo: str, n: int) -> None:
    assert not Handler().is_heavy(request(str(n).encode(), None, algo))


def test_an_empty_batch_and_a_batch_of_small_n_are_not_heavy() -> None:
    handler = Handler()
    assert not handler.is_heavy(request(as_json({"n": []}), JSON))
    assert not handler.is_heavy(request(as_json({"n": [93] * 1_000, "algo": "iter"}), JSON))
    assert not handler.is_heavy(request(as_json({"n": [93] * 1_000}), JSON))
    assert not handler.is_heavy(request(as_json({"n": [20, 20], "algo": "naive"}), JSON))


def test_a_large_n_is_not_heavy_once_its_answer_is_memoised() -> None:
    handler = Handler()
    big = request(b"1000000")
    assert handler.is_heavy(big)
    assert handler.compute(big).body[:10] == b"1953282128"
    assert not handler.is_heavy(big)


# --- nothing a client sends raises -----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-100, 30_000) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=10,
)
json_requests = st.fixed_dictionaries(
    {"n": json_values | st.integers(0, 100) | st.lists(st.integers(0, 100), max_size=10)},
    optional={"algo": st.sampled_from(ALGORITHMS) | json_values},
).map(lambda doc: json.dumps(doc).encode())
bodies = (
    st.binary(max_size=64)
    | st.from_regex(rb"\A-?[0-9]{1,25}\Z")
    | st.from_regex(rb"\A[ +-]?[0-9.eE]{1,8}\s?\Z")
    | json_requests
)
content_types = st.sampled_from(
    [None, "", TEXT, JSON, "application/json; charset=utf-8", "application/xml"]
) | st.text(max_size=20)
algo_hints = st.none() | st.sampled_from(ALGORITHMS) | st.text(max_size=8)


@given(bodies, content_types, algo_hints)
@settings(deadline=None, max_examples=300)
def test_any_bytes_with_any_properties_get_a_reply_and_never_an_exception(
    body: bytes, content_type: str | None, algo: str | None
) -> None:
    # Small bounds keep every accepted request quick to compute.
    handler = Handler(Limits(naive_max_n=20, fast_max_n=30_000, max_batch=20))
    reply = handler.handle(body, content_type, algo)
    assert isinstance(reply, Reply)
    assert reply.error != ErrorCode.INTERNAL
    if reply.content_type == TEXT:
        assert reply.error is None
        assert reply.body.isdigit()
        return
    assert reply.content_type == JSON
    try:
        value = decode_reply(reply.body, reply.content_type)
    except RequestError as exc:
        assert exc.code == reply.error
        assert exc.code in ERROR_CODES
        assert exc.message
    else:
        assert reply.error is None
        texts = value if isinstance(value, list) else [value]
        assert all(isinstance(text, str) and text.isdigit() for text in texts)
