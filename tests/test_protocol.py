"""The wire protocol without a broker: every request decodes or is refused with its code.

Nothing here computes a Fibonacci number: decoding only reads and bounds-checks, so every
test runs in microseconds. Refusals are checked for their stable ``ErrorCode`` and for a
message that names the bad value and the bound it broke.
"""

from __future__ import annotations

import json
from typing import Any

import gmpy2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fibrpc import protocol
from fibrpc.config import (
    DEFAULT_FAST_MAX_N,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_NAIVE_MAX_N,
    ITER_MAX_N,
    Limits,
)
from fibrpc.errors import ErrorCode, RequestError
from fibrpc.kernels import ALGORITHMS
from fibrpc.numbers import estimate_bytes, estimate_digits, magnitude
from fibrpc.protocol import (
    JSON,
    TEXT,
    Request,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_result,
    encode_results,
)

LIMITS = Limits()
BOUNDS = {"naive": DEFAULT_NAIVE_MAX_N, "iter": ITER_MAX_N, "fast": DEFAULT_FAST_MAX_N}
ERROR_CODES = sorted(v for k, v in vars(ErrorCode).items() if k.isupper())


def shown(body: bytes) -> str:
    """How a refusal shows a text body: quoted, printable ASCII as it is, every other
    byte (and the quote) as \\xNN; never Python's b'...' repr."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b != 34 else f"\\x{b:02x}" for b in body) + '"'


def decode(
    body: bytes, content_type: str | None = None, algo: str | None = None, limits: Limits = LIMITS
) -> Request:
    return decode_request(body, content_type, algo, limits)


def refusal(
    body: bytes, content_type: str | None = None, algo: str | None = None, limits: Limits = LIMITS
) -> RequestError:
    """The error that refuses this request (the test fails if it is accepted)."""
    with pytest.raises(RequestError) as info:
        decode_request(body, content_type, algo, limits)
    return info.value


def as_json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- the text form ---------------------------------------------------------------------


def test_a_decimal_body_asks_the_fast_algorithm_for_that_n() -> None:
    assert decode(b"30") == Request("fast", [30], batch=False, form=TEXT)


@pytest.mark.parametrize("content_type", [None, "", TEXT, "text/plain; charset=us-ascii"])
def test_a_text_request_may_have_no_content_type_or_text_plain(content_type: str | None) -> None:
    assert decode(b"30", content_type) == Request("fast", [30], batch=False, form=TEXT)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_the_type_property_names_the_algorithm_of_a_text_request(algo: str) -> None:
    assert decode(b"30", algo=algo) == Request(algo, [30], batch=False, form=TEXT)


def test_an_empty_type_property_means_the_default_algorithm() -> None:
    assert decode(b"30", algo="").algo == "fast"


@pytest.mark.parametrize("algo", ["slow", "NAIVE", "fast ", "gmp"])
def test_an_unknown_type_property_is_refused_as_an_unknown_algorithm(algo: str) -> None:
    error = refusal(b"30", algo=algo)
    assert error.code == ErrorCode.UNKNOWN_ALGORITHM
    assert repr(algo) in error.message
    assert all(name in error.message for name in ALGORITHMS)


def test_a_negative_n_is_refused_naming_the_value_and_the_bound() -> None:
    error = refusal(b"-5")
    assert error.code == ErrorCode.NEGATIVE
    assert "-5" in error.message
    assert "0 or more" in error.message


def test_minus_zero_is_refused_as_negative_like_any_body_with_a_minus_sign() -> None:
    error = refusal(b"-0")
    assert error.code == ErrorCode.NEGATIVE
    assert '"-0"' in error.message


@pytest.mark.parametrize(
    "body", [b"3.5", b"3e1", b"1e400", b"nan", b"NaN", b"inf", b"-3.5", b".5", b"30.", b"+30"]
)
def test_a_number_that_is_not_a_whole_decimal_n_is_refused_as_not_an_integer(body: bytes) -> None:
    error = refusal(body)
    assert error.code == ErrorCode.NOT_AN_INTEGER
    assert shown(body) in error.message


@pytest.mark.parametrize(
    "body",
    [
        b" 30",
        b"30\n",
        b"30 ",
        b"3 0",
        b"0x1e",
        b"30_000",
        "١٢".encode(),  # Arabic-Indic digits: str.isdigit, but not ASCII
        "\uff13\uff10".encode(),  # full-width digits 3 and 0
        b"",
        b"-",
        b"abc",
        b'{"n": 30}',  # JSON without its content type
        b"\x00",
    ],
)
def test_a_body_that_is_not_decimal_digits_is_refused_as_malformed(body: bytes) -> None:
    error = refusal(body)
    assert error.code == ErrorCode.MALFORMED
    assert shown(body) in error.message


@given(st.binary(min_size=1, max_size=64))
@example(b"\xff\xfe")
@example(b"12\x0034")
def test_random_bytes_that_are_not_a_number_are_refused_as_malformed(body: bytes) -> None:
    numeric = set(b"0123456789+-.eEiInNfFaA")
    if all(byte in numeric for byte in body):
        return  # might spell a number; the tests above cover those
    assert refusal(body).code == ErrorCode.MALFORMED


@pytest.mark.parametrize(
    ("body", "n"), [(b"0", 0), (b"007", 7), (b"0" * 40 + b"30", 30), (b"0" * 100, 0)]
)
def test_leading_zeros_do_not_change_n(body: bytes, n: int) -> None:
    assert decode(body).ns == [n]


@pytest.mark.parametrize("digits", [20, 4_000, 5_000, DEFAULT_MAX_BODY_BYTES])
def test_a_very_long_n_is_out_of_range_without_being_converted_to_an_int(
    digits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_int(*args: object) -> int:
        raise AssertionError("int() was called on a body that cannot be under any bound")

    monkeypatch.setattr(protocol, "int", no_int, raising=False)
    error = refusal(b"9" * digits)
    assert error.code == ErrorCode.OUT_OF_RANGE
    assert f"{digits:,} digits" in error.message
    assert f"{DEFAULT_FAST_MAX_N:,}" in error.message


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_n_one_above_the_bound_of_its_algorithm_is_out_of_range(algo: str) -> None:
    bound = BOUNDS[algo]
    error = refusal(str(bound + 1).encode(), algo=algo)
    assert error.code == ErrorCode.OUT_OF_RANGE
    assert str(bound + 1) in error.message
    assert f"{bound:,}" in error.message
    assert repr(algo) in error.message


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_n_at_the_bound_of_its_algorithm_is_accepted(algo: str) -> None:
    bound = BOUNDS[algo]
    assert decode(str(bound).encode(), algo=algo).ns == [bound]


def test_custom_limits_move_the_bounds_of_naive_and_fast_but_not_of_iter() -> None:
    limits = Limits(naive_max_n=20, fast_max_n=1_000)
    assert decode(b"20", algo="naive", limits=limits).ns == [20]
    assert refusal(b"21", algo="naive", limits=limits).code == ErrorCode.OUT_OF_RANGE
    assert "20" in refusal(b"21", algo="naive", limits=limits).message
    assert decode(b"1000", limits=limits).ns == [1_000]
    assert "1,000" in refusal(b"1001", limits=limits).message
    assert decode(b"93", algo="iter", limits=limits).ns == [93]
    assert refusal(b"94", algo="iter", limits=limits).code == ErrorCode.OUT_OF_RANGE


def test_a_text_body_over_the_size_limit_is_refused_as_body_too_large() -> None:
    limits = Limits(max_body_bytes=4)
    assert decode(b"1234", limits=limits).ns == [1234]
    error = refusal(b"12345", limits=limits)
    assert error.code == ErrorCode.BODY_TOO_LARGE
    assert "5 bytes" in error.message
    assert "4 bytes" in error.message


def test_a_text_request_whose_reply_would_be_too_large_is_refused() -> None:
    error = refusal(b"10000", limits=Limits(max_reply_bytes=1_000))
    assert error.code == ErrorCode.REPLY_TOO_LARGE
    assert "1,000 bytes" in error.message


# --- the JSON form ---------------------------------------------------------------------


def test_a_json_object_with_one_n_asks_the_fast_algorithm_by_default() -> None:
    assert decode(as_json({"n": 30}), JSON) == Request("fast", [30], batch=False, form=JSON)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_json_request_names_its_algorithm_in_algo(algo: str) -> None:
    assert decode(as_json({"n": 30, "algo": algo}), JSON) == Request(algo, [30], False, JSON)


def test_a_json_list_of_n_is_a_batch_in_request_order() -> None:
    request = decode(as_json({"n": [3, 1, 2], "algo": "iter"}), JSON)
    assert request == Request("iter", [3, 1, 2], batch=True, form=JSON)


def test_a_json_request_takes_its_algorithm_from_the_body_not_the_type_property() -> None:
    assert decode(as_json({"n": 30}), JSON, algo="naive").algo == "fast"


def test_a_json_content_type_may_carry_a_charset() -> None:
    assert decode(as_json({"n": 30}), "application/json; charset=utf-8").ns == [30]


def test_an_empty_batch_is_accepted() -> None:
    assert decode(as_json({"n": []}), JSON) == Request("fast", [], batch=True, form=JSON)


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"n": 30', b"{'n': 30}", b'{"n": 30}}', b"\xff\xfe\x00", b"30 30"]
)
def test_a_body_that_is_not_json_is_refused_as_malformed(body: bytes) -> None:
    error = refusal(body, JSON)
    assert error.code == ErrorCode.MALFORMED
    assert "not valid JSON" in error.message


def test_json_nested_past_the_recursion_limit_is_refused_as_malformed() -> None:
    body = b'{"n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert refusal(body, JSON).code == ErrorCode.MALFORMED


@pytest.mark.parametrize("doc", [[1, 2], "x", 3, None, {}, {"N": 30}, {"algo": "fast"}])
def test_json_that_is_not_an_object_with_n_is_refused_as_malformed(doc: Any) -> None:
    error = refusal(as_json(doc), JSON)
    assert error.code == ErrorCode.MALFORMED
    assert '"n"' in error.message
    assert repr(doc) in error.message


@pytest.mark.parametrize(
    ("n", "kind"),
    [
        (True, "a boolean"),
        (False, "a boolean"),
        (1.0, "a number with a fraction"),
        (30.5, "a number with a fraction"),
        ("30", "a string"),
        (None, "null"),
        ({}, "an object"),
        ({"n": 30}, "an object"),
    ],
)
def test_an_n_of_the_wrong_json_type_is_refused_as_not_an_integer(n: Any, kind: str) -> None:
    error = refusal(as_json({"n": n}), JSON)
    assert error.code == ErrorCode.NOT_AN_INTEGER
    assert kind in error.message
    assert repr(n) in error.message


@pytest.mark.parametrize("body", [b'{"n": 1e400}', b'{"n": NaN}', b'{"n": -Infinity}'])
def test_a_json_n_that_python_reads_as_a_float_is_refused_as_not_an_integer(body: bytes) -> None:
    assert refusal(body, JSON).code == ErrorCode.NOT_AN_INTEGER


@pytest.mark.parametrize("n", [True, [True], [0, 1, False]])
def test_a_json_boolean_is_never_taken_for_an_integer(n: Any) -> None:
    error = refusal(as_json({"n": n}), JSON)
    assert error.code == ErrorCode.NOT_AN_INTEGER
    assert "a boolean" in error.message


@pytest.mark.parametrize(("n", "member"), [([[1]], 0), ([1, [2, [3]]], 1), ([0, []], 1)])
def test_a_nested_list_in_a_batch_is_refused_as_not_an_integer(n: Any, member: int) -> None:
    error = refusal(as_json({"n": n}), JSON)
    assert error.code == ErrorCode.NOT_AN_INTEGER
    assert f"Batch member {member}:" in error.message


@pytest.mark.parametrize("algo", ["slow", "", 1, None, True, ["fast"], {"name": "fast"}])
def test_a_json_algo_that_is_not_an_algorithm_name_is_refused(algo: Any) -> None:
    error = refusal(as_json({"n": 30, "algo": algo}), JSON)
    assert error.code == ErrorCode.UNKNOWN_ALGORITHM
    assert repr(algo) in error.message


def test_a_negative_json_n_is_refused_as_negative() -> None:
    error = refusal(as_json({"n": -1}), JSON)
    assert error.code == ErrorCode.NEGATIVE
    assert "-1" in error.message


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_a_json_n_above_the_bound_of_its_algorithm_is_out_of_range(algo: str) -> None:
    bound = BOUNDS[algo]
    error = refusal(as_json({"n": bound + 1, "algo": algo}), JSON)
    assert error.code == ErrorCode.OUT_OF_RANGE
    assert str(bound + 1) in error.message
    assert f"{bound:,}" in error.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"n": ' + b"9" * 5_000 + b"}",
        b'{"n": [1, ' + b"9" * 5_000 + b"]}",
    ],
)
def test_a_json_integer_of_thousands_of_digits_is_out_of_range(body: bytes) -> None:
    error = refusal(body, JSON)
    assert error.code == ErrorCode.OUT_OF_RANGE
    assert "4,300 digits" in error.message


def test_a_batch_longer_than_the_limit_is_refused_as_batch_too_large() -> None:
    limits = Limits(max_batch=3)
    assert decode(as_json({"n": [1, 2, 3]}), JSON, limits=limits).ns == [1, 2, 3]
    error = refusal(as_json({"n": [1, 2, 3, 4]}), JSON, limits=limits)
    assert error.code == ErrorCode.BATCH_TOO_LARGE
    assert "4 values" in error.message
    assert "limit is 3" in error.message


def test_a_batch_one_longer_than_the_default_limit_is_refused() -> None:
    body = as_json({"n": [0] * (DEFAULT_MAX_BATCH + 1)})
    assert refusal(body, JSON).code == ErrorCode.BATCH_TOO_LARGE


@pytest.mark.parametrize(
    ("algo", "ns", "member", "code"),
    [
        ("fast", [1, 2, -3, -4], 2, ErrorCode.NEGATIVE),
        ("fast", [1, "2"], 1, ErrorCode.NOT_AN_INTEGER),
        ("fast", [1.5, 2], 0, ErrorCode.NOT_AN_INTEGER),
        ("fast", [0, None], 1, ErrorCode.NOT_AN_INTEGER),
        ("naive", [0, 1, 36], 2, ErrorCode.OUT_OF_RANGE),
        ("iter", [93, 94], 1, ErrorCode.OUT_OF_RANGE),
        ("fast", [5, DEFAULT_FAST_MAX_N + 1], 1, ErrorCode.OUT_OF_RANGE),
    ],
)
def test_a_batch_with_a_bad_member_is_refused_naming_its_first_bad_member(
    algo: str, ns: list[Any], member: int, code: str
) -> None:
    error = refusal(as_json({"n": ns, "algo": algo}), JSON)
    assert error.code == code
    assert error.message.startswith(f"Batch member {member}: ")
    assert repr(ns[member]) in error.message


def test_a_naive_batch_costing_more_than_two_of_the_largest_naive_calls_is_refused() -> None:
    top = DEFAULT_NAIVE_MAX_N
    assert decode(as_json({"n": [top, top], "algo": "naive"}), JSON).ns == [top, top]
    error = refusal(as_json({"n": [top, top, top], "algo": "naive"}), JSON)
    assert error.code == ErrorCode.OUT_OF_RANGE
    assert f"naive({top})" in error.message


def test_a_naive_bound_beyond_the_64_bit_table_does_not_break_the_cost_check() -> None:
    limits = Limits(naive_max_n=100)
    assert decode(as_json({"n": [5], "algo": "naive"}), JSON, limits=limits).ns == [5]
    assert decode(as_json({"n": [95], "algo": "naive"}), JSON, limits=limits).ns == [95]
    error = refusal(as_json({"n": [95, 95, 95], "algo": "naive"}), JSON, limits=limits)
    assert error.code == ErrorCode.OUT_OF_RANGE


@pytest.mark.parametrize("content_type", [None, TEXT, JSON, "application/xml"])
def test_a_body_over_the_default_size_limit_is_refused_in_any_form(
    content_type: str | None,
) -> None:
    error = refusal(b"1" * (DEFAULT_MAX_BODY_BYTES + 1), content_type)
    assert error.code == ErrorCode.BODY_TOO_LARGE
    assert f"{DEFAULT_MAX_BODY_BYTES + 1:,} bytes" in error.message
    assert f"{DEFAULT_MAX_BODY_BYTES:,} bytes" in error.message


def test_a_json_body_over_a_custom_size_limit_is_refused() -> None:
    body = as_json({"n": 30, "algo": "fast"})
    error = refusal(body, JSON, limits=Limits(max_body_bytes=len(body) - 1))
    assert error.code == ErrorCode.BODY_TOO_LARGE


@pytest.mark.parametrize(
    "content_type", ["application/xml", "application/octet-stream", "image/png", "json"]
)
def test_an_unknown_content_type_is_refused_naming_it(content_type: str) -> None:
    error = refusal(b"30", content_type)
    assert error.code == ErrorCode.UNSUPPORTED_CONTENT_TYPE
    assert repr(content_type) in error.message
    assert JSON in error.message
    assert TEXT in error.message


def test_a_json_request_whose_reply_would_be_too_large_is_refused() -> None:
    error = refusal(as_json({"n": 10_000}), JSON, limits=Limits(max_reply_bytes=1_000))
    assert error.code == ErrorCode.REPLY_TOO_LARGE
    assert "1,000 bytes" in error.message


@pytest.mark.parametrize(
    ("ns", "limits"),
    [
        ([DEFAULT_FAST_MAX_N] * 40, LIMITS),  # 40 x 2.1 MB of digits
        ([93] * 100, Limits(max_reply_bytes=1_000)),  # small n, but many of them
        ([1, 10_000], Limits(max_reply_bytes=1_000)),
    ],
)
def test_a_batch_whose_reply_would_be_too_large_is_refused(ns: list[int], limits: Limits) -> None:
    error = refusal(as_json({"n": ns}), JSON, limits=limits)
    assert error.code == ErrorCode.REPLY_TOO_LARGE
    assert f"{limits.max_reply_bytes:,} bytes" in error.message


# --- encoding and decoding replies and requests ----------------------------------------

decimal_texts = st.integers(min_value=0, max_value=10**80).map(str)


@given(decimal_texts)
def test_a_text_result_decodes_back_to_its_digits(text: str) -> None:
    body = encode_result(text, TEXT)
    assert body == text.encode()
    assert decode_reply(body, TEXT) == text
    assert decode_reply(body, None) == text


@given(decimal_texts)
def test_a_json_result_decodes_back_to_its_digits(text: str) -> None:
    body = encode_result(text, JSON)
    assert json.loads(body) == {"result": text}
    assert decode_reply(body, JSON) == text


@given(st.lists(decimal_texts, max_size=20))
def test_a_batch_of_results_decodes_back_in_order(texts: list[str]) -> None:
    body = encode_results(texts)
    assert json.loads(body) == {"results": texts}
    assert decode_reply(body, JSON) == texts


@given(st.sampled_from(ERROR_CODES), st.text(max_size=200))
def test_an_error_envelope_decodes_back_to_the_same_code_and_message(
    code: str, message: str
) -> None:
    body = encode_error(RequestError(code, message))
    assert json.loads(body) == {"error": {"code": code, "message": message}}
    with pytest.raises(RequestError) as info:
        decode_reply(body, JSON)
    assert (info.value.code, info.value.message) == (code, message)


@pytest.mark.parametrize(
    "body",
    [b"{", b"null", b"3", b"[]", b'"results"', b"{}", b'{"error": "x"}', b'{"error": {"code": 1}}'],
)
def test_a_json_reply_that_is_no_envelope_is_refused_as_malformed(body: bytes) -> None:
    with pytest.raises(RequestError) as info:
        decode_reply(body, JSON)
    assert info.value.code == ErrorCode.MALFORMED


@pytest.mark.parametrize(("algo", "type_"), [("fast", None), ("naive", "naive"), ("iter", "iter")])
def test_one_n_is_sent_as_text_with_the_algorithm_in_type_unless_it_is_the_default(
    algo: str, type_: str | None
) -> None:
    assert encode_request(30, algo) == (b"30", None, type_)


def test_a_batch_is_sent_as_json_naming_its_algorithm() -> None:
    body, content_type, type_ = encode_request([1, 2], "fast")
    assert (content_type, type_) == (JSON, None)
    assert json.loads(body) == {"n": [1, 2], "algo": "fast"}


@st.composite
def algo_and_n(draw: st.DrawFn) -> tuple[str, int]:
    algo = draw(st.sampled_from(ALGORITHMS))
    return algo, draw(st.integers(min_value=0, max_value=BOUNDS[algo]))


@given(algo_and_n())
def test_one_encoded_request_decodes_back_to_its_algorithm_and_n(case: tuple[str, int]) -> None:
    algo, n = case
    assert decode(*encode_request(n, algo)) == Request(algo, [n], batch=False, form=TEXT)


@st.composite
def algo_and_batch(draw: st.DrawFn) -> tuple[str, list[int]]:
    algo = draw(st.sampled_from(ALGORITHMS))
    # 20 values of naive(30) stay under the naive batch budget of two naive(35).
    top = 30 if algo == "naive" else BOUNDS[algo]
    return algo, draw(st.lists(st.integers(min_value=0, max_value=top), max_size=20))


@given(algo_and_batch())
def test_an_encoded_batch_decodes_back_to_its_algorithm_and_ns(
    case: tuple[str, list[int]],
) -> None:
    algo, ns = case
    assert decode(*encode_request(ns, algo)) == Request(algo, ns, batch=True, form=JSON)


# -- the size of a reply is estimated in the form it will be sent in (issue #21) ----------


def test_a_batch_asking_for_binary_results_is_sized_by_its_binary_reply_not_its_digits():
    from fibrpc.handler import Handler  # noqa: PLC0415

    ns = [1_000_000 + k for k in range(8)]  # 8 results of about 209,000 digits, 87 KB each
    decimal = sum(estimate_digits(n) for n in ns)
    limits = Limits(max_reply_bytes=decimal * 6 // 10)  # the binary reply fits; text would not
    body = as_json({"n": ns})
    refused = refusal(body, JSON, limits=limits)
    assert refused.code == ErrorCode.REPLY_TOO_LARGE  # as decimal text: too large
    request = decode_request(body, JSON, None, limits, accept=protocol.INTS)
    reply = Handler(limits).compute(request)
    assert reply.content_type == protocol.INTS
    assert len(reply.body) <= limits.max_reply_bytes
    assert protocol.decode_values(reply.body, reply.content_type) == [int(gmpy2.fib(n)) for n in ns]


@given(st.lists(st.integers(0, 3_000), min_size=1, max_size=20))
def test_the_binary_estimate_bounds_every_binary_reply(ns):
    from fibrpc.handler import Handler  # noqa: PLC0415

    request = decode_request(as_json({"n": ns}), JSON, None, LIMITS, accept=protocol.INTS)
    reply = Handler(LIMITS).compute(request)
    assert len(reply.body) <= sum(4 + estimate_bytes(n) for n in ns)
    assert all(len(magnitude(int(gmpy2.fib(n)))) <= estimate_bytes(n) for n in ns)
