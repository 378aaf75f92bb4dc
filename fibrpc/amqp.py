"""The pika boundary: connecting, declaring, consuming, publishing, translating pika's errors.

Only this module and ``fibrpc.fastpath`` import pika. Every other module that talks to
RabbitMQ gets its connection from ``connect`` and lets ``translate`` (or ``translating``)
turn pika's exceptions into fibrpc's own (``fibrpc.errors``), so callers catch one tree
and no message ever carries a password. URLs are read by ``fibrpc.urls`` and TLS options
by ``fibrpc.tls`` (their names are importable from here too).

This module uses pika's public API only. The hot path goes through here too (``run_io``,
``consume_direct``, ``publish_soon``, ``ack_soon``...): while ``fastpath.enabled()`` each
of these hands over to ``fibrpc.fastpath``, the one module that touches pika's private
names (frames encoded by ``fibrpc.frames`` and written together at the end of a turn,
pika's I/O loop turned directly, deliveries taken in whole); with ``FIBRPC_FAST_PATH=0``,
or a pika whose internals differ, each is pika's own public method. tests/test_boundary.py
checks that this module reaches no private name.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import socket
import ssl
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeVar

import pika
import pika.adapters.utils.connection_workflow as pika_workflow
import pika.exceptions

from fibrpc import fastpath, refusals
from fibrpc.errors import (
    AccessRefusedError,
    BrokerError,
    BrokerRefusedError,
    BrokerUnreachableError,
    ConfigError,
    FibrpcError,
)

# Re-exported: their homes are fibrpc.tls and fibrpc.urls; callers of old use them here.
from fibrpc.tls import TLSOptions as TLSOptions  # noqa: PLC0414
from fibrpc.urls import check_url as check_url  # noqa: PLC0414
from fibrpc.urls import redact as redact  # noqa: PLC0414
from fibrpc.urls import split_urls as split_urls  # noqa: PLC0414

log = logging.getLogger(__name__)

#: The pseudo-queue of RabbitMQ's direct reply-to: replies go straight to the consumer
#: that published the request, with no reply queue to declare or delete.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

#: The pika exceptions that mean the connection (not just a channel) is gone.
ConnectionLost = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.ConnectionWrongStateError,
    pika.exceptions.StreamLostError,
    ConnectionError,
    OSError,
)


@functools.lru_cache(maxsize=4096)  # a client reuses one address for all its calls
def valid_reply_to(reply_to: object) -> bool:
    """Whether a reply can safely be published to ``reply_to``.

    Any queue name will do, except RabbitMQ's direct reply-to addresses that RabbitMQ
    itself never hands out: publishing to ``amq.rabbitmq.reply-to`` bare (from a channel
    that does not consume it) closes the channel, and to a suffix that does not decode
    to a channel (``amq.rabbitmq.reply-to.abc.def``) closes the whole connection (541).
    A real one is ``amq.rabbitmq.reply-to.<base64 of an Erlang pid term>.<key>``.
    """
    if not reply_to or not isinstance(reply_to, str):
        return False  # pika hands over a name that is not UTF-8 as bytes
    if not reply_to.startswith(DIRECT_REPLY_TO):
        return True
    encoded, dot, key = reply_to[len(DIRECT_REPLY_TO) + 1 :].partition(".")
    if reply_to[len(DIRECT_REPLY_TO) : len(DIRECT_REPLY_TO) + 1] != "." or not dot or not key:
        return False
    try:
        term = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (ValueError, binascii.Error):
        return False
    return term[:2] in _PID_TERMS


#: External term format headers of an Erlang pid: NEW_PID_EXT and PID_EXT.
_PID_TERMS = frozenset({b"\x83X", b"\x83g"})


#: Seconds a connection may take from the TCP connect to AMQP's open-ok (TLS included):
#: a broker that accepts TCP and never speaks AMQP (a paused VM, a hung load balancer)
#: is unreachable after this long, not forever.
CONNECT_TIMEOUT: Final = 15.0


def parameters(
    url: str,
    *,
    heartbeat: int | None = None,
    name: str = "fibrpc",
    tls: TLSOptions | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Any:
    """pika connection parameters for ``url``, or ``ConfigError`` naming the bad URL.

    An ``amqps://`` URL always gets a verifying TLS context (``tls`` or the defaults):
    pika's own default for amqps does not check certificates. ``connect_timeout``
    (seconds) bounds the whole opening of the connection.
    """
    try:
        params = pika.URLParameters(url)
        scheme = urllib.parse.urlsplit(url).scheme
    except Exception as exc:  # pika raises ValueError, TypeError, KeyError...
        raise ConfigError(
            f"The broker URL {redact(url)} is not a valid AMQP URL: {exc}", url=redact(url)
        ) from exc
    if scheme == "amqps":
        options = tls or TLSOptions()
        params.ssl_options = pika.SSLOptions(options.context(), server_hostname=params.host)
    elif tls is not None and tls != TLSOptions():
        raise ConfigError(f"TLS options need an amqps:// URL; got {redact(url)}.")
    if heartbeat is not None:
        params.heartbeat = heartbeat
    params.client_properties = {"connection_name": name, "product": "fibrpc"}
    params.connection_attempts = 1
    timeout = max(0.1, min(connect_timeout, CONNECT_TIMEOUT))
    params.socket_timeout = min(5.0, timeout)
    params.stack_timeout = timeout
    params.blocked_connection_timeout = 60
    return params


def connect(
    url: str,
    *,
    heartbeat: int | None = None,
    name: str = "fibrpc",
    tls: TLSOptions | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> Any:
    """Open a ``pika.BlockingConnection`` to ``url`` within ``connect_timeout`` seconds.

    Raises ``BrokerUnreachableError`` when nothing answers in time (refused, unroutable,
    a TLS failure, a broker that accepts TCP and never speaks AMQP) and
    ``AccessRefusedError`` when the broker refuses the login, vhost or permission; both
    name the URL without its password.
    """
    params = parameters(
        url, heartbeat=heartbeat, name=name, tls=tls, connect_timeout=connect_timeout
    )
    with translating(url):
        connection = pika.BlockingConnection(params)
    fastpath.install(connection)
    return connection


def connect_any(
    urls: Sequence[str],
    *,
    start: int = 0,
    heartbeat: int | None = None,
    name: str = "fibrpc",
    tls: TLSOptions | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> tuple[Any, int]:
    """A connection to the first node of ``urls`` that answers, trying them in order from
    ``start`` and round again; returns it and the node's index.

    A node that refuses (the login, a permission) refuses for the whole cluster: that is
    raised at once. When no node answers, raises ``BrokerUnreachableError`` naming each
    with its reason (passwords hidden).
    """
    failures: list[BrokerUnreachableError] = []
    for k in range(len(urls)):
        i = (start + k) % len(urls)
        try:
            connection = connect(
                urls[i], heartbeat=heartbeat, name=name, tls=tls, connect_timeout=connect_timeout
            )
        except BrokerUnreachableError as exc:
            failures.append(exc)
            continue
        if failures:
            log.info("connected to %s (%d node(s) before it did not answer)", redact(urls[i]),
                     len(failures))  # fmt: skip
        return connection, i
    if len(failures) == 1:
        raise failures[0]
    raise BrokerUnreachableError(
        f"None of the {len(urls)} RabbitMQ nodes answered: "
        + " | ".join(f.message for f in failures),
        url=", ".join(redact(u) for u in urls),
    ) from failures[-1]


def translate(exc: BaseException, url: str) -> BrokerError:
    """The fibrpc error for a pika (or socket) exception raised while talking to ``url``:
    ``AccessRefusedError`` for a refused login or permission, ``BrokerRefusedError`` when
    the broker answered and refused (``fibrpc.refusals``), ``BrokerUnreachableError`` when
    it could not be reached or dropped the connection. A fibrpc error passes unchanged."""
    if isinstance(exc, BrokerError):
        return exc
    where = redact(url)
    if isinstance(
        exc,
        pika.exceptions.ProbableAuthenticationError
        | pika.exceptions.AuthenticationError
        | pika.exceptions.ProbableAccessDeniedError,
    ):
        return AccessRefusedError(
            f"RabbitMQ at {where} refused the login or the virtual host: check the user, "
            "password and vhost in the URL.",
            url=where,
        )
    code = _reply_code(exc)
    if code in refusals.ACCESS_REFUSED_CODES:
        return AccessRefusedError(
            f"RabbitMQ at {where} refused access ({code}): {_reply_text(exc)}", url=where
        )
    if code is not None and refusals.is_refusal(code, text := _reply_text(exc)):
        return BrokerRefusedError(
            f"RabbitMQ at {where} refused a request ({code}: {text}); retrying cannot help.",
            reply_code=code,
            reply_text=text,
            url=where,
        )
    tls_failure = _find(exc, ssl.SSLError) or _tls_alert(exc)
    if tls_failure is not None:
        return BrokerUnreachableError(
            f"The TLS handshake with RabbitMQ at {where} failed: {tls_failure}. Check "
            "the CA file (--tls-ca-file), the client certificate (--tls-cert-file), and "
            "that the broker's certificate names the URL's host.",
            url=where,
        )
    if isinstance(exc, pika_workflow.AMQPConnectorException) or _find(
        exc, pika_workflow.AMQPConnectorStackTimeout
    ):
        return BrokerUnreachableError(
            f"RabbitMQ at {where} did not complete the connection in time ({_describe(exc)}): "
            "something accepts TCP there but does not speak AMQP, or the network stalls.",
            url=where,
        )
    if isinstance(exc, pika.exceptions.AMQPConnectionError | OSError | socket.gaierror):
        detail = _describe(exc)
        return BrokerUnreachableError(
            f"Cannot connect to RabbitMQ at {where}: {detail}. Is the broker running "
            "(systemctl start rabbitmq-server, or rabbitmq-server -detached) and is the URL "
            "right?",
            url=where,
        )
    return BrokerError(f"RabbitMQ at {where} failed: {_describe(exc)}", url=where)


_E = TypeVar("_E", bound=BaseException)


@contextlib.contextmanager
def translating(url: str) -> Iterator[None]:
    """The one seam where pika's exceptions become fibrpc's: any exception (but a fibrpc
    error) raised in the block leaves it as ``translate`` makes it, the original kept as
    ``__cause__``."""
    try:
        yield
    except FibrpcError:
        raise
    except Exception as exc:
        raise translate(exc, url) from exc


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """The ``kind`` error behind ``exc``: pika nests the real cause in args and chains."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, kind):
            return item
        stack.extend([*item.args, item.__cause__, item.__context__])
        stack.extend(getattr(item, "exceptions", ()))
        stack.append(getattr(item, "exception", None))  # pika's connector errors
    return None


def _tls_alert(exc: BaseException) -> str | None:
    """A TLS alert that pika reports only as text (with TLS 1.3 the broker may refuse a
    client certificate after the handshake, as an alert on the stream)."""
    text = f"{exc!r} {exc.args!r}"
    for marker in ("TLSV1_ALERT", "TLSV13_ALERT", "SSLEOFError", "SSLError"):
        at = text.find(marker)
        if at >= 0:
            alert = text[at : at + 80].split("'", maxsplit=1)[0]
            return alert.split('"', maxsplit=1)[0].rstrip("),")
    return None


def _reply_code(exc: BaseException) -> int | None:
    """The AMQP reply code carried by ``exc`` or by the error it wraps, if any."""
    for candidate in (exc, *getattr(exc, "args", ())):
        code = getattr(candidate, "reply_code", None)
        if isinstance(code, int):
            return code
    return None


def _reply_text(exc: BaseException) -> str:
    for candidate in (exc, *getattr(exc, "args", ())):
        text = getattr(candidate, "reply_text", None)
        if isinstance(text, str):
            return text
    return _describe(exc)


def _describe(exc: BaseException) -> str:
    """A short, password-free description of a pika error (pika's own texts hold none):
    the system's reason where there is one (``ConnectionRefusedError: Connection
    refused``), not the name of pika's wrapper."""
    os_error = _find(exc, OSError)
    if os_error is not None and os_error is not exc and os_error.strerror:
        return f"{type(os_error).__name__}: {os_error.strerror}"
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
    text = str(inner or exc) or type(exc).__name__
    return f"{type(inner or exc).__name__}: {text}" if text != type(exc).__name__ else text


def declare_request_queue(channel: Any, queue: str, *, queue_type: str = "classic") -> None:
    """Declare the request queue: a durable classic queue, or a quorum queue.

    Not the tutorial's ``queue_declare(queue='rpc_queue')``: a transient queue that is
    not exclusive is deprecated in RabbitMQ 4 (refused where that deprecated feature is
    denied; 4.3.6 still permits it by default). Durable (the
    queue, not its messages: requests stay transient) works on every RabbitMQ from 3.8
    on. ``quorum`` is the replicated queue of a RabbitMQ cluster.

    Raises ``BrokerRefusedError`` naming the queue, what differs and the fix when the
    queue exists in another form (RabbitMQ's 406 PRECONDITION_FAILED) or the broker
    refuses the declaration otherwise; the channel (or, for a deprecated feature, the
    connection) is closed by then.
    """
    arguments = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    try:
        channel.queue_declare(queue=queue, durable=True, arguments=arguments)
    except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as exc:
        if not refusals.is_refusal(exc.reply_code, exc.reply_text):
            raise
        message = refusals.explain_queue_refusal(queue, queue_type, exc.reply_code, exc.reply_text)
        raise BrokerRefusedError(
            message, reply_code=exc.reply_code, reply_text=exc.reply_text
        ) from exc


def queue_counts(connection: Any, queue: str) -> tuple[int, int] | None:
    """The messages ready in ``queue`` and its consumers (a passive declare on a channel
    of its own), or None if it does not exist. Raises what pika raises otherwise (for
    ``translating``)."""
    try:
        frame = connection.channel().queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    return int(frame.method.message_count), int(frame.method.consumer_count)


#: What RabbitMQ names the queues it names (``queue.declare`` with an empty name): a
#: client's user needs configure and read permissions matching it for an exclusive
#: reply queue (docs/security.md).
SERVER_NAMED_PREFIX: Final = "amq.gen-"


def declare_reply_queue(channel: Any, url: str) -> str:
    """Declare a client's reply queue on ``channel`` and return the name RabbitMQ gave
    it (``amq.gen-...``): exclusive (only this connection may consume it, and RabbitMQ
    deletes it when the connection closes), not durable, not auto-delete (a channel
    closed by a refusal must not take the queue, and the replies in it, along).

    An exclusive transient queue is allowed by every RabbitMQ from 3.8 on, 4.3's
    defaults included (those refuse only transient queues that are *not* exclusive).
    Raises ``AccessRefusedError`` naming the permissions to grant when the user may not
    declare or read it, and what ``translate`` makes of any other refusal.
    """
    try:
        frame = channel.queue_declare("", exclusive=True)
    except (pika.exceptions.ChannelClosedByBroker, pika.exceptions.ConnectionClosedByBroker) as exc:
        if exc.reply_code in refusals.ACCESS_REFUSED_CODES:
            where = redact(url)
            raise AccessRefusedError(
                f"RabbitMQ at {where} refused the client's reply queue ({exc.reply_code}: "
                f"{exc.reply_text}). A client with reply_queue='exclusive' needs the "
                f"configure and read permissions on '^amq\\.gen-.*' (docs/security.md), "
                "or reply_queue='direct'.",
                url=where,
            ) from exc
        raise
    name: str = frame.method.queue
    return name


def publish_soon(
    channel: Any,
    routing_key: str,
    body: bytes,
    *,
    mandatory: bool = False,
    content_type: str | None = None,
    headers: dict[str, int | str] | None = None,
    correlation_id: str | bytes | None = None,
    reply_to: str | None = None,
    expiration: str | None = None,
    message_type: str | None = None,
) -> None:
    """Publish through the default exchange of ``channel`` (a ``BlockingChannel``).

    With the fast path, the frames are queued on the connection, and its next turn
    (``run_io``, ``process_data_events``) writes them all at once, in the order they were
    queued, so "reply, then ack" still holds on the wire: pika's ``BlockingChannel``
    writes to the socket on every call, and two system calls per request (reply, then ack)
    were half of a worker's time. On pika's stock paths it is ``basic_publish``. Either
    way, a channel the broker closes meanwhile is reported by the channel
    (``closing_reason``), not here; raises ``ChannelWrongStateError`` on a channel already
    closed and what pika raises when the connection is lost (``ConnectionLost``).
    """
    fields: dict[str, Any] = {  # listed once for both paths
        "content_type": content_type,
        "headers": headers,
        "correlation_id": correlation_id,
        "reply_to": reply_to,
        "expiration": expiration,
    }
    if fastpath.enabled():
        fastpath.publish(
            channel, routing_key, body, fields, message_type=message_type, mandatory=mandatory
        )
        return
    properties = pika.BasicProperties(type=message_type, **fields)
    with _channel_closing_reported():
        channel.basic_publish("", routing_key, body, properties, mandatory)


def publish_properties_soon(channel: Any, routing_key: str, body: bytes, properties: Any) -> None:
    """``publish_soon`` with any pika ``BasicProperties`` (encoded by pika)."""
    if fastpath.enabled():
        fastpath.publish_properties(channel, routing_key, body, properties)
        return
    with _channel_closing_reported():
        channel.basic_publish("", routing_key, body, properties)


def ack_soon(channel: Any, delivery_tag: int) -> None:
    """Ack ``delivery_tag`` on ``channel`` (queued, with the fast path: see
    ``publish_soon``); raises ``ChannelWrongStateError`` on a closed channel."""
    if fastpath.enabled():
        fastpath.ack(channel, delivery_tag)
        return
    with _channel_closing_reported():
        channel.basic_ack(delivery_tag)


@contextlib.contextmanager
def _channel_closing_reported() -> Iterator[None]:
    """On pika's stock paths, a ``BlockingChannel`` call that writes waits for the write
    and raises the broker's close of the channel if it comes meanwhile: leave it to the
    channel (``closing_reason``), as the fast path does, which only queues the frames."""
    try:
        yield
    except pika.exceptions.ChannelClosedByBroker:
        log.debug("the broker closed the channel during a write", exc_info=True)


def on_return(channel: Any, callback: Any) -> None:
    """Hear of messages the broker returns (``mandatory``), as a ``consume_direct``
    consumer hears of deliveries: ``callback(channel, method, properties, body)``."""
    if fastpath.enabled():
        fastpath.on_return(channel, callback)
    else:
        channel.add_on_return_callback(callback)


def closing_reason(channel: Any) -> object:
    """Why a ``BlockingChannel`` closed (the broker's ``ChannelClosedByBroker``, say), or
    None: pika has no public API for it (``fibrpc.fastpath.closing_reason``)."""
    return fastpath.closing_reason(channel)


def consume_direct(
    connection: Any,
    channel: Any,
    queue: str,
    on_message: Any,
    *,
    auto_ack: bool,
    on_cancel: Any = None,
) -> str:
    """Start a consumer of ``queue`` on ``channel`` (a ``BlockingChannel`` of
    ``connection``) whose messages reach ``on_message(channel, method, properties,
    body)`` during ``run_io``; return its tag. ``on_cancel(frame)`` hears of RabbitMQ
    cancelling the consumer (its queue was deleted, say). Waits for the broker's
    consume-ok.

    With the fast path the messages come straight from pika's frame handling
    (``fibrpc.fastpath.consume``): ``BlockingChannel.basic_consume`` queues every delivery
    as an event and hands it over only at the end of ``process_data_events``, a round of
    bookkeeping per message. On pika's stock paths it is ``basic_consume`` and
    ``add_on_cancel_callback``.
    """
    if fastpath.enabled():
        return fastpath.consume(
            connection, channel, queue, on_message, auto_ack=auto_ack, on_cancel=on_cancel
        )
    tag: str = channel.basic_consume(queue, on_message, auto_ack=auto_ack)
    if on_cancel is not None:
        channel.add_on_cancel_callback(on_cancel)
    return tag


def ask_within(
    connection: Any, channel: Any, method: str, timeout: float, **arguments: Any
) -> bool:
    """Send the synchronous method ``method`` of a ``BlockingChannel`` (``queue_declare``,
    ``queue_bind``, ``exchange_declare``) with ``arguments`` on ``channel`` and wait for
    the broker's answer: True, or False when none came within ``timeout`` seconds (the
    channel is then left waiting; do not use it again). A queue's declare can go
    unanswered: RabbitMQ 4.0 does not answer one for a durable classic queue whose node
    is down. With the fast path only: pika's stock paths wait as long as the broker
    does. Raises what the ``BlockingChannel`` method raises."""
    if fastpath.enabled():
        return fastpath.ask(connection, channel, method, timeout, **arguments)
    getattr(channel, method)(**arguments)
    return True


def cancel_direct(connection: Any, channel: Any, tag: str, timeout: float) -> None:
    """Cancel a ``consume_direct`` consumer and wait for the broker's cancel-ok: up to
    ``timeout`` seconds with the fast path; on pika's stock paths ``basic_cancel``, which
    waits until the connection's heartbeat or blocked-connection timeout gives up. What
    still arrives for it meanwhile is rejected, to be requeued (with the fast path) or
    dropped unacked, to be requeued at the close (stock)."""
    if fastpath.enabled():
        fastpath.cancel(connection, channel, tag, timeout)
    else:
        channel.basic_cancel(tag)


def run_io(connection: Any) -> None:
    """One turn of ``connection``'s I/O loop: write what is queued, wait until something
    arrives or the next timer falls due, and run what arrived (consumers started with
    ``consume_direct``, pika's heartbeats, ``call_threadsafe`` callbacks, ``keep_ticking``'s
    timer).

    On pika's stock paths it is ``process_data_events``, which returns when an event is
    ready (a delivery, a timer, a callback) or after ``_STOCK_TURN`` seconds. With the fast
    path (``fibrpc.fastpath.run_io``) it skips that method's timer per call and event
    queue per delivery: with it and the other shortcuts, a sequential round trip went from
    1.55 to under 1.1 times the tutorial's (bench/README.md). The caller keeps a timer due
    every so often (``keep_ticking``) so that a turn never waits long. Raises what pika
    raises when the connection is lost (every one in ``ConnectionLost``).
    """
    if fastpath.enabled():
        fastpath.run_io(connection)
    else:
        connection.process_data_events(time_limit=_STOCK_TURN)


#: Seconds a turn of pika's stock I/O loop waits at most with no event.
_STOCK_TURN: Final = 1.0


def keep_ticking(connection: Any, interval: float) -> None:
    """Keep a timer due every ``interval`` seconds on ``connection``'s I/O loop, so that
    ``run_io`` returns at least that often (to expire calls past their deadline)."""
    if fastpath.enabled():
        fastpath.keep_ticking(connection, interval)
        return

    def tick() -> None:
        connection.call_later(interval, tick)

    connection.call_later(interval, tick)


def call_threadsafe(connection: Any, callback: Any) -> None:
    """Run ``callback`` on the thread that turns ``connection``'s I/O loop, during its
    next ``run_io`` (safe from any thread): ``add_callback_threadsafe``, on the I/O loop
    itself with the fast path (no ``process_data_events`` needed to dispatch it)."""
    if fastpath.enabled():
        fastpath.call_threadsafe(connection, callback)
    else:
        connection.add_callback_threadsafe(callback)


def wake(connection: Any) -> None:
    """Make a ``run_io`` waiting in another thread return (thread-safe)."""
    call_threadsafe(connection, _nothing)


def _nothing() -> None:
    """A callback that only wakes the I/O loop."""


def close_within(connection: Any, seconds: float = 1.0) -> None:
    """Close ``connection`` politely (Connection.Close, then its close-ok). With the fast
    path the broker gets at most ``seconds`` (a blocked broker reads nothing, and a
    stalled or half-open network answers nothing), then the socket is dropped; on pika's
    stock paths it is ``close``, which waits until the heartbeat or the 60-second
    blocked-connection timeout gives up. Never raises; the connection is closed when it
    returns."""
    try:
        if fastpath.enabled():
            fastpath.close_within(connection, seconds)
        elif connection.is_open:
            connection.close()
    except Exception as exc:  # closing must not fail: there is nothing left to do
        log.debug("closing the connection: %r", exc)
    finally:
        if fastpath.enabled():
            with contextlib.suppress(Exception):
                fastpath.cleanup(connection)


def on_blocked(connection: Any, callback: Any) -> None:
    """``callback(reason)`` when RabbitMQ blocks the connection's publishing (a memory or
    disk alarm: ``connection.blocked``), ``callback(None)`` when it unblocks it."""
    if fastpath.enabled():
        fastpath.on_blocked(connection, callback)
        return
    connection.add_on_connection_blocked_callback(
        lambda _conn, frame: callback(str(getattr(frame.method, "reason", "") or "an alarm"))
    )
    connection.add_on_connection_unblocked_callback(lambda _conn, _frame: callback(None))


class QueueProbe:
    """Counts a queue's consumers, answered on the connection's next turns by
    ``on_answer(consumers)``, with None when the queue does not exist.

    With the fast path (``fibrpc.fastpath.QueueProbe``) the question never waits for its
    answer: a synchronous round trip would stall the thread that drives the connection
    for as long as the broker does not answer (blocked, a half-open network), every
    call's deadline with it. On pika's stock paths it is a passive ``queue_declare`` on a
    ``BlockingChannel`` of the probe's own (a 404 closes it), a round trip on the
    driving thread, its answer handed over through ``add_callback_threadsafe``.

    A refused declare (403: RabbitMQ 4.2.6 and later want a permission on the queue) is
    answered once, by ``on_refused(reply_code, reply_text)``, and the probe asks no more:
    a refusal would close a channel on every question."""

    def __init__(self, connection: Any, queue: str, on_answer: Any, on_refused: Any) -> None:
        fast = fastpath.enabled()
        self._fast = fastpath.QueueProbe(connection, queue, on_answer, on_refused) if fast else None
        self._connection = connection
        self._queue = queue
        self._on_answer = on_answer
        self._on_refused = on_refused
        self._channel: Any = None
        self._refused = False

    @property
    def refused(self) -> bool:
        """Whether the broker refused the question (then it is not asked again)."""
        return self._fast.refused if self._fast is not None else self._refused

    def ask(self) -> None:
        """Send the question (the thread that drives the connection); a connection lost
        meanwhile is left for the next turn to report."""
        if self._fast is not None:
            self._fast.ask()
            return
        connection = self._connection
        if self._refused or not connection.is_open:
            return
        try:
            if self._channel is None or not self._channel.is_open:
                self._channel = connection.channel()
            frame = self._channel.queue_declare(self._queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code == 404:
                connection.add_callback_threadsafe(lambda: self._on_answer(None))
            elif exc.reply_code in refusals.ACCESS_REFUSED_CODES:
                self._refused = True
                code, text = exc.reply_code, str(exc.reply_text)
                connection.add_callback_threadsafe(lambda: self._on_refused(code, text))
            return
        except (pika.exceptions.AMQPError, *ConnectionLost) as exc:
            log.debug("asking for the consumers of %r: %r", self._queue, exc)
            return
        consumers = int(frame.method.consumer_count)
        connection.add_callback_threadsafe(lambda: self._on_answer(consumers))
