"""What a worker does with each delivery: pure policy, no pika, no I/O.

A delivery's fate (``Fate``) is decided in two steps, each a pure function of the
delivery and the worker's state, tested in milliseconds (tests/test_deliveries.py, one
test per rule); the worker (``fibrpc.server``) only carries the decision out:

* ``screen``, before decoding: a message with no usable ``reply_to`` is dropped (there
  is nowhere to answer), one whose caller has given up is skipped; else it is decoded.
* ``decide``, after decoding: a redelivered request that is charged (a suspect of a crash,
  or one whose reply the broker refused) is republished with its count, or, past the
  limit, refused as poison or dropped; otherwise a refusal is answered, and a request is
  computed inline (light) or on the compute thread (heavy).

Under them, two questions:

* **Has its caller given up?** (``expired``) A request carries its budget twice: the
  message's TTL (``expiration``, milliseconds, relative: RabbitMQ drops a request that
  waited longer in the queue) and an absolute deadline header (the client's wall clock).
  Clocks differ between machines, so the wall-clock deadline is trusted only with an
  allowance of the request's own budget, and the worker also keeps a clock of its own
  from the moment the request reached it: a request held longer than its whole budget
  cannot have a caller waiting. A skew under the call's timeout never skips a call.

* **Is it poison?** (``judge``) A worker that dies hands every request it held back to
  the broker, which redelivers them all. Only a request that was being computed when a
  worker died (a *suspect*: ``fibrpc.inflight``) may have caused the crash, so only a
  suspect's redelivery counts against it; the count travels in a header of a re-published
  copy. Requests merely prefetched or queued behind it are computed as if new.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

from fibrpc.protocol import DEADLINE_HEADER, DELIVERIES_HEADER


def expired(
    *,
    now_wall_ms: float,
    now: float,
    received: float,
    deadline_ms: int | None,
    budget_ms: int | None,
) -> bool:
    """Whether a request's caller has certainly given up.

    ``now`` and ``received`` are this process's monotonic clock (seconds);
    ``now_wall_ms`` is its wall clock (Unix milliseconds). ``deadline_ms`` is the
    request's deadline header (the caller's wall clock), ``budget_ms`` its TTL; either
    may be missing. Without a budget, the deadline is trusted as it is.
    """
    if budget_ms is not None and (now - received) * 1000.0 > budget_ms:
        return True
    if deadline_ms is None:
        return False
    return now_wall_ms > deadline_ms + (budget_ms or 0)


class Action(enum.Enum):
    """What to do with a request that has been decoded and is not refused."""

    COMPUTE = "compute"
    #: Re-publish a copy carrying ``Verdict.deliveries`` and ack the original, then the
    #: copy is computed when it comes back (the count must outlive this delivery).
    REPUBLISH = "republish"
    REFUSE_POISON = "refuse_poison"


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    deliveries: int  #: the deliveries counted against the request so far


COMPUTE = Verdict(Action.COMPUTE, 1)


def judge(*, redelivered: bool, suspect: bool, counted: int | None, max_deliveries: int) -> Verdict:
    """The verdict on a decoded request (``decide`` uses it).

    ``redelivered``: the broker says it was delivered before (``redelivered`` flag or a
    quorum queue's ``x-delivery-count``). ``suspect``: it was being computed when a
    worker died. ``counted``: the deliveries header of a copy re-published earlier, or
    None. A request that is not both redelivered and suspect is computed, whatever its
    count so far.
    """
    if not (redelivered and suspect):
        return COMPUTE
    deliveries = max(1, counted or 0) + 1
    if deliveries > max_deliveries:
        return Verdict(Action.REFUSE_POISON, deliveries)
    return Verdict(Action.REPUBLISH, deliveries)


#: The header of a quorum queue's own count of a message's deliveries.
QUORUM_DELIVERIES: Final = "x-delivery-count"


class Fate(enum.Enum):
    """What the worker does with one delivery."""

    #: No usable ``reply_to``: ack it; there is nowhere to answer.
    DROP = "drop"
    #: Its caller has given up (its deadline passed): ack it without computing.
    EXPIRED = "expired"
    #: The request is refused (the decoded request is an error reply): reply, then ack.
    REFUSE = "refuse"
    #: Compute it inline, in the I/O thread's callback, then reply and ack.
    LIGHT = "light"
    #: Compute it on the compute thread; reply and ack back on the I/O thread.
    HEAVY = "heavy"
    #: Charged: republish a copy carrying ``Decision.deliveries``, then ack the original.
    REPUBLISH = "republish"
    #: Charged past the limit after crashes: ack, then reply ``poison``.
    POISON = "poison"
    #: Charged past the limit after the broker closed the channel or connection between
    #: its reply and its ack each time: ack and log once; no reply (it would fail alike).
    UNREPLYABLE = "unreplyable"


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """A delivery's fate, the deliveries counted against it, and, for a request charged
    because its reply went unacked, the broker's reason (``Worker`` logs both)."""

    fate: Fate
    deliveries: int = 1
    reason: str | None = None


# The decisions of almost every delivery are these constants: deciding allocates nothing.
DROP: Final = Decision(Fate.DROP)
EXPIRED: Final = Decision(Fate.EXPIRED)
REFUSE: Final = Decision(Fate.REFUSE)
LIGHT: Final = Decision(Fate.LIGHT)
HEAVY: Final = Decision(Fate.HEAVY)


def screen(
    *,
    reply_to_ok: bool,
    headers: Mapping[str, Any] | None,
    budget_ms: int | None,
    now_wall_ms: float,
) -> Decision | None:
    """The fate of a delivery before it is decoded, or None to decode it.

    ``reply_to_ok``: its ``reply_to`` is one a reply can be published to
    (``amqp.valid_reply_to``); ``headers`` its headers (or None); ``budget_ms`` its TTL;
    ``now_wall_ms`` this process's wall clock (Unix ms). Just taken in, a request cannot
    have been held past its TTL by this worker's clock: only the wall-clock rule of
    ``expired`` can hold.
    """
    if not reply_to_ok:
        return DROP
    if headers:
        deadline = headers.get(DEADLINE_HEADER)
        if is_int(deadline) and now_wall_ms > deadline + (budget_ms or 0):
            return EXPIRED
    return None


def decide(
    *,
    refused: bool,
    heavy: bool,
    redelivered: bool,
    suspect: bool,
    unacked_reply: str | None,
    counted: object,
    max_deliveries: int,
) -> Decision:
    """The fate of a decoded request.

    ``refused``: decoding refused it (an error reply is ready); ``heavy``: computing it
    could starve the I/O loop; ``redelivered``: the broker delivered it before (its flag,
    or a quorum queue's count); ``suspect``: it was being computed when a worker died
    (``fibrpc.inflight``); ``unacked_reply``: this worker replied to it and the broker
    closed the channel or connection before the ack (the broker's reason), else None;
    ``counted``: its deliveries header (anything: only an int counts).

    Only a redelivered request is charged, and only when a reply to it went unacked, or
    when it is a suspect and not a refusal (a refusal computes nothing, so it cannot be
    what crashed a worker).
    """
    if redelivered and (unacked_reply is not None or (suspect and not refused)):
        verdict = judge(
            redelivered=True,
            suspect=True,
            counted=counted if is_int(counted) else None,
            max_deliveries=max_deliveries,
        )
        if verdict.action is Action.REPUBLISH:
            return Decision(Fate.REPUBLISH, verdict.deliveries, unacked_reply)
        if unacked_reply is not None:
            return Decision(Fate.UNREPLYABLE, verdict.deliveries, unacked_reply)
        return Decision(Fate.POISON, verdict.deliveries)
    if refused:
        return REFUSE
    return HEAVY if heavy else LIGHT


def redelivered(flag: bool, headers: Mapping[str, Any] | None) -> bool:
    """Whether the broker delivered a message before: its ``redelivered`` flag, or a
    quorum queue's count in its headers."""
    return flag or (headers is not None and QUORUM_DELIVERIES in headers)


def recount(headers: Mapping[str, Any], deliveries: int) -> dict[str, Any]:
    """The headers of a republished copy: its count (``DELIVERIES_HEADER``), and not the
    broker's own count of the original (a copy is a new message, not a redelivery)."""
    copied = {k: v for k, v in headers.items() if k != QUORUM_DELIVERIES}
    copied[DELIVERIES_HEADER] = deliveries
    return copied


def budget_ms(expiration: object) -> int | None:
    """A request's TTL in milliseconds (its ``expiration``), or None."""
    if not isinstance(expiration, str | bytes) or not expiration:
        return None
    try:
        return int(expiration)
    except ValueError:
        return None


def is_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (pika decodes 64-bit table integers as its own int
    subclass: no ``type() is int``)."""
    return isinstance(value, int) and not isinstance(value, bool)
