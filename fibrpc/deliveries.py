"""What a worker does with a delivery before computing it: pure policy, no pika, no I/O.

Two questions, each a function here, tested in milliseconds (tests/test_deliveries.py):

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
    """The verdict on a decoded request.

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
