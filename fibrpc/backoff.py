"""How long to wait before trying a broker (or a process) again: one policy for all.

Pure: ``jittered(attempt)`` is the pause after the ``attempt``-th failure (0-based): from
0.1 s, doubling up to 5 s, with jitter (so that the workers of a server, or the clients
of a node, all cut off at once, do not come back in step); ``Backoff`` counts the
attempts of one reconnect loop, and starts again from the first once a connection has
stayed healthy for a while (``HEALTHY_AFTER``). An outage is never a crash: the caller
keeps trying, this only spaces the tries, so nothing reconnects more than a few times a
second whatever the broker does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Final

#: ``jittered``: the first pause and the longest (seconds).
FIRST_DELAY: Final = 0.1
MAX_DELAY: Final = 5.0
#: Seconds a connection must last for the next loss to count as a first failure again.
HEALTHY_AFTER: Final = 10.0


def jittered(
    attempt: int,
    *,
    first: float = FIRST_DELAY,
    cap: float = MAX_DELAY,
    draw: float = 1.0,
) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0, 1, ...): ``first`` doubled per
    attempt up to ``cap``, scaled into [half, all] of that by ``draw`` (0..1, a random
    number: ``Backoff`` draws it)."""
    ceiling = min(cap, first * 2.0 ** min(max(attempt, 0), 60))
    return ceiling * (0.5 + 0.5 * min(max(draw, 0.0), 1.0))


class Backoff:
    """The pauses of one reconnect loop: ``failed()`` after each failed try, ``up()`` when
    a connection (or process) is up; the first failure after one that stayed up
    ``healthy_after`` seconds starts from ``first`` again."""

    def __init__(
        self,
        *,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
        healthy_after: float = HEALTHY_AFTER,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.first = first
        self.cap = cap
        self.healthy_after = healthy_after
        self.attempts = 0  #: failures since the last healthy spell
        self._clock = clock
        self._draw = draw
        self._up_since: float | None = None

    def up(self) -> None:
        """A connection is up (from now on it may prove healthy)."""
        self._up_since = self._clock()

    def failed(self) -> float:
        """A try failed, or a connection was lost: the seconds to wait before the next."""
        if self._up_since is not None and self._clock() - self._up_since >= self.healthy_after:
            self.attempts = 0
        self._up_since = None
        delay = jittered(self.attempts, first=self.first, cap=self.cap, draw=self._draw())
        self.attempts += 1
        return delay
