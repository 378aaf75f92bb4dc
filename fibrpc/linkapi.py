"""What the client's driver (``fibrpc.driver``) sees of the broker: the ``Link`` protocol it
turns, the ``LinkEvents`` a link reports back, and ``LinkLost``. No pika:
``fibrpc.link.AmqpLink`` is the real link; tests implement one without a broker.
"""

from __future__ import annotations

from typing import Protocol

from fibrpc.calls import Call
from fibrpc.errors import FibrpcError


class LinkLost(Exception):  # noqa: N818 - internal, never raised out of the driver
    """The link's connection is gone (the driver reconnects). Never leaves fibrpc."""


class LinkEvents(Protocol):
    """What a link reports, on the thread that turns it."""

    def on_reply(self, corr_id: str | None, content_type: str | None, body: bytes) -> None: ...
    def on_return(self, corr_id: str | None) -> None: ...
    def on_consumers(self, consumers: int | None) -> None: ...
    def on_probe_refused(self, reply_code: int, reply_text: str) -> None: ...
    def on_blocked(self, reason: str | None) -> None: ...


class Link(Protocol):
    """The broker, as the driver sees it (``fibrpc.link.AmqpLink`` is the real one)."""

    url: str
    queue: str
    described: str  #: the node connected to (or to try), its password hidden

    def open(self, events: LinkEvents) -> None:
        """Connect; raise ``BrokerError``."""

    def publish(self, call: Call) -> None:
        """Queue the request of ``call``; raise ``LinkLost``."""

    def turn(self, *, wait: bool) -> None:
        """Write, wait up to a tick if ``wait``, read; raise ``LinkLost``."""

    def channel_closed(self) -> FibrpcError | None:
        """Why the broker closed the channel (a ``BrokerError``), or None."""

    def reopen(self) -> None:
        """A new channel after ``channel_closed``; raise ``LinkLost``."""

    def ask_consumers(self) -> None:
        """Ask how many consumers the queue has (answered by ``on_consumers``, or once
        by ``on_probe_refused``)."""

    def publish_control(
        self, content_type: str, body: bytes, corr_id: str | None, ttl_ms: int
    ) -> None:
        """Queue a control message (``fibrpc.control``) to the request queue, with the
        calls' reply address; raise ``LinkLost``."""

    def wake(self) -> None:
        """Make a waiting ``turn`` return (thread-safe)."""

    def close(self) -> None:
        """Close within about a second."""
