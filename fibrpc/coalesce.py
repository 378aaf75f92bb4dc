"""Coalesced calls: independent calls that share one message. Pure: no pika, no I/O.

A client that has several single calls waiting to be sent at the same moment may put
them in one request of content type ``CALLS`` (docs/protocol.md, "Coalesced calls", is
the reference): a JSON array of calls, each with its own id (the correlation id it would
have had alone), n, algorithm and deadline. The reply, of the same content type, is a
JSON array of the answers in request order, each naming its call's id: a result, or an
error envelope of that call alone. A call whose deadline had passed has no entry; a
heavy call is answered in a message of its own, whose correlation id is the call's id.
Only what concerns the whole message (its size, its JSON, the shape of its entries)
refuses it whole, with an ordinary error reply.

This module holds the form (``encode_calls``, ``decode_calls``, ``encode_answers``,
``decode_answers``), the worker's decisions on a coalesced message (``plan``), and the
single request each call becomes when it is split out (``single_request``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.encoder import encode_basestring_ascii as _json_text  # json.dumps's, in C
from typing import Any, Final, NamedTuple

from fibrpc import protocol
from fibrpc.config import Limits
from fibrpc.errors import ErrorCode, RequestError
from fibrpc.numbers import DEFAULT_ALGORITHM

#: The content type of a coalesced request and of its reply.
CALLS: Final = protocol.CALLS
#: The longest id a call may have: it becomes an AMQP correlation id (a shortstr) when
#: the call is answered or re-sent alone.
MAX_ID_BYTES: Final = 255
#: The most calls fibrpc's clients put in one message.
MAX_CALLS: Final = 1000
#: The largest n of a call that fibrpc's clients coalesce, per algorithm: results of at
#: most 64 bits (table lookups for ``fast``, microseconds for ``iter``), and naive
#: recursion that a worker computes inline.
LIGHT_MAX_N: Final = {"fast": 93, "iter": 93, "naive": 22}
_COMPACT: Final = (",", ":")
#: An id of at most this many characters is at most 255 bytes in UTF-8 (4 bytes each).
_SHORT_ID: Final = MAX_ID_BYTES // 4


def is_light(n: object, algo: str) -> bool:
    """Whether a single call of ``n`` with ``algo`` may share a message (``LIGHT_MAX_N``)."""
    bound = LIGHT_MAX_N.get(algo)
    return bound is not None and type(n) is int and 0 <= n <= bound


# -- the client's side -------------------------------------------------------------------


class Outgoing(NamedTuple):
    """One call as a client puts it in a coalesced request (a named tuple: a message
    holds up to ``MAX_CALLS`` of them, made on the client's hot path)."""

    id: str
    n: int
    algo: str
    #: Unix time in milliseconds after which its caller has given up (None: never), and
    #: the milliseconds it had left when sent (its TTL: the allowance for clock skew).
    deadline_ms: int | None = None
    ttl_ms: int | None = None


def encode_calls(calls: Iterable[tuple[str, int, str, int | None, int | None]]) -> bytes:
    """The body of a coalesced request of ``calls`` (``Outgoing``, or tuples of its
    fields): ``[{"id":"a.1","n":30},...]``, with ``algo`` only when it is not the
    default, ``deadline`` and ``ttl`` only when set. Byte for byte what ``json.dumps``
    with compact separators makes of them, built as text: the dicts ``json.dumps``
    wanted were the client's largest cost per coalesced call."""
    parts: list[str] = []
    append = parts.append
    for call_id, n, algo, deadline_ms, ttl_ms in calls:
        head = f'{{"id":{_json_text(call_id)},"n":{n}'
        if algo != DEFAULT_ALGORITHM:
            head = f'{head},"algo":{_json_text(algo)}'
        if deadline_ms is not None:
            head = f'{head},"deadline":{deadline_ms}'
        if ttl_ms is not None:
            head = f'{head},"ttl":{ttl_ms}'
        append(head + "}")
    return ("[" + ",".join(parts) + "]").encode()


class Answer(NamedTuple):
    """One entry of a coalesced reply: a result's decimal text, or an error."""

    id: str
    result: str | None = None
    error: RequestError | None = None


def decode_answers(body: bytes) -> list[Answer]:
    """The entries of a coalesced reply, in order.

    Raises ``ValueError`` (``json`` errors included) for a body that is not such a
    reply: not a JSON array of objects each with a string ``id`` and either a string
    ``result`` or an ``error`` object with a ``code`` and a ``message``."""
    doc = json.loads(body)
    if type(doc) is not list:
        raise ValueError(f"a coalesced reply is a JSON array, not {type(doc).__name__}")
    out: list[Answer] = []
    append = out.append
    new = tuple.__new__  # Answer(call_id, result) without its __new__ in Python (a tenth
    # of the client's time per coalesced call went there)
    for entry in doc:
        if type(entry) is not dict or type(call_id := entry.get("id")) is not str:
            raise ValueError(f"an entry of a coalesced reply has no string id: {entry!r:.80}")
        result = entry.get("result")
        if type(result) is str:
            append(new(Answer, (call_id, result, None)))
            continue
        error = entry.get("error")
        if type(error) is not dict or "code" not in error or "message" not in error:
            raise ValueError(
                f"an entry of a coalesced reply is neither result nor error: {entry!r:.80}"
            )
        append(Answer(call_id, error=RequestError(str(error["code"]), str(error["message"]))))
    return out


# -- the server's side -------------------------------------------------------------------


class Incoming:
    """One call of a coalesced request, decoded and checked alone: accepted (``error``
    None: compute F(``n``) with ``algo``), or refused with ``error``, the refusal of
    this call only. A plain slotted class: a message holds up to thousands of them."""

    __slots__ = ("algo", "deadline_ms", "error", "id", "index", "n", "ttl_ms")

    def __init__(
        self,
        index: int,
        call_id: str,
        n: int,
        algo: str,
        error: RequestError | None = None,
        deadline_ms: int | None = None,
        ttl_ms: int | None = None,
    ) -> None:
        self.index = index  #: its place in the message
        self.id = call_id
        self.n = n  #: -1 when refused
        self.algo = algo
        self.error = error
        #: Unix ms after which its caller has given up, and its TTL in ms (either None).
        self.deadline_ms = deadline_ms
        self.ttl_ms = ttl_ms

    def request(self) -> protocol.Request:
        """The call as a single request (``Handler.is_heavy`` judges it)."""
        return protocol.Request(self.algo, [self.n], batch=False, form=protocol.JSON)


def decode_calls(body: bytes, limits: Limits) -> list[Incoming]:
    """The calls of a coalesced request, each checked alone (a bad n, algorithm,
    deadline or ttl is that call's ``error``; ``protocol`` checks n as for a single JSON
    request).

    Raises ``RequestError`` only for what concerns the whole message: ``body_too_large``
    (over ``limits.max_body_bytes``), ``batch_too_large`` (more than ``limits.max_batch``
    calls), ``malformed`` (not a JSON array of objects, each with a string ``id`` of 1 to
    255 bytes)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(
            ErrorCode.BODY_TOO_LARGE,
            f"The request body has {len(body):,} bytes; the limit is "
            f"{limits.max_body_bytes:,} bytes (the server's --max-body-bytes).",
        )
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError(ErrorCode.MALFORMED, "The JSON body is nested too deeply.") from None
    except ValueError as exc:
        raise RequestError(ErrorCode.MALFORMED, f"The body is not valid JSON: {exc}.") from None
    if type(doc) is not list:
        raise RequestError(
            ErrorCode.MALFORMED,
            f'A {CALLS} request is a JSON array of calls, like [{{"id":"a.1","n":30}}]; '
            f"got {_show(doc)}.",
        )
    if len(doc) > limits.max_batch:
        raise RequestError(
            ErrorCode.BATCH_TOO_LARGE,
            f"The message has {len(doc):,} calls; the limit is {limits.max_batch:,} "
            "(the server's --max-batch).",
        )
    # The usual call, a light n of fast or iter with a short id, is taken in a few
    # steps; anything else is checked at length by _decode_call.
    light = {algo: min(limits.max_n(algo), LIGHT_MAX_N[algo]) for algo in ("fast", "iter")}
    calls: list[Incoming] = []
    append = calls.append
    for i, entry in enumerate(doc):
        if type(entry) is dict:
            call_id = entry.get("id")
            n = entry.get("n")
            algo = entry.get("algo", DEFAULT_ALGORITHM)
            deadline = entry.get("deadline")
            ttl = entry.get("ttl")
            if (
                type(n) is int
                and type(call_id) is str
                and 0 < len(call_id) <= _SHORT_ID
                and algo in light
                and 0 <= n <= light[algo]
                and (deadline is None or (type(deadline) is int and deadline >= 0))
                and (ttl is None or (type(ttl) is int and ttl >= 0))
            ):
                append(Incoming(i, call_id, n, algo, None, deadline, ttl))
                continue
        append(_decode_call(i, entry, limits))
    return calls


def _decode_call(index: int, entry: Any, limits: Limits) -> Incoming:
    call_id = entry.get("id") if type(entry) is dict else None
    if type(call_id) is not str or not 0 < len(call_id.encode("utf-8", "replace")) <= MAX_ID_BYTES:
        raise RequestError(
            ErrorCode.MALFORMED,
            f"Call {index} of the message has no usable id (a string of 1 to {MAX_ID_BYTES} "
            f"bytes, its correlation id); got {_show(entry)}.",
        )
    deadline = entry.get("deadline")
    ttl = entry.get("ttl")
    try:
        for name, value in (("deadline", deadline), ("ttl", ttl)):
            if value is not None and (type(value) is not int or value < 0):
                raise RequestError(
                    ErrorCode.MALFORMED,
                    f'"{name}" must be a whole number of milliseconds, 0 or more; got '
                    f"{_show(value)}.",
                )
        if "n" not in entry:
            raise RequestError(ErrorCode.MALFORMED, f'The call has no "n": {_show(entry)}.')
        n = entry["n"]
        if type(n) is list:
            raise RequestError(
                ErrorCode.NOT_AN_INTEGER,
                "n of a coalesced call is one integer; send a batch as its own message.",
            )
        request = protocol.decode_single(n, entry.get("algo", DEFAULT_ALGORITHM), limits)
    except RequestError as exc:
        algo = entry.get("algo")
        return Incoming(index, call_id, -1, algo if type(algo) is str else "", exc, deadline, ttl)
    return Incoming(index, call_id, request.ns[0], request.algo, None, deadline, ttl)


def encode_answers(answers: Sequence[Answer]) -> bytes:
    """The body of a coalesced reply: ``[{"id":"a.1","result":"832040"},
    {"id":"a.2","error":{"code":"...","message":"..."}}]``, in the order given."""
    parts = []
    for answer in answers:
        head = '{"id":' + json.dumps(answer.id)
        if answer.error is None:
            parts.append(f'{head},"result":"{answer.result}"}}')
        else:
            error = {"code": answer.error.code, "message": answer.error.message}
            parts.append(f'{head},"error":{json.dumps(error, separators=_COMPACT)}}}')
    return ("[" + ",".join(parts) + "]").encode()


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What a worker does with the calls of one coalesced message (``plan``)."""

    refused: list[Incoming]  #: answered with their error in the reply
    expired: list[Incoming]  #: skipped: no entry, nothing computed
    split: list[Incoming]  #: each re-published alone (heavy, or after a crash)
    light: list[Incoming]  #: computed together, answered in the reply
    #: Whether the light calls together are heavy (off the I/O thread, as a whole).
    heavy_together: bool = False


def plan(
    calls: Sequence[Incoming],
    *,
    expired: Callable[[Incoming], bool],
    is_heavy: Callable[[protocol.Request], bool],
    crashed: bool = False,
) -> Plan:
    """Decide each call's fate: refused (its own error), expired (``expired(call)``: its
    caller gave up), split out (heavy alone, by the worker's ``is_heavy``; or every call
    that is neither refused nor expired when the message is a crash suspect,
    ``crashed``, so that only a call that kills again is charged), or light. Light calls
    whose algorithm's calls are heavy together are computed off the I/O thread
    (``Plan.heavy_together``)."""
    refused, gone, split, light = [], [], [], []
    for call in calls:
        if call.error is not None:
            refused.append(call)
        elif (call.deadline_ms is not None or call.ttl_ms is not None) and expired(call):
            gone.append(call)
        elif crashed or (call.n > LIGHT_MAX_N.get(call.algo, -1) and is_heavy(call.request())):
            split.append(call)
        else:
            light.append(call)
    together = False
    by_algo: dict[str, list[int]] = {}
    for call in light:
        by_algo.setdefault(call.algo, []).append(call.n)
    for algo, ns in by_algo.items():
        if len(ns) > 1 and is_heavy(protocol.Request(algo, ns, batch=True, form=protocol.JSON)):
            together = True
    return Plan(refused, gone, split, light, together)


def single_request(call: Incoming) -> bytes:
    """The JSON body of ``call`` re-published alone: ``{"n":...,"algo":...}`` (its reply
    is then an ordinary single reply, whose correlation id is the call's id)."""
    return json.dumps({"n": call.n, "algo": call.algo}, separators=_COMPACT).encode()


@dataclasses.dataclass(frozen=True, slots=True)
class Single:
    """The properties of a call re-published alone (those a worker's link copies)."""

    correlation_id: str
    reply_to: str
    expiration: str | None
    content_type: str = protocol.JSON
    type: str | None = None


#: Headers of a coalesced message that a call split out of it does not inherit: the
#: broker's count of the message, its deliveries so far, its deadline (the call has its
#: own).
_MESSAGE_HEADERS: Final = ("x-delivery-count", protocol.DELIVERIES_HEADER, protocol.DEADLINE_HEADER)


def alone(
    call: Incoming,
    *,
    reply_to: str,
    headers: Mapping[str, Any],
    counted: int | None,
    elapsed_ms: int,
) -> tuple[bytes, Single, dict[str, Any]]:
    """What ``call`` (accepted) becomes split out of its coalesced message, as the body,
    properties and headers of a single JSON request: its correlation id is the call's id,
    so its reply is an ordinary single reply the client matches to the call. It carries
    the message's other headers (its ``x-fibrpc-accept``, trace context), its own
    deadline, what is left of its TTL (``elapsed_ms`` spent since the message arrived),
    and ``counted``, its deliveries so far, when it is split after a crash."""
    copied = {k: v for k, v in headers.items() if k not in _MESSAGE_HEADERS}
    if call.deadline_ms is not None:
        copied[protocol.DEADLINE_HEADER] = call.deadline_ms
    if counted is not None:
        copied[protocol.DELIVERIES_HEADER] = counted
    expiration = None if call.ttl_ms is None else str(max(1, call.ttl_ms - elapsed_ms))
    return single_request(call), Single(call.id, reply_to, expiration), copied


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
