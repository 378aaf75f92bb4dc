"""The client's link to RabbitMQ: one connection (to the first node of a cluster that
answers; the next one after a loss), a channel that consumes the replies (RabbitMQ's
direct reply-to, or with ``reply_queue="exclusive"`` a server-named exclusive queue
declared on each new connection), publishing requests, and asking how many consumers
the queue has. Everything of pika the
client needs goes through ``fibrpc.amqp`` from here; the driver (``fibrpc.driver``) sees
only the ``Link`` protocol (``fibrpc.linkapi``), which tests implement without a broker.

Every pika error that means the connection is gone leaves here as ``LinkLost``; a refusal
on the channel is reported by ``channel_closed`` and the channel reopened with ``reopen``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Final

from fibrpc import amqp, protocol, tracing
from fibrpc.calls import Call, wants_binary
from fibrpc.config import DEFAULT_REPLY_QUEUE
from fibrpc.errors import BrokerError
from fibrpc.linkapi import LinkEvents, LinkLost
from fibrpc.tls import TLSOptions
from fibrpc.urls import redact

#: RabbitMQ's largest per-message TTL in milliseconds (ten years): a longer one closes
#: the channel the message was published on, failing every call on it.
MAX_TTL_MS: Final = 315_360_000_000


class AmqpLink:
    """The ``fibrpc.linkapi.Link`` over a real RabbitMQ connection (see the module
    docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        queue: str,
        *,
        heartbeat: int,
        tls: TLSOptions | None,
        connect_timeout: float,
        tick: float,
        reply_queue: str = DEFAULT_REPLY_QUEUE,
    ) -> None:
        """``reply_queue``: ``direct`` (RabbitMQ's direct reply-to) or ``exclusive`` (a
        queue of the client's own; see ``fibrpc.config.REPLY_QUEUES``), checked by the
        client."""
        self.urls = tuple(urls)
        self.url = self.urls[0]  # the node connected to (or tried last)
        self.described = redact(self.url)
        self._next = 0  # the node to try first on the next open: the one after the last
        self.queue = queue
        self._heartbeat = heartbeat
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._tick = tick
        self._events: LinkEvents | None = None
        self._conn: Any = None
        self._channel: Any = None
        self._probe: amqp.QueueProbe | None = None
        self._exclusive = reply_queue == "exclusive"
        #: Where replies come: direct reply-to, or this connection's own queue (a new
        #: name on every connection: calls re-sent after a reconnect carry the new one).
        self.reply_to = amqp.DIRECT_REPLY_TO
        self._reply_queue: str | None = None  # the exclusive queue, once declared

    def open(self, events: LinkEvents) -> None:
        """Connect, consume replies, and report to ``events``. Raises ``BrokerError``."""
        self._events = events
        self._conn, node = amqp.connect_any(
            self.urls,
            start=self._next,
            heartbeat=self._heartbeat,
            name="fibrpc-client",
            tls=self._tls,
            connect_timeout=self._connect_timeout,
        )
        self.url = self.urls[node]
        self.described = redact(self.url)
        self._next = node + 1  # if this connection is lost, fail over to the next node
        self._reply_queue = None  # an exclusive queue died with the last connection
        try:
            with amqp.translating(self.url):
                amqp.on_blocked(self._conn, events.on_blocked)
                amqp.keep_ticking(self._conn, self._tick)  # once per connection
                self._probe = amqp.QueueProbe(
                    self._conn, self.queue, events.on_consumers, events.on_probe_refused
                )
                self._open_channel()
        except BaseException:
            self.close()
            raise

    def _open_channel(self) -> None:
        events = self._events
        assert events is not None
        self._channel = self._conn.channel()

        def on_reply(channel: Any, method: Any, props: Any, body: bytes) -> None:
            events.on_reply(props.correlation_id, props.content_type, body)

        def on_return(channel: Any, method: Any, props: Any, body: bytes) -> None:
            events.on_return(props.correlation_id)

        if self._exclusive:
            # Declared once per connection: a channel closed by a refusal leaves the
            # queue (and the replies that came meanwhile) to the next channel.
            if self._reply_queue is None:
                self._reply_queue = amqp.declare_reply_queue(self._channel, self.url)
            self.reply_to = self._reply_queue
        amqp.consume_direct(self._conn, self._channel, self.reply_to, on_reply, auto_ack=True)
        amqp.on_return(self._channel, on_return)

    def publish(self, call: Call) -> None:
        """Queue ``call``'s request with what is left of its time (until ``call.expires``,
        which the driver sets) as the message's TTL (at most RabbitMQ's largest) and a
        deadline header (with no deadline, neither);
        unless it asks for text, a header naming the binary forms of results the client
        reads; and the trace context of a traced call. Raises ``LinkLost``."""
        left = call.expires - time.monotonic()
        expiration: str | None = None
        headers: dict[str, int | str] | None = None
        if left != math.inf:
            remaining_ms = max(1, min(MAX_TTL_MS, int(left * 1000)))
            expiration = str(remaining_ms)
            headers = {protocol.DEADLINE_HEADER: int(time.time() * 1000) + remaining_ms}
        if wants_binary(call.n, call.as_):
            headers = headers or {}
            headers[protocol.ACCEPT_HEADER] = protocol.ACCEPT_BINARY
        if call.span is not None:
            headers = {**(headers or {}), **(call.trace or {})}
            tracing.published(call.span, self.url)
        try:
            amqp.publish_soon(
                self._channel,
                self.queue,
                call.body,
                mandatory=True,
                reply_to=self.reply_to,
                correlation_id=call.corr_id,
                content_type=call.content_type,
                message_type=call.msg_type,
                expiration=expiration,
                headers=headers,
            )
        except amqp.ConnectionLost as exc:
            raise LinkLost(exc) from exc

    def publish_control(
        self, content_type: str, body: bytes, corr_id: str | None, ttl_ms: int
    ) -> None:
        """Queue a control message (``fibrpc.control``) to the request queue with the
        calls' reply address (direct reply-to on this channel, or the exclusive reply
        queue: a worker names a call by it and its correlation id) and a TTL of
        ``ttl_ms``. Raises ``LinkLost``."""
        try:
            amqp.publish_soon(
                self._channel,
                self.queue,
                body,
                reply_to=self.reply_to,
                correlation_id=corr_id,
                content_type=content_type,
                expiration=str(max(1, ttl_ms)),
            )
        except amqp.ConnectionLost as exc:
            raise LinkLost(exc) from exc

    def turn(self, *, wait: bool) -> None:
        """Write what is queued and take in what has arrived (waiting up to a tick if
        ``wait``); the events fire meanwhile. Raises ``LinkLost``."""
        try:
            if wait:
                amqp.run_io(self._conn)  # returns within a tick (keep_ticking)
            else:
                self._conn.process_data_events(time_limit=0)
        except amqp.ConnectionLost as exc:
            raise LinkLost(exc) from exc

    def channel_closed(self) -> BrokerError | None:
        """Why the broker closed the channel, if it has (a refusal, translated); None
        while it is open."""
        if self._channel is None or not self._channel.is_closed:
            return None
        reason = amqp.closing_reason(self._channel)
        if isinstance(reason, BaseException):
            return amqp.translate(reason, self.url)
        return BrokerError(f"RabbitMQ closed the client's channel: {reason}")

    def reopen(self) -> None:
        """A fresh channel after ``channel_closed``. Raises ``LinkLost``."""
        try:
            self._open_channel()
        except amqp.ConnectionLost as exc:
            raise LinkLost(exc) from exc

    def ask_consumers(self) -> None:
        """Ask how many consumers the queue has; ``events.on_consumers`` answers on a
        later turn (never a round trip on this one), or ``events.on_probe_refused`` once
        if the broker refuses the question (and then it is not asked again)."""
        if self._probe is not None:
            self._probe.ask()

    def wake(self) -> None:
        """Make a ``turn`` waiting in another thread return (thread-safe)."""
        conn = self._conn
        if conn is not None:
            amqp.wake(conn)

    def close(self) -> None:
        """Close within about a second, whatever the broker does."""
        conn, self._conn = self._conn, None
        self._channel = None
        self._probe = None
        if conn is not None:
            amqp.close_within(conn, 1.0)
