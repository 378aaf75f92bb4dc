"""The broker, as a worker sees it: the small ``WorkerLink`` protocol.

``fibrpc.serverlink.AmqpWorkerLink`` is the real one; tests implement it without a broker
(tests/test_worker.py). The worker (``fibrpc.server.Worker``) drives the broker through it
alone: no module of the worker imports pika.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol


class WorkerLink(Protocol):
    """The broker, as a worker sees it (``fibrpc.serverlink.AmqpWorkerLink`` is the real
    one). Every method but ``open`` raises ``LinkLostError`` when the connection is
    gone and ``ChannelClosedError`` when the broker closed the channel."""

    url: str  #: the node connected to (or tried last)

    def open(
        self,
        on_request: Callable[[Any, Any, Any, bytes], None],
        on_cancel: Callable[[], None],
    ) -> None:
        """Connect, declare the queue and consume it: each delivery reaches
        ``on_request(channel, method, properties, body)`` during ``turn``. Raises
        ``BrokerUnreachableError`` (retried) or another ``BrokerError``/``ConfigError``."""

    def turn(self) -> None:
        """Write what is queued, wait a little for I/O, run what arrived."""

    def is_open(self) -> bool:
        """Whether replies and acks can still go out."""

    def reply(self, props: Any, body: bytes, content_type: str) -> None:
        """Queue the reply to the request of ``props``."""

    def ack(self, tag: int) -> None:
        """Queue the ack of delivery ``tag``."""

    def republish(
        self, routing_key: str, body: bytes, props: Any, headers: Mapping[str, Any]
    ) -> None:
        """Queue a copy of a request with ``headers``."""

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` during a later ``turn`` (from any thread)."""

    def consume_again(self) -> bool:
        """Declare the queue and consume again after the broker cancelled the consumer:
        True. False when the queue went again before the consume: the link has a fresh
        channel, not consuming, on which the old one's deliveries cannot be acked."""

    def cancel(self, timeout: float) -> None:
        """Stop consuming (waiting up to ``timeout`` seconds for the broker)."""

    def close(self) -> None:
        """Close within a couple of seconds, whatever the broker does."""

    def open_control(
        self, server: str | None, on_control: Callable[[str, bytes], None]
    ) -> str | None:
        """Open the control path (``fibrpc.control``): each message of the servers'
        exchange reaches ``on_control(routing_key, body)`` during ``turn``. Returns None,
        or why it could not be opened (the path is then off)."""

    def forward(self, route: str, body: bytes) -> bool:
        """Publish to the control exchange; False when the path is off."""
