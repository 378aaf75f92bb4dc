"""Control messages: a cancel and a describe, on the request queue's path. Pure: no pika.

A client may only publish to the default exchange (its least privilege: write on
``amq.default``), so a control message travels like a request, to the request queue, with
a content type of its own:

* ``CANCEL`` (``application/vnd.fibrpc.cancel+json``): ``{"cancel": ["id", ...]}``, the
  correlation ids of calls the client has given up on, sent with the same ``reply_to``
  as those calls (the worker's key of a request is its reply address and correlation id:
  ``fibrpc.inflight.key``). No reply, unless it is malformed (``malformed``).
* ``DESCRIBE`` (``application/vnd.fibrpc.describe+json``): ``{}``. Every server answers
  once, with its description (``fibrpc.describe``), carrying the message's correlation id.

The worker that takes one from the request queue acks it and *forwards* it to the
servers' own direct exchange (``exchange_name``; declared by the servers, which may
configure it): a cancel with routing key ``ROUTE_CANCEL``, which every worker's exclusive
queue is bound with, and a describe with ``ROUTE_DESCRIBE``, which each server's one
queue (``server_queue_name``, consumed by all its workers) is bound with, so that a server
answers once, whatever its number of workers. The forwarded body is ``forward``'s:
the original's reply address and correlation id, which RabbitMQ rewrote for direct
reply-to and would not rewrite again, travel in it.

A worker keeps the keys of cancelled requests in a ``CancelSet`` (bounded, each key for
``CANCEL_MEMORY`` seconds): a request it takes later is acked and not computed, and one it
is computing on its heavy path is abandoned (``abandon``: the worker process is replaced,
since numba and GMP cannot be interrupted). A lost cancel only wastes work: the caller
has its answer (an error) already.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
from collections.abc import Iterable
from typing import Final

from fibrpc.errors import ErrorCode, RequestError

CANCEL: Final = "application/vnd.fibrpc.cancel+json"
DESCRIBE: Final = "application/vnd.fibrpc.describe+json"
#: The content types of control messages (a worker checks these before decoding).
FORMS: Final = frozenset((CANCEL, DESCRIBE))
#: The most correlation ids a client puts in one cancel (a storm of 10,000 cancelled
#: calls is one message; a message of them is about 200 KB).
MAX_CANCEL_IDS: Final = 10_000
#: Seconds a cancel waits in the request queue before RabbitMQ drops it (its TTL): a
#: cancel that no worker took within a minute finds nothing left to stop.
CANCEL_TTL_MS: Final = 60_000
#: Seconds a worker remembers a cancelled key, and how many keys at most (the oldest
#: are forgotten first): enough for every request a worker could still be given.
CANCEL_MEMORY: Final = 600.0
CANCEL_CAPACITY: Final = 200_000
ROUTE_CANCEL: Final = "cancel"
ROUTE_DESCRIBE: Final = "describe"
#: A server's describe queue is deleted by RabbitMQ this long after its last consumer
#: went (a server killed without stopping), in milliseconds.
SERVER_QUEUE_EXPIRES_MS: Final = 60_000


def exchange_name(queue: str) -> str:
    """The servers' control exchange of request queue ``queue`` (direct)."""
    return f"{queue}.control"


def server_queue_name(queue: str, server: str) -> str:
    """The describe queue of server ``server`` (its id) on request queue ``queue``."""
    return f"{queue}.server.{server}"


def worker_queue_name(queue: str, token: str) -> str:
    """The exclusive cancel queue of one worker (``token``: unique to the connection)."""
    return f"{queue}.worker.{token}"


def encode_cancel(correlation_ids: Iterable[str]) -> bytes:
    """The body of a cancel of calls ``correlation_ids``."""
    return json.dumps({"cancel": list(correlation_ids)}, separators=(",", ":")).encode()


def encode_describe() -> bytes:
    """The body of a describe request."""
    return b"{}"


def _malformed(message: str) -> RequestError:
    return RequestError(ErrorCode.MALFORMED, message)


def decode_cancel(body: bytes) -> list[str]:
    """The correlation ids a cancel names. Raises ``RequestError`` (``malformed``) naming
    what is wrong: not JSON, not an object with a list ``"cancel"``, an id that is not a
    string, more than ``MAX_CANCEL_IDS`` ids."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(f"A cancel's body must be JSON; got {body[:80]!r} ({exc}).") from exc
    ids = data.get("cancel") if isinstance(data, dict) else None
    if not isinstance(ids, list):
        raise _malformed(
            f'A cancel\'s body is an object {{"cancel": [correlation ids]}}; got {body[:80]!r}.'
        )
    if len(ids) > MAX_CANCEL_IDS:
        raise _malformed(
            f"A cancel names at most {MAX_CANCEL_IDS:,} calls; this one names {len(ids):,}."
        )
    for value in ids:
        if not isinstance(value, str):
            raise _malformed(f"A cancel names calls by correlation id (strings); got {value!r}.")
    return ids


@dataclasses.dataclass(frozen=True, slots=True)
class Forwarded:
    """A control message as the servers pass it on (``forward``): whose it was and, for
    a cancel, the correlation ids it names."""

    reply_to: str
    correlation_id: str | None
    ids: tuple[str, ...] = ()


def forward(reply_to: str, correlation_id: str | None, ids: Iterable[str] = ()) -> bytes:
    """The body a worker forwards to the control exchange."""
    data = {"reply_to": reply_to, "correlation_id": correlation_id, "cancel": list(ids)}
    return json.dumps(data, separators=(",", ":")).encode()


def read_forwarded(body: bytes) -> Forwarded:
    """What ``forward`` wrote. Raises ``RequestError`` (``malformed``) for anything else
    (only servers publish to the exchange, but a bug must not kill a worker)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(f"A forwarded control message is not JSON: {body[:80]!r}.") from exc
    if not isinstance(data, dict):
        raise _malformed(f"A forwarded control message is not an object: {body[:80]!r}.")
    reply_to, correlation_id, ids = (
        data.get("reply_to"),
        data.get("correlation_id"),
        data.get("cancel", []),
    )
    if (
        not isinstance(reply_to, str)
        or not (correlation_id is None or isinstance(correlation_id, str))
        or not isinstance(ids, list)
        or not all(isinstance(i, str) for i in ids)
    ):
        raise _malformed(f"A forwarded control message has a bad field: {body[:80]!r}.")
    return Forwarded(reply_to, correlation_id, tuple(ids))


class CancelSet:
    """The keys of cancelled requests (``fibrpc.inflight.key``), each remembered for
    ``memory`` seconds, at most ``capacity`` of them (the oldest forgotten first).
    ``now`` is a monotonic clock in seconds, passed in (pure: tested without waiting)."""

    def __init__(self, *, memory: float = CANCEL_MEMORY, capacity: int = CANCEL_CAPACITY) -> None:
        if memory <= 0 or capacity < 1:
            raise ValueError(f"memory {memory!r} and capacity {capacity!r} must be positive")
        self.memory = memory
        self.capacity = capacity
        self._until: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def add(self, keys: Iterable[bytes], now: float) -> None:
        """Remember ``keys`` as cancelled until ``now + memory``."""
        until = now + self.memory
        entries = self._until
        for key in keys:
            entries[key] = until
            entries.move_to_end(key)
        self._forget(now)

    def __contains__(self, key: object) -> bool:
        return key in self._until

    def cancelled(self, key: bytes, now: float) -> bool:
        """Whether ``key`` was cancelled and is still remembered at ``now``."""
        until = self._until.get(key)
        if until is None:
            return False
        if until <= now:
            del self._until[key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)

    def __bool__(self) -> bool:
        return bool(self._until)

    def _forget(self, now: float) -> None:
        entries = self._until
        while entries:
            key, until = next(iter(entries.items()))
            if until > now and len(entries) <= self.capacity:
                break
            del entries[key]


class Abandon(enum.Enum):
    """Why a worker stops what it computes on its heavy path (``abandon``)."""

    CANCELLED = "cancelled"  #: its caller sent a cancel
    EXPIRED = "expired"  #: its deadline passed while it was computed


def abandon(*, cancelled: bool, expired: bool, stopping: bool) -> Abandon | None:
    """Whether a worker abandons the request its compute thread is computing (pure).

    ``cancelled``: its key is in the worker's ``CancelSet``; ``expired``: its deadline
    passed (``fibrpc.deliveries.expired``); ``stopping``: the worker drains. A draining
    worker lets the computation end (or the drain time out) rather than exit early with
    the code of abandoned work: the supervisor is stopping it anyway.
    """
    if stopping:
        return None
    if cancelled:
        return Abandon.CANCELLED
    if expired:
        return Abandon.EXPIRED
    return None
