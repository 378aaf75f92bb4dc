"""How long to wait before trying a broker again: one policy for the client and workers.

Pure: ``reconnect_delay(attempt)`` is the pause after the ``attempt``-th failed round
(0-based) of connecting to every node; it grows from 0.1 s to 5 s and stays there. An
outage is never a crash: the caller keeps trying, this only spaces the tries.
"""

from __future__ import annotations

from typing import Final

#: Seconds after failed round 0, 1, 2, ...; the last repeats.
RECONNECT_DELAYS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


def reconnect_delay(attempt: int, delays: tuple[float, ...] = RECONNECT_DELAYS) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0, 1, ...) before the next."""
    return delays[min(max(attempt, 0), len(delays) - 1)]
