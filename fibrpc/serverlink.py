"""The worker's link to RabbitMQ: one connection (to the first node of a cluster that
answers, the next one after a loss), a channel that consumes the request queue,
replies, acks and republished copies. Everything of pika a worker needs goes through
``fibrpc.amqp`` from here; the worker (``fibrpc.server``) sees only the ``WorkerLink``
protocol it defines, which tests implement without a broker (tests/test_worker.py).

Every pika error that means the connection is gone leaves here as ``LinkLostError``; the
broker closing the channel as ``ChannelClosedError`` (with its reply code and text), or as
``AccessRefusedError`` for a refused permission, which retrying cannot help.

The light path stays as lean as it was: deliveries reach the worker's callback straight
from pika's frame handling (``amqp.consume_direct``), and replies and acks are queued on
the connection and written together at the end of the turn (``amqp.publish_soon``,
``amqp.ack_soon``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from fibrpc import amqp, control, refusals
from fibrpc.errors import BrokerError, BrokerUnreachableError, FibrpcError

#: The longest a turn waits for I/O before the worker looks at its flags again.
TURN: Final = 0.25
#: Seconds a closing worker gives the broker to acknowledge before dropping the socket.
CLOSE_WITHIN: Final = 2.0
#: The reply code of a channel closed for a queue that does not exist (any more).
NOT_FOUND: Final = 404


#: Seconds the control path's declares may take: a worker's loop waits meanwhile (it
#: still answers requests), so neither its drain nor its reports may hang on them.
CONTROL_WITHIN: Final = 5.0


class _UnansweredError(Exception):
    """A declare of the control path went unanswered (``CONTROL_WITHIN``)."""


class LinkLostError(Exception):
    """The link's connection is gone (the worker reconnects). Never leaves fibrpc."""


class ChannelClosedError(Exception):
    """RabbitMQ closed the worker's channel (or cancelled its consumer and consuming
    again failed): the worker reconnects. Never leaves fibrpc."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"RabbitMQ closed the channel ({reply_code}, {reply_text!r})")
        self.reply_code = reply_code
        self.reply_text = reply_text


class AmqpWorkerLink:
    """The ``fibrpc.workerlink.WorkerLink`` over a real RabbitMQ connection (see the module
    docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        queue: str,
        *,
        queue_type: str,
        prefetch: int,
        heartbeat: int,
        tls: amqp.TLSOptions | None,
        name: str,
        node: int = 0,
    ) -> None:
        self.urls = tuple(urls)
        self.queue = queue
        self._queue_type = queue_type
        self._prefetch = prefetch
        self._heartbeat = heartbeat
        self._tls = tls
        self._name = name
        self._node = node % len(self.urls)  # the node to try first
        self.url = self.urls[self._node]  # the node connected to (or tried last)
        self._conn: Any = None
        self._channel: Any = None
        self._on_request: Callable[[Any, Any, Any, bytes], None] | None = None
        self._on_cancel: Callable[[], None] | None = None
        self._tag: str | None = None
        self._control: Any = None  # the control path's channel (``open_control``)

    # -- connecting -----------------------------------------------------------------------

    def open(
        self,
        on_request: Callable[[Any, Any, Any, bytes], None],
        on_cancel: Callable[[], None],
    ) -> None:
        """Connect, declare the queue, set the prefetch and consume: each delivery reaches
        ``on_request(channel, method, properties, body)``; ``on_cancel()`` hears of the
        broker cancelling the consumer. Raises ``BrokerUnreachableError`` (retry),
        ``AccessRefusedError``, ``BrokerRefusedError`` or ``ConfigError``."""
        self.close()
        self._on_request, self._on_cancel = on_request, on_cancel
        self._conn, node = amqp.connect_any(
            self.urls, start=self._node, heartbeat=self._heartbeat, name=self._name, tls=self._tls
        )
        self._node = node
        self.url = self.urls[node]
        try:
            with amqp.translating(self.url):
                self._channel = self._conn.channel()
                amqp.declare_request_queue(self._channel, self.queue, queue_type=self._queue_type)
                self._channel.basic_qos(prefetch_count=self._prefetch)
                self._subscribe()
                amqp.keep_ticking(self._conn, TURN)
        except BaseException:
            self.close()
            raise

    def _subscribe(self) -> None:
        on_cancel = self._on_cancel
        assert on_cancel is not None
        self._tag = amqp.consume_direct(
            self._conn,
            self._channel,
            self.queue,
            self._on_request,
            auto_ack=False,
            on_cancel=lambda frame: on_cancel(),
        )

    def consume_again(self) -> bool:
        """After the broker cancelled the consumer (its queue was deleted, say): declare
        the queue and consume it again on the same channel, so the requests held are
        still answered and acked; True.

        False when the queue went between the declare and the consume (RabbitMQ closes
        the channel with 404 NOT_FOUND: a quorum queue still being deleted answers the
        declare, then is gone): the link then has a fresh channel on the same connection,
        not consuming, and the deliveries of the old one can no longer be acked (their
        queue is gone: they never come back). Raises ``ChannelClosedError`` for any
        other close, ``LinkLostError`` when the connection is lost: the worker
        reconnects."""
        try:
            amqp.declare_request_queue(self._channel, self.queue, queue_type=self._queue_type)
            self._subscribe()
            return True
        except Exception as exc:
            failure = self._failure(exc)
            if not (isinstance(failure, ChannelClosedError) and failure.reply_code == NOT_FOUND):
                _raise(failure, exc)
        self._tag = None
        try:
            self._channel = self._conn.channel()
            self._channel.basic_qos(prefetch_count=self._prefetch)
        except Exception as exc:
            _raise(self._failure(exc), exc)
        return False

    def cancel(self, timeout: float) -> None:
        """Cancel the consumer and wait up to ``timeout`` seconds for the broker's answer
        (what still arrives meanwhile is rejected, to be requeued)."""
        if self._tag is not None and self._conn is not None:
            try:
                amqp.cancel_direct(self._conn, self._channel, self._tag, timeout)
            except Exception as exc:
                _raise(self._failure(exc), exc)

    def close(self) -> None:
        """Close within ``CLOSE_WITHIN`` seconds, whatever the broker does."""
        conn, self._conn = self._conn, None
        self._channel = None
        self._control = None
        self._tag = None
        if conn is not None:
            amqp.close_within(conn, CLOSE_WITHIN)

    # -- the control path (``fibrpc.control``) -------------------------------------------

    def open_control(
        self, server: str | None, on_control: Callable[[str, bytes], None]
    ) -> str | None:
        """Declare the servers' control exchange, and on a channel of its own (a refusal
        there closes only that channel) consume a queue of this worker's own, bound for
        cancels, and, given its server's id, the server's describe queue (shared by its
        workers; RabbitMQ deletes it a minute after the last of them went). Each message
        reaches ``on_control(routing_key, body)`` during ``turn``.

        Returns None, or why the control path could not be opened (the server's user may
        not configure those names, say, or RabbitMQ did not answer a declare within
        ``CONTROL_WITHIN`` seconds): then it is off until the next connection, and the
        worker answers control messages on its own. Raises ``LinkLostError`` if the
        connection is lost."""
        exchange = control.exchange_name(self.queue)
        names = [(control.worker_queue_name(self.queue, uuid.uuid4().hex), control.ROUTE_CANCEL)]
        if server:
            names.append((control.server_queue_name(self.queue, server), control.ROUTE_DESCRIBE))

        def on_message(channel: Any, method: Any, props: Any, body: bytes) -> None:
            on_control(method.routing_key, body)

        conn = self._conn

        def ask(method: str, **arguments: Any) -> None:
            if not amqp.ask_within(conn, channel, method, CONTROL_WITHIN, **arguments):
                raise _UnansweredError(
                    f"RabbitMQ at {amqp.redact(self.url)} did not answer {method} of "
                    f"{arguments.get('queue') or arguments.get('exchange')!r} within "
                    f"{CONTROL_WITHIN:.0f} s; on a cluster, the node that holds it may be down"
                )

        try:
            with amqp.translating(self.url):
                channel = conn.channel()
                ask("exchange_declare", exchange=exchange, exchange_type="direct", auto_delete=True)
                for name, route in names:
                    if route == control.ROUTE_CANCEL:
                        ask("queue_declare", queue=name, exclusive=True, auto_delete=True)
                    else:
                        expires = {"x-expires": control.SERVER_QUEUE_EXPIRES_MS}
                        ask("queue_declare", queue=name, durable=True, arguments=expires)
                    ask("queue_bind", queue=name, exchange=exchange, routing_key=route)
                for name, _ in names:
                    amqp.consume_direct(conn, channel, name, on_message, auto_ack=True)
        except BrokerUnreachableError as exc:
            raise LinkLostError(str(exc)) from exc
        except _UnansweredError as exc:
            return str(exc)
        except BrokerError as exc:
            return f"{exc}; give the server's user the permissions of docs/security.md"
        self._control = channel
        return None

    def forward(self, route: str, body: bytes) -> bool:
        """Publish ``body`` to the control exchange with routing key ``route`` (from the
        worker's loop, never inside a delivery's callback: this writes at once). Returns
        False when the control path is off or its channel closed. Raises
        ``LinkLostError``."""
        channel = self._control
        if channel is None or not channel.is_open:
            return False
        try:
            with amqp.translating(self.url):
                channel.basic_publish(control.exchange_name(self.queue), route, body)
        except BrokerUnreachableError as exc:
            raise LinkLostError(str(exc)) from exc
        except BrokerError:
            return False
        return True

    # -- moving messages ------------------------------------------------------------------

    def turn(self) -> None:
        """Write what is queued, wait up to ``TURN`` seconds for I/O, and run what arrived
        (deliveries, callbacks of other threads). Raises ``LinkLostError``,
        ``ChannelClosedError`` or ``AccessRefusedError``."""
        try:
            amqp.run_io(self._conn)
        except (LinkLostError, ChannelClosedError, FibrpcError):
            raise
        except Exception as exc:
            _raise(self._failure(exc), exc)
        if self._channel.is_closed:
            raise self._failure(None)

    def is_open(self) -> bool:
        """Whether the channel can still reply and ack."""
        channel = self._channel
        return channel is not None and channel.is_open

    def reply(self, props: Any, body: bytes, content_type: str) -> None:
        """Queue a reply to the request of ``props`` (to its ``reply_to``, with its
        ``correlation_id``). Raises ``LinkLostError`` or ``ChannelClosedError``."""
        try:
            amqp.publish_soon(
                self._channel,
                props.reply_to,
                body,
                correlation_id=props.correlation_id,
                content_type=content_type,
            )
        except Exception as exc:
            _raise(self._failure(exc), exc)

    def ack(self, tag: int) -> None:
        """Queue the ack of delivery ``tag``. Raises ``LinkLostError`` or
        ``ChannelClosedError``."""
        try:
            amqp.ack_soon(self._channel, tag)
        except Exception as exc:
            _raise(self._failure(exc), exc)

    def republish(
        self, routing_key: str, body: bytes, props: Any, headers: Mapping[str, Any]
    ) -> None:
        """Queue a copy of a request (``props`` and ``body``) with ``headers``. Raises
        ``LinkLostError`` or ``ChannelClosedError``."""
        try:
            amqp.publish_soon(
                self._channel,
                routing_key,
                body,
                content_type=props.content_type,
                correlation_id=props.correlation_id,
                reply_to=props.reply_to,
                expiration=props.expiration,
                message_type=props.type,
                headers=dict(headers),
            )
        except Exception as exc:
            _raise(self._failure(exc), exc)

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the I/O thread during a later ``turn`` (from any thread);
        dropped when the connection is gone."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(Exception):  # the connection is gone: so is the tag
            amqp.call_threadsafe(conn, callback)

    def _failure(self, exc: BaseException | None) -> Exception:
        """What ``exc`` (or the channel's closing) means for the worker: the connection is
        lost, the channel closed (why, from the broker), or access refused. Anything
        else, with the channel open, is not the broker's doing: ``exc`` itself."""
        if isinstance(exc, amqp.ConnectionLost):
            self._node += 1  # fail over: the node may be the one that went away
            return LinkLostError(f"{type(exc).__name__}: {exc}")
        channel = self._channel
        if channel is None or not channel.is_closed:
            if isinstance(exc, Exception):
                return exc
            return ChannelClosedError(0, "the channel is gone")
        reason = amqp.closing_reason(channel)
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", None)
        if code in refusals.ACCESS_REFUSED_CODES and isinstance(reason, BaseException):
            return amqp.translate(reason, self.url)
        return ChannelClosedError(
            code if isinstance(code, int) else 0, text if isinstance(text, str) else str(reason)
        )


def _raise(error: Exception, cause: BaseException) -> NoReturn:
    """Raise ``error`` (from ``cause``, unless it is ``cause`` itself)."""
    if error is cause:
        raise error
    raise error from cause
