"""The client's outgoing control messages (``fibrpc.control``): the cancels of calls given
up on, gathered from any thread and sent at the driver's next turn (one message for
however many, ``control.MAX_CANCEL_IDS`` ids at most, and no more often than every
``CANCEL_EVERY`` seconds, so a storm of 10,000 futures cancelled one by one is a few
messages, not one per turn); the other control messages waiting (a describe); and who
hears the replies to a control message, by correlation id. No pika: sent through the
driver's ``Link``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Final

from fibrpc import control
from fibrpc.linkapi import Link

#: Seconds between two cancel messages at most: the cancels gathered meanwhile go in one
#: (a storm of 10,000 futures cancelled one by one is a few messages, not one per turn).
CANCEL_EVERY: Final = 0.1


class ControlBox:
    """Cancels and control messages waiting for the driver's next turn, and the
    listeners of control replies. ``lock`` is the driver's (it guards its outbox too)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        #: Correlation ids of calls given up on, to cancel at the next turn (one message
        #: per turn for however many: ``fibrpc.control``); guarded by ``_lock``.
        self._cancels: list[str] = []
        #: Control messages to send at the next turn: content type, body, id, TTL.
        self._controls: list[tuple[str, bytes, str, int]] = []
        #: Who hears the replies to a control message (a describe), by correlation id.
        self._listeners: dict[str, Callable[[str | None, bytes], None]] = {}
        self.cancels_sent = 0  #: cancel messages sent (for tests and the bench)
        self._next_cancel = 0.0  # monotonic: no cancel message before this

    @property
    def pending(self) -> bool:
        """Whether anything waits to be sent, or a listener waits for replies."""
        return bool(self._cancels or self._controls or self._listeners)

    def due(self) -> bool:
        """Whether ``send`` has something to send now (cancels wait for ``CANCEL_EVERY``
        since the last ones)."""
        return bool(self._controls or (self._cancels and time.monotonic() >= self._next_cancel))

    def cancel(self, corr_ids: Iterable[str]) -> bool:
        """Gather ``corr_ids`` to cancel (any thread); returns whether they are the first
        since the last send (then the driver is to be woken)."""
        with self._lock:
            first = not self._cancels
            self._cancels.extend(corr_ids)
        return first

    def control(
        self,
        content_type: str,
        body: bytes,
        corr_id: str,
        ttl_ms: int,
        listener: Callable[[str | None, bytes], None] | None = None,
    ) -> None:
        """Queue a control message; ``listener(content_type, body)`` hears every reply
        carrying ``corr_id`` until ``unlisten`` (any thread)."""
        if listener is not None:
            self._listeners[corr_id] = listener
        with self._lock:
            self._controls.append((content_type, body, corr_id, ttl_ms))

    def unlisten(self, corr_id: str) -> None:
        """Stop hearing the replies of ``corr_id``; later ones are dropped as unknown."""
        self._listeners.pop(corr_id, None)

    def listener(self, corr_id: str | None) -> Callable[[str | None, bytes], None] | None:
        """Who hears the replies of ``corr_id``, if anyone."""
        return self._listeners.get(corr_id) if corr_id is not None else None

    def send(self, link: Link) -> None:
        """Publish the cancels gathered since the last turn (``control.MAX_CANCEL_IDS``
        to a message) and the control messages waiting. A cancel lost with the link is
        not sent again: it would only have saved the servers some work. Raises
        ``LinkLost``."""
        with self._lock:
            cancels, self._cancels = self._cancels, []
            controls, self._controls = self._controls, []
        step = control.MAX_CANCEL_IDS
        if cancels:
            self._next_cancel = time.monotonic() + CANCEL_EVERY
        for start in range(0, len(cancels), step):
            body = control.encode_cancel(cancels[start : start + step])
            link.publish_control(control.CANCEL, body, None, control.CANCEL_TTL_MS)
            self.cancels_sent += 1
        for content_type, body, corr_id, ttl_ms in controls:
            link.publish_control(content_type, body, corr_id, ttl_ms)
