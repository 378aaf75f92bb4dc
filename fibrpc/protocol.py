"""The wire protocol: decoding and bounds-checking requests, encoding replies. No pika.

Two request forms share ``rpc_queue`` (docs/protocol.md is the reference):

* **text**, the RabbitMQ tutorial's: the body is n in ASCII decimal digits; the optional
  AMQP ``type`` property names the algorithm (default ``fast``). The reply body is F(n)
  in ASCII decimal, content type ``text/plain``.
* **JSON**, content type ``application/json``: ``{"n": 30, "algo": "naive"}`` or a batch
  ``{"n": [1, 2, 3], "algo": "iter"}``. The reply is ``{"result": "832040"}`` or
  ``{"results": ["1", "1", "2"]}`` in request order. Results are decimal strings so that
  any JSON parser keeps every digit of a 200,000-digit number.

A request may name, in its ``x-fibrpc-accept`` header, the binary forms its client
reads (``U64``, ``INTS``); the results then come back as little-endian magnitudes
instead of decimal text: 8 bytes a value when every result fits in 64 bits, each
length-prefixed otherwise. A request that names none is answered as above, byte for
byte.

Every refusal is a reply too: ``{"error": {"code": "out_of_range", "message": "..."}}``
with content type ``application/json``, whatever the request's form. A batch is answered
whole or refused whole, naming its first bad member.
"""

from __future__ import annotations

import array
import dataclasses
import json
import re
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

from fibrpc.config import Limits
from fibrpc.errors import ErrorCode, RequestError
from fibrpc.numbers import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    FAST_TABLE,
    ITER_MAX_N,
    decimal,
    estimate_digits,
    magnitude,
)

JSON: Final = "application/json"
TEXT: Final = "text/plain"
#: Header carrying a request's absolute deadline (Unix time in milliseconds, an integer),
#: set by fibrpc's client: a worker skips a request whose deadline has passed.
DEADLINE_HEADER: Final = "x-fibrpc-deadline"
#: Header counting the deliveries of a request re-published by a worker (classic queues).
DELIVERIES_HEADER: Final = "x-fibrpc-deliveries"
#: Header naming the binary forms of results a client reads: media types separated by
#: commas (``ACCEPT_BINARY``). A server that does not know it answers in decimal text.
ACCEPT_HEADER: Final = "x-fibrpc-accept"
#: Results as unsigned 64-bit integers, little-endian, 8 bytes each, in request order.
U64: Final = "application/vnd.fibrpc.u64"
#: Results as magnitudes, each a 4-byte little-endian length then that many bytes of the
#: number, little-endian (F(0) has length 0), in request order.
INTS: Final = "application/vnd.fibrpc.ints"
BINARY_FORMS: Final = (U64, INTS)
#: What fibrpc's clients put in ``ACCEPT_HEADER``.
ACCEPT_BINARY: Final = f"{U64}, {INTS}"
#: A coalesced request and its reply: independent calls sharing a message
#: (``fibrpc.coalesce``).
CALLS: Final = "application/vnd.fibrpc.calls+json"
_U32: Final = struct.Struct("<I")
_U64_MAX: Final = (1 << 64) - 1
#: ``array`` code of an unsigned 64-bit item (``Q`` is 8 bytes wherever CPython runs).
_U64_CODE: Final = "Q"
_SWAP: Final = sys.byteorder != "little"  # array holds native byte order

#: A text n of more digits than this (leading zeros aside) cannot be under any bound; it
#: is refused without converting it to an int (which is quadratic and capped at 4,300
#: digits).
_MAX_DIGITS: Final = 19
_FLOAT_TEXT: Final = re.compile(rb"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.I)
_SHOWN: Final = 40
#: Ints under this go through ``str``; larger ones through GMP (``str`` refuses 4,300+).
_STR_DIGITS: Final = 10**4000
#: The ``fibrpc serve`` option behind each bound, named in the refusal of a request over it.
_MAX_N_OPTIONS: Final = {"naive": "--naive-max-n", "fast": "--fast-max-n"}


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """A decoded, bounds-checked request: compute F(n) for each n with ``algo``."""

    algo: str
    ns: list[int]
    batch: bool  # a JSON list of n, answered with "results"
    form: str  # TEXT or JSON: how a single result is encoded
    reads: tuple[str, ...] = ()  # the binary forms the client reads (ACCEPT_HEADER)
    #: A ``U64`` request's n as they came (native byte order): a worker indexes its
    #: table with them in one step, no Python int made per n.
    packed: array.array[int] | None = None


def decode_request(
    body: bytes,
    content_type: str | bytes | None,
    algo_hint: str | None,
    limits: Limits,
    accept: object = None,
) -> Request:
    """Decode and bounds-check a request body; raise ``RequestError`` if it is refused.

    ``algo_hint`` is the AMQP ``type`` property, which names the algorithm of a text
    request; ``accept`` the ``ACCEPT_HEADER`` header, if any (anything but a string naming
    binary forms is ignored: the reply is then decimal). Everything a client can send
    ends in a ``Request`` or a ``RequestError``. A refusal for going over a limit names
    the ``fibrpc serve`` option that sets it.
    """
    request = _decode_request(body, content_type, algo_hint, limits)
    if accept is not None:
        reads = binary_forms(accept)
        if reads:
            return dataclasses.replace(request, reads=reads)
    return request


def binary_forms(accept: object) -> tuple[str, ...]:
    """The binary forms (``U64``, ``INTS``) an ``ACCEPT_HEADER`` value names, in the
    order of ``BINARY_FORMS``; () for anything else (unknown names are ignored, as HTTP
    ignores them in ``Accept``)."""
    if isinstance(accept, bytes):
        accept = accept.decode("utf-8", "replace")
    if not isinstance(accept, str):
        return ()
    named = {media_type(part) for part in accept.split(",")}
    return tuple(form for form in BINARY_FORMS if form in named)


def _decode_request(
    body: bytes, content_type: str | bytes | None, algo_hint: str | None, limits: Limits
) -> Request:
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            ErrorCode.BODY_TOO_LARGE,
            f"The request body has {len(body):,} bytes; the limit is "
            f"{limits.max_body_bytes:,} bytes (the server's --max-body-bytes).",
        )
    media = media_type(content_type)
    if media in ("", TEXT):
        algo = _check_algo(DEFAULT_ALGORITHM if algo_hint in (None, "") else algo_hint)
        n = _parse_text(body, algo, limits)
        return Request(algo, [n], batch=False, form=TEXT)
    if media == JSON:
        return _decode_json(body, limits)
    if media == U64:
        return _decode_u64(body, algo_hint, limits)
    raise RequestError(
        ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        f"Content type {_show(content_type)} is not understood; send n as decimal text "
        f"with no content type (or {TEXT}), as JSON with content type {JSON}, a batch "
        f"as {U64}, or coalesced calls as {CALLS}.",
    )


def _decode_u64(body: bytes, algo_hint: str | None, limits: Limits) -> Request:
    """A batch in the binary form: each n as 8 bytes, little-endian; ``type`` names the
    algorithm. Answered as a batch (``results``, or a binary form)."""
    algo = _check_algo(DEFAULT_ALGORITHM if algo_hint in (None, "") else algo_hint)
    if len(body) % 8:
        raise RequestError(
            ErrorCode.MALFORMED,
            f"A {U64} body is 8 bytes per n; this one has {len(body):,} bytes.",
        )
    values = array.array(_U64_CODE, body)
    if _SWAP:
        values.byteswap()
    ns: list[int] = values.tolist()
    _check_batch(ns, algo, limits, ints=True)
    return Request(algo, ns, batch=True, form=JSON, packed=values)


def media_type(content_type: str | bytes | None) -> str:
    """The media type of a content type, without parameters, in lower case
    (``"Application/JSON; charset=utf-8"`` is ``"application/json"``).

    pika hands over a content type that is not UTF-8 as ``bytes``; its bad bytes become
    U+FFFD here, so it matches no media type fibrpc understands.
    """
    if not content_type:
        return ""
    if isinstance(content_type, bytes):
        content_type = content_type.decode("utf-8", "replace")
    return content_type.partition(";")[0].strip().lower()


def _parse_text(body: bytes, algo: str, limits: Limits) -> int:
    if body.isdigit():  # bytes.isdigit is ASCII-only: no Arabic-Indic or full-width digits
        digits = body.lstrip(b"0") or b"0"  # leading zeros do not make n larger
        if len(digits) > _MAX_DIGITS:
            raise _out_of_range_digits(len(digits), algo, limits)
        return _check_n(int(digits), algo, limits)
    if body[:1] == b"-" and body[1:].isdigit():
        raise RequestError(
            ErrorCode.NEGATIVE,
            f"n must be 0 or more, in digits with no sign; got {_show(body)}.",
        )
    if _FLOAT_TEXT.fullmatch(body):
        raise RequestError(
            ErrorCode.NOT_AN_INTEGER,
            f"n must be a whole number written in decimal digits; got {_show(body)}.",
        )
    raise RequestError(
        ErrorCode.MALFORMED,
        f"The body {_show(body)} is not n in decimal digits (like b'30'), and the message "
        f"has no content type {JSON}.",
    )


def _decode_json(body: bytes, limits: Limits) -> Request:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError(ErrorCode.MALFORMED, "The JSON body is nested too deeply.") from None
    except ValueError as exc:  # also UnicodeDecodeError
        if "digits" in str(exc) and "limit" in str(exc):
            raise RequestError(
                ErrorCode.OUT_OF_RANGE,
                "The JSON body holds an integer of more than 4,300 digits; no algorithm "
                "accepts an n that large.",
            ) from None
        raise RequestError(ErrorCode.MALFORMED, f"The body is not valid JSON: {exc}.") from None
    if not isinstance(doc, dict) or "n" not in doc:
        raise RequestError(
            ErrorCode.MALFORMED,
            'A JSON request is an object with a key "n", like {"n": 30, "algo": "fast"}; '
            f"got {_show(doc)}.",
        )
    algo_value = doc.get("algo", DEFAULT_ALGORITHM)
    algo = _check_algo(algo_value)
    n = doc["n"]
    if type(n) is list:
        _check_batch(n, algo, limits)
        return Request(algo, n, batch=True, form=JSON)
    return Request(algo, [_check_json_n(n, algo, limits)], batch=False, form=JSON)


def decode_single(n: Any, algo: Any, limits: Limits) -> Request:
    """One n and algorithm as a JSON request holds them (a coalesced call), checked as
    ``decode_request`` checks them; raises ``RequestError``."""
    checked = _check_algo(algo)
    return Request(checked, [_check_json_n(n, checked, limits)], batch=False, form=JSON)


def _check_algo(algo: Any) -> str:
    if algo not in ALGORITHMS or type(algo) is not str:
        raise RequestError(
            ErrorCode.UNKNOWN_ALGORITHM,
            f"Unknown algorithm {_show(algo)}; choose one of {', '.join(ALGORITHMS)}.",
        )
    return algo


def _check_json_n(n: Any, algo: str, limits: Limits) -> int:
    if type(n) is not int:
        raise RequestError(
            ErrorCode.NOT_AN_INTEGER,
            f"n must be a JSON integer; got {_show(n)} ({_json_type(n)}).",
        )
    return _check_n(n, algo, limits)


def _check_n(n: int, algo: str, limits: Limits) -> int:
    if n < 0:
        raise RequestError(ErrorCode.NEGATIVE, f"n must be 0 or more; got {n}.")
    bound = limits.max_n(algo)
    if n > bound:
        hint = "; use algo 'fast' for large n" if algo != "fast" else ""
        shown = f"n = {n}" if n.bit_length() <= 64 else f"n of {n.bit_length():,} bits"
        raise RequestError(
            ErrorCode.OUT_OF_RANGE,
            f"{shown} is above the largest n for {algo!r}, which is {bound:,}"
            f"{_max_n_option(algo)}{hint}.",
        )
    _check_reply_size(estimate_digits(n) + 16, limits)
    return n


def _check_batch(ns: list[Any], algo: str, limits: Limits, *, ints: bool = False) -> None:
    """Refuse a batch over a limit, or with a bad member (naming the first). ``ints``:
    every member is known to be a non-negative int (a ``U64`` body)."""
    if len(ns) > limits.max_batch:
        raise RequestError(
            ErrorCode.BATCH_TOO_LARGE,
            f"The batch has {len(ns):,} values of n; the limit is {limits.max_batch:,} "
            "(the server's --max-batch).",
        )
    if not ns:
        return
    bound = limits.max_n(algo)
    # One pass over the common case (all small non-negative ints); only a batch that
    # fails it is walked again to name its first bad member.
    if (ints or (all(type(n) is int for n in ns) and min(ns) >= 0)) and (top := max(ns)) <= bound:
        # len * (digits of the largest) bounds the reply; only if that is too much is the
        # exact estimate summed, so a batch of small n under a small limit is checked too.
        if len(ns) * (estimate_digits(top) + 3) + 16 > limits.max_reply_bytes:
            _check_reply_size(sum(estimate_digits(n) + 3 for n in ns) + 16, limits)
        if algo == "naive":
            _check_naive_cost(ns, limits)
        return
    for i, n in enumerate(ns):
        try:
            _check_json_n(n, algo, limits)
        except RequestError as exc:
            raise RequestError(exc.code, f"Batch member {i}: {exc.message}") from None


def _check_naive_cost(ns: list[int], limits: Limits) -> None:
    """Refuse a naive batch that would cost more than two calls of naive(max_n)."""
    budget = 2 * _naive_calls(limits.naive_max_n)
    cost = sum(_naive_calls(n) for n in ns)
    if cost > budget:
        raise RequestError(
            ErrorCode.OUT_OF_RANGE,
            f"This naive batch would make about {cost:,} recursive calls; the limit per "
            f"request is {budget:,} (two calls of naive({limits.naive_max_n}), the "
            "server's --naive-max-n). Split the batch or use algo 'iter' or 'fast'.",
        )


def _naive_calls(n: int) -> int:
    """About how many calls naive(n) makes, F(n + 1); saturating at F(93) (about 1.2e19),
    so a configured ``naive_max_n`` of 93 or more is not an IndexError."""
    return FAST_TABLE[min(n + 1, ITER_MAX_N)]


def _check_reply_size(estimate: int, limits: Limits) -> None:
    if estimate > limits.max_reply_bytes:
        raise RequestError(
            ErrorCode.REPLY_TOO_LARGE,
            f"The reply would be about {estimate:,} bytes; the limit is "
            f"{limits.max_reply_bytes:,} bytes ({limits.max_reply_source}).",
        )


def _out_of_range_digits(digits: int, algo: str, limits: Limits) -> RequestError:
    return RequestError(
        ErrorCode.OUT_OF_RANGE,
        f"n has {digits:,} digits, above the largest n for {algo!r}, which is "
        f"{limits.max_n(algo):,}{_max_n_option(algo)}.",
    )


def _max_n_option(algo: str) -> str:
    """The option setting ``algo``'s largest n, for a refusal; iter's bound is fixed."""
    option = _MAX_N_OPTIONS.get(algo)
    return f" (the server's {option})" if option else ""


def _show(value: Any) -> str:
    """A client's value, short, for an error message: a body as the text it is (quoted;
    bytes that are no text escaped), never as a Python ``b'...'`` repr."""
    if isinstance(value, bytes | bytearray):
        shown = (chr(b) if 32 <= b < 127 and b != 34 else f"\\x{b:02x}" for b in value)
        text = '"' + "".join(shown) + '"'
    else:
        text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", float: "a number with a fraction", str: "a string"}
    names |= {type(None): "null", dict: "an object", list: "a list"}
    return names.get(type(value), type(value).__name__)


# -- replies ---------------------------------------------------------------------------


def encode_result(text: str, form: str) -> bytes:
    """The reply body for one result, given its decimal text."""
    if form == TEXT:
        return text.encode("ascii")
    return b'{"result":"' + text.encode("ascii") + b'"}'


def encode_results(texts: list[str]) -> bytes:
    """The reply body for a batch: decimal strings in request order."""
    if not texts:
        return b'{"results":[]}'
    return ('{"results":["' + '","'.join(texts) + '"]}').encode("ascii")


def encode_values(values: Sequence[int], reads: Sequence[str]) -> tuple[bytes, str] | None:
    """A binary reply body and its content type for results all under 2**64: ``U64``
    if the client reads it, else ``INTS``; None if it reads neither."""
    if U64 in reads:
        packed = array.array(_U64_CODE, values)
        if _SWAP:
            packed.byteswap()
        return packed.tobytes(), U64
    if INTS in reads:
        return encode_magnitudes([magnitude(int(v)) for v in values], reads)
    return None


def encode_magnitudes(
    magnitudes: Sequence[bytes], reads: Sequence[str]
) -> tuple[bytes, str] | None:
    """A binary reply body and its content type for results given as their magnitudes
    (little-endian bytes, ``magnitude``): ``U64`` when every one fits in 8 bytes and
    the client reads it, else ``INTS``; None if the client reads neither."""
    if U64 in reads and all(len(m) <= 8 for m in magnitudes):
        return b"".join(m.ljust(8, b"\0") for m in magnitudes), U64
    if INTS in reads:
        pack = _U32.pack
        return b"".join([part for m in magnitudes for part in (pack(len(m)), m)]), INTS
    return None


def decode_values(body: bytes, content_type: str | None) -> list[int]:
    """The results of a binary reply (``U64`` or ``INTS``), in order.

    Raises ``ValueError`` for a body that does not fit its form (a length not a multiple
    of 8; a length prefix that runs past the end)."""
    if media_type(content_type) == U64:
        if len(body) % 8:
            raise ValueError(f"a {U64} body of {len(body)} bytes is not a multiple of 8")
        values = array.array(_U64_CODE, body)
        if _SWAP:
            values.byteswap()
        return values.tolist()
    view = memoryview(body)
    out: list[int] = []
    at, end = 0, len(body)
    unpack = _U32.unpack_from
    while at < end:
        if at + 4 > end:
            raise ValueError(f"a {INTS} body ends inside a length prefix, at byte {at}")
        (size,) = unpack(view, at)
        at += 4
        if at + size > end:
            raise ValueError(f"a {INTS} value of {size} bytes at byte {at} runs past the end")
        out.append(int.from_bytes(view[at : at + size], "little"))
        at += size
    return out


def is_binary(content_type: str | None) -> bool:
    """Whether a reply's content type is one of the binary forms."""
    return content_type is not None and media_type(content_type) in BINARY_FORMS


def encode_error(error: RequestError) -> bytes:
    """The JSON error envelope for a refused request."""
    return json.dumps({"error": {"code": error.code, "message": error.message}}).encode()


def decode_reply(body: bytes, content_type: str | None) -> str | list[str]:
    """A reply's decimal text (or list of texts, for a batch).

    Raises ``RequestError`` for an error envelope, with the server's code and message.
    """
    if media_type(content_type) != JSON:
        return body.decode("ascii")
    try:
        doc = json.loads(body)
        if "results" in doc:
            results: list[str] = doc["results"]
            return results
        if "result" in doc:
            result: str = doc["result"]
            return result
        error = doc["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RequestError(
            ErrorCode.MALFORMED, f"The server's reply could not be decoded: {exc}"
        ) from None
    raise RequestError(str(code), str(message))


def encode_request(
    n: int | list[int], algo: str, *, binary: bool = False
) -> tuple[bytes, str | None, str | None]:
    """A request's body, content type and AMQP ``type``.

    One n travels in the text form (the smallest and quickest to parse), with the
    algorithm in ``type`` unless it is the default. A batch travels as JSON; with
    ``binary``, as ``U64`` (8 bytes an n, the algorithm in ``type``) when every n is
    between 0 and 2**64 - 1 (any other n goes as JSON, to be refused by the server).
    """
    if type(n) is int:
        text = str(n) if -_STR_DIGITS < n < _STR_DIGITS else decimal(n)
        return text.encode("ascii"), None, None if algo == DEFAULT_ALGORITHM else algo
    if binary and isinstance(n, list):
        try:
            packed = array.array(_U64_CODE, n)
        except OverflowError:  # a negative n, or one past 64 bits
            pass
        else:
            if _SWAP:
                packed.byteswap()
            return packed.tobytes(), U64, algo
    return json.dumps({"n": n, "algo": algo}, separators=(",", ":")).encode(), JSON, None


def to_int(text: str) -> int:
    """An int from decimal text; GMP for long texts (``int()`` is quadratic past ~4,300)."""
    if len(text) < 4000:
        return int(text)
    import gmpy2  # noqa: PLC0415 - only for long texts: `fibrpc call` starts faster

    return int(gmpy2.mpz(text))


def to_ints(texts: list[str]) -> list[int]:
    """``to_int`` of each text, with ``int`` mapped straight over the usual batch (every
    text under Python's 4,300-digit limit): a third cheaper than a call per value, on the
    client's largest cost per batch (bench/bench_protocol.py)."""
    try:
        return list(map(int, texts))
    except ValueError:  # a text past the limit: GMP where it is long
        return [to_int(text) for text in texts]
