"""How long to wait before trying a broker again: one policy for the client and workers.

Pure: ``reconnect_delay(attempt)`` is the pause after the ``attempt``-th failed round
(0-based) of connecting to every node; it grows from 0.1 s to 5 s and stays there. An
outage is never a crash: the caller keeps trying, this only spaces the tries.

``Reconnects`` keeps that count across connections: one that is lost within
``HEALTHY_AFTER`` seconds of opening (a broker that accepts and then drops every
connection, or closes it on the first message) does not start the pauses again from
none, so a process never reconnects more than a few times a second, whatever the
broker does. Its pauses are jittered (``jittered``): processes that lost the same node
at once do not all come back at the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

#: Seconds after failed round 0, 1, 2, ...; the last repeats.
RECONNECT_DELAYS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

#: Seconds a connection must last to count as healthy: losing it then reconnects at
#: once; losing it sooner goes on with the pauses where they were.
HEALTHY_AFTER: Final = 10.0


def reconnect_delay(attempt: int, delays: tuple[float, ...] = RECONNECT_DELAYS) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0, 1, ...) before the next."""
    return delays[min(max(attempt, 0), len(delays) - 1)]


def jittered(delay: float, rand: float) -> float:
    """``delay`` seconds spread over its upper half by ``rand`` (0 <= rand < 1)."""
    return delay * (0.5 + 0.5 * rand)


class Reconnects:
    """When to try again after a lost connection (see the module docstring). Pure: the
    caller passes the times (``time.monotonic()``) and does the waiting.

    The first try after losing a healthy connection is at once (a failover should be
    quick); every later one, until a connection lasts ``healthy_after`` seconds, waits
    ``jittered(reconnect_delay(k, delays))`` for the k-th (0-based) pause."""

    def __init__(
        self,
        delays: tuple[float, ...] = RECONNECT_DELAYS,
        *,
        healthy_after: float = HEALTHY_AFTER,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.delays = delays
        self.healthy_after = healthy_after
        self._rand = rand
        #: Tries since the last healthy connection was lost.
        self.tries = 0
        self._since: float | None = None  # when the connection in use opened

    def connected(self, now: float) -> None:
        """A connection opened at ``now``."""
        self._since = now

    def lost(self, now: float) -> None:
        """The connection was lost at ``now``: after a healthy one, start afresh."""
        if self._since is not None and now - self._since >= self.healthy_after:
            self.tries = 0
        self._since = None

    def pause(self) -> float:
        """Seconds to wait before the next try (0: none); counts that try."""
        tries, self.tries = self.tries, self.tries + 1
        if tries == 0:
            return 0.0
        return jittered(reconnect_delay(tries - 1, self.delays), self._rand())
