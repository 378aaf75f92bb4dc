"""The only pika boundary: parsing URLs, connecting, declaring, translating pika's errors.

Every other module that talks to RabbitMQ gets its connection from ``connect`` and lets
``translate`` turn pika's exceptions into fibrpc's own (``fibrpc.errors``), so callers
catch one tree and no message ever carries a password.

The hot path goes through here too: frames queued and written together at the end of a
turn (``publish_soon``, ``ack_soon``, encoded by ``fibrpc.frames``), pika's I/O loop
turned directly with deliveries handed straight to the consumer (``run_io``,
``consume_direct``). With ``fibrpc.fastpath`` (installed on fibrpc's own connections
only, never on pika's classes) the frames are encoded and written by fibrpc and
deliveries taken in whole; without it, pika encodes, writes and reads as it always does.
Only this module and ``fibrpc.fastpath`` reach into pika's internals (tests/test_amqp.py
and tests/test_frames.py check them against pika itself).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any, Final, TypeVar

import pika
import pika.adapters.blocking_connection
import pika.adapters.utils.connection_workflow as pika_workflow
import pika.connection
import pika.data
import pika.exceptions
import pika.spec

from fibrpc import fastpath, frames, refusals
from fibrpc.errors import (
    AccessRefusedError,
    BrokerError,
    BrokerRefusedError,
    BrokerUnreachableError,
    ConfigError,
    FibrpcError,
)

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


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``, safe for logs and messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}"
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def split_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The broker URLs in ``value``: one URL, several separated by commas (a comma in a
    password is written ``%2C``), or a sequence of either. Each must be an ``amqp://`` or
    ``amqps://`` URL with a host; raises ``ConfigError`` naming the first that is not
    (its password hidden)."""
    items = [value] if isinstance(value, str) else list(value)
    urls: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"A broker URL is a string; got {type(item).__name__}.")
        urls += [part.strip() for part in item.split(",") if part.strip()]
    if not urls:
        raise ConfigError("No broker URL given (amqp://USER:PASSWORD@HOST:5672/VHOST).")
    for url in urls:
        check_url(url)
    return tuple(urls)


def check_url(url: str) -> str:
    """``url`` if it is an AMQP URL fibrpc can use; else ``ConfigError`` naming it (its
    password hidden) and the form it should have."""
    where = redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        raise ConfigError(f"The broker URL {where} cannot be read: {exc}.", url=where) from exc
    if parts.scheme not in ("amqp", "amqps") or not host:
        raise ConfigError(
            f"The broker URL {where} is not an AMQP URL: it must read "
            "amqp://USER:PASSWORD@HOST:5672/VHOST (or amqps:// for TLS).",
            url=where,
        )
    return url


@dataclasses.dataclass(frozen=True, slots=True)
class TLSOptions:
    """TLS settings for an ``amqps://`` URL. Certificates are checked unless ``verify``
    is turned off: against ``ca_file`` if given, else the system's trusted CAs, and the
    certificate must name the URL's host. ``cert_file`` and ``key_file`` present a client
    certificate (for brokers that require one)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for these options; ``ConfigError`` if a file is bad."""
        if self.key_file and not self.cert_file:
            raise ConfigError("A TLS key file needs its certificate: give --tls-cert-file too.")
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        try:
            if self.ca_file:
                context.load_verify_locations(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"Cannot load the CA file {self.ca_file!r}: {exc}.") from exc
        try:
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"Cannot load the client certificate {self.cert_file!r} with key "
                f"{self.key_file!r}: {exc}."
            ) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


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
    """Publish through the default exchange without flushing the socket now.

    pika's ``BlockingChannel`` writes to the socket on every call: two system calls per
    request (reply, then ack) were half of a worker's time. This queues the frames on
    the connection instead, and its next turn (``run_io``, ``process_data_events``)
    writes them all at once, in the order they were queued, so "reply, then ack" still
    holds on the wire. The frames are built by ``fibrpc.frames``; what that does not
    cover (a body longer than one frame, a string too long, a closed channel) goes
    through pika, which raises what pika raises.
    """
    impl = channel._impl
    connection = impl.connection
    fields: dict[str, Any] = {  # listed once for both encoders
        "content_type": content_type,
        "headers": headers,
        "correlation_id": correlation_id,
        "reply_to": reply_to,
        "expiration": expiration,
    }
    if impl.is_open and 0 < len(body) <= connection._body_max_length and fastpath.enabled():
        try:
            props = frames.properties(message_type=message_type, **fields)
        except (ValueError, TypeError):
            pass
        else:
            data = frames.publish(
                impl.channel_number, routing_key, body, props, mandatory=mandatory
            )
            _emit(connection, data, 3)
            return
    properties = pika.BasicProperties(type=message_type, **fields)
    impl.basic_publish("", routing_key, body, properties, mandatory)


def publish_properties_soon(channel: Any, routing_key: str, body: bytes, properties: Any) -> None:
    """``publish_soon`` with any pika ``BasicProperties`` (encoded by pika)."""
    channel._impl.basic_publish("", routing_key, body, properties)


def on_return(channel: Any, callback: Any) -> None:
    """Hear of messages the broker returns (``mandatory``), straight from pika's frame
    handling like a ``consume_direct`` consumer: ``callback(channel, method, properties,
    body)``."""
    channel._impl.add_on_return_callback(callback)


def closing_reason(channel: Any) -> object:
    """Why a ``BlockingChannel`` closed (the broker's ``ChannelClosedByBroker``, say), or
    None. pika keeps it only in a private attribute."""
    return getattr(channel, "_closing_reason", None)


def ack_soon(channel: Any, delivery_tag: int) -> None:
    """Ack without flushing the socket now (see ``publish_soon``)."""
    impl = channel._impl
    if impl.is_open and fastpath.enabled():
        _emit(impl.connection, frames.ack(impl.channel_number, delivery_tag), 1)
    else:
        impl.basic_ack(delivery_tag)  # pika's way; raises ChannelWrongStateError if closed


def _emit(connection: Any, data: bytes, count: int) -> None:
    """Queue ``count`` encoded frames on pika's connection, keeping its counters."""
    connection.bytes_sent += len(data)
    connection.frames_sent += count
    connection._adapter_emit_data(data)


def consume_direct(
    connection: Any,
    channel: Any,
    queue: str,
    on_message: Any,
    *,
    auto_ack: bool,
    on_cancel: Any = None,
) -> str:
    """Start a consumer whose messages reach ``on_message`` straight from pika's frame
    handling (``on_message(channel, method, properties, body)``); return its tag.

    ``BlockingChannel.basic_consume`` queues every delivery as an event and hands it
    over only at the end of ``process_data_events``: a round of bookkeeping per message
    that ``run_io`` skips. ``on_cancel(frame)`` hears of RabbitMQ cancelling the
    consumer (its queue was deleted, say); the ``BlockingChannel``'s own handler is
    taken off, since it looks for the consumer among its own and, not finding it, its
    ``KeyError`` would drop the connection. Waits for the broker's consume-ok (or the
    channel's close).
    """
    impl = channel._impl
    impl.callbacks.remove(
        impl.channel_number, pika.spec.Basic.Cancel, channel._on_consumer_cancelled_by_broker
    )
    if on_cancel is not None:
        impl.add_on_cancel_callback(on_cancel)
    confirmed: list[object] = []
    # The BlockingChannel signals every consume-ok to a result of its own, which only its
    # own basic_consume clears: a second consume (after a cancel) would find it set.
    channel._basic_consume_ok_result.reset()
    tag: str = impl.basic_consume(queue, on_message, auto_ack=auto_ack, callback=confirmed.append)
    _turn_until(connection, lambda: bool(confirmed) or channel.is_closed, _ROUND_TRIP)
    if not confirmed:
        raise pika.exceptions.ChannelWrongStateError(
            f"The channel closed (or did not answer) while subscribing to {queue!r}."
        )
    return tag


def cancel_direct(connection: Any, channel: Any, tag: str, timeout: float) -> None:
    """Cancel a ``consume_direct`` consumer and wait (up to ``timeout``) for the broker's
    cancel-ok. pika rejects, to be requeued, what still arrives for it meanwhile."""
    confirmed: list[object] = []
    channel._impl.basic_cancel(tag, callback=confirmed.append)
    _turn_until(connection, lambda: bool(confirmed) or channel.is_closed, timeout)


#: Seconds a synchronous exchange with the broker (a consume's consume-ok) may take.
_ROUND_TRIP: Final = 30.0


def _turn_until(connection: Any, done: Any, timeout: float) -> None:
    """Turn ``connection``'s I/O loop until ``done()`` or ``timeout`` seconds pass.

    ``BlockingConnection.process_data_events(time_limit)`` returns early only for its
    own channels' events, never for a callback such as a consume-ok: it waited out its
    whole limit (100 ms of every ``fibrpc call``'s start). Raises pika's error if the
    connection closes meanwhile."""
    impl = connection._impl
    ioloop = impl.ioloop
    deadline = time.monotonic() + timeout
    while not done() and (left := deadline - time.monotonic()) > 0:
        timer = ioloop.call_later(min(0.05, left), _nothing)
        ioloop.poll()
        ioloop.process_timeouts()
        ioloop.remove_timeout(timer)
        if impl.is_closed:
            connection.process_data_events(time_limit=0)  # raises why it closed


def run_io(connection: Any) -> None:
    """One turn of ``connection``'s I/O loop: write what is queued, wait until something
    arrives or the next timer falls due, and run what arrived (consumers started with
    ``consume_direct``, pika's heartbeats, ``wake`` callbacks).

    ``BlockingConnection.process_data_events(time_limit)`` does the same, plus setting
    and cancelling a timer on every call and routing each delivery through an event
    queue; with ``run_io`` and the other shortcuts here, a sequential round trip went from
    1.55 to under 1.1 times the tutorial's (bench/README.md). The caller keeps a timer
    due every so often (``keep_ticking``) so that a turn never waits long. Raises what
    pika raises when the connection is lost (every one in ``ConnectionLost``).
    """
    impl = connection._impl
    fastpath.flush(impl)
    impl.ioloop.poll()
    impl.ioloop.process_timeouts()
    fastpath.flush(impl)
    closed = connection._closed_result
    if closed.ready:
        error = closed.value.error
        connection._cleanup()  # as pika does: closes the loop's wake-up socket pair
        if isinstance(error, BaseException):
            raise error
        raise pika.exceptions.StreamLostError(f"The connection closed: {error!r}")


def keep_ticking(connection: Any, interval: float) -> None:
    """Keep a timer due every ``interval`` seconds on ``connection``'s I/O loop, so that
    ``run_io`` returns at least that often (to expire calls past their deadline)."""
    ioloop = connection._impl.ioloop

    def tick() -> None:
        ioloop.call_later(interval, tick)

    ioloop.call_later(interval, tick)


def call_threadsafe(connection: Any, callback: Any) -> None:
    """Run ``callback`` on the thread that turns ``connection``'s I/O loop, during its
    next ``run_io`` (safe from any thread). Unlike ``BlockingConnection.add_callback_
    threadsafe`` it needs no ``process_data_events`` to be dispatched."""
    connection._impl.ioloop.add_callback_threadsafe(callback)


def wake(connection: Any) -> None:
    """Make a ``run_io`` waiting in another thread return (thread-safe)."""
    call_threadsafe(connection, _nothing)


def _nothing() -> None:
    """A callback that only wakes the I/O loop."""


def close_within(connection: Any, seconds: float = 1.0) -> None:
    """Close ``connection`` politely (Connection.Close, then its close-ok), but give the
    broker at most ``seconds``: a blocked broker reads nothing, and a stalled or
    half-open network answers nothing, so after that the socket is dropped. Never
    raises; the connection is closed when it returns."""
    impl = connection._impl
    try:
        if impl.is_open:
            impl.close(200, "Normal shutdown")
        deadline = time.monotonic() + seconds
        ioloop = impl.ioloop
        while not impl.is_closed and (left := deadline - time.monotonic()) > 0:
            timer = ioloop.call_later(min(0.05, left), _nothing)  # bound the wait
            ioloop.poll()
            ioloop.process_timeouts()
            ioloop.remove_timeout(timer)
        if not impl.is_closed:
            impl._terminate_stream(
                pika.exceptions.ConnectionClosedByClient(200, "the broker did not answer")
            )
            for _ in range(3):  # the transport's abort completes on the loop
                if impl.is_closed:
                    break
                ioloop.call_later(0.01, _nothing)
                ioloop.poll()
                ioloop.process_timeouts()
    except Exception as exc:  # closing must not fail: there is nothing left to do
        log.debug("closing the connection: %r", exc)
    finally:
        with contextlib.suppress(Exception):
            connection._cleanup()


def on_blocked(connection: Any, callback: Any) -> None:
    """``callback(reason)`` when RabbitMQ blocks the connection's publishing (a memory or
    disk alarm: ``connection.blocked``), ``callback(None)`` when it unblocks it."""
    impl = connection._impl
    impl.add_on_connection_blocked_callback(
        lambda _conn, frame: callback(str(getattr(frame.method, "reason", "") or "an alarm"))
    )
    impl.add_on_connection_unblocked_callback(lambda _conn, _frame: callback(None))


class QueueProbe:
    """Counts a queue's consumers without waiting for the answer: a passive declare on a
    channel of the probe's own (a 404 closes the channel it happens on), answered on the
    connection's next turns by ``on_answer(consumers)``, with None when the queue does
    not exist. A synchronous round trip would stall the thread that drives the
    connection for as long as the broker does not answer (blocked, a half-open network):
    every call's deadline with it.

    A refused declare (403: RabbitMQ 4.2.6 and later want a permission on the queue) is
    answered once, by ``on_refused(reply_code, reply_text)``, and the probe asks no more:
    a refusal would close a channel on every question."""

    def __init__(self, connection: Any, queue: str, on_answer: Any, on_refused: Any) -> None:
        self._impl = connection._impl
        self._queue = queue
        self._on_answer = on_answer
        self._on_refused = on_refused
        self._channel: Any = None
        self._asking = False
        self.refused = False

    def ask(self) -> None:
        """Send the question unless one is on its way already, or the broker refused it
        (any thread that drives the connection)."""
        if self._asking or self.refused or not self._impl.is_open:
            return
        self._asking = True
        channel = self._channel
        if channel is not None and channel.is_open:
            self._declare(channel)
        elif channel is None or channel.is_closed:
            self._channel = self._impl.channel(on_open_callback=self._declare)
            self._channel.add_on_close_callback(self._on_close)

    def _declare(self, channel: Any) -> None:
        channel.queue_declare(self._queue, passive=True, callback=self._on_declared)

    def _on_declared(self, frame: Any) -> None:
        self._asking = False
        self._on_answer(int(frame.method.consumer_count))

    def _on_close(self, channel: Any, reason: Any) -> None:
        asking, self._asking = self._asking, False
        self._channel = None
        if not asking:
            return
        code = getattr(reason, "reply_code", None)
        if code == 404:
            self._on_answer(None)
        elif code in refusals.ACCESS_REFUSED_CODES:
            self.refused = True
            self._on_refused(code, str(getattr(reason, "reply_text", reason)))


def quiet_pika() -> None:
    """Turn pika's own loggers down: they log every reconnect and close at ERROR."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)
