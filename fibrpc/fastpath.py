"""fibrpc's shortcuts through pika: the one module that touches pika's private names.

pika's general machinery cost a measurable share of a round trip (bench/README.md says
what each part still buys). ``fibrpc.amqp`` calls the functions here only while
``enabled()``; otherwise it uses pika's public API alone. On each connection
``fibrpc.amqp.connect`` opens, ``install`` puts in place:

* **one ``sendmsg`` per turn** (``_produce_gathered``): pika sent each frame with a
  ``send`` of its own, three per request and four per reply and ack;
* **reads that stop at a short read** (``_consume_until_short``), into a buffer of the
  connection's own, so a large message comes in large reads;
* **deliveries taken in whole** (``_take_in``): a delivery whose frames have all arrived
  goes straight to its consumer, decoded by pika's own decoders, instead of through
  pika's frame objects and content assembler; one still arriving waits in a buffer of its
  own, untouched until enough bytes are there (so taking in a message is linear in its
  size); a header table pika cannot decode (a timestamp past the year 9999) is dropped
  rather than the connection.

and ``fibrpc.amqp`` routes through here: frames encoded by ``fibrpc.frames`` and queued
on the connection without a write per call (``publish``, ``ack``), pika's I/O loop turned
directly with consumers called straight from the frame handling (``run_io``,
``consume``, ``cancel``), a close bounded in time (``close_within``), a queue probe that
never waits for its answer (``QueueProbe``).

Two things fibrpc needs of pika have no public API, and are used from here on pika's stock
paths too whenever this pika has what they use (``usable()``): the tolerant reading of
header tables (``_tolerant_take_in``: without it, one message with a header pika cannot
decode drops the connection every time it is delivered, and wedges the queue) and why a
channel closed (``closing_reason``: the broker's reply code, which a ``BlockingChannel``
keeps only in a private attribute). Everything else on the stock paths is pika's public
API.

Nothing of pika's modules or classes is replaced: the methods are set on the connection's
own objects. ``enabled()`` is False, and fibrpc runs on pika's stock paths, when
``FIBRPC_FAST_PATH`` is ``0`` (``false``, ``no``, ``off``) or when this pika lacks one of
the internals named in ``INTERNALS`` (every private name used here: checked once, at the
first connection) or is not the release line this is tested against (one warning). The
transport shortcuts are for plaintext only: TLS must retry a blocked write with the same
buffer, and a TLS socket may hold decrypted bytes that no poll reports.
"""

from __future__ import annotations

import collections
import functools
import importlib
import inspect
import itertools
import logging
import os
import re
import sys
import time
import types
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import pika
import pika.adapters.blocking_connection
import pika.adapters.select_connection
import pika.adapters.utils.io_services_utils as pika_io
import pika.channel
import pika.connection
import pika.exceptions
import pika.spec

from fibrpc import frames
from fibrpc.frames import (
    BASIC_DELIVER,
    BODY_SIZE,
    CONTENT_ENCODING_FLAG,
    CONTENT_TYPE_FLAG,
    FRAME_BODY,
    FRAME_END,
    FRAME_END_CHAR,
    FRAME_HEAD,
    FRAME_HEAD_SIZE,
    FRAME_HEADER,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    HEADER_BODY_SIZE_AT,
    HEADER_FIXED,
    HEADERS_FLAG,
    METHOD_ID_SIZE,
    PROPERTY_FLAGS,
    TABLE_LENGTH,
)

log = logging.getLogger(__name__)

#: The environment variable that turns the fast path off.
ENV: Final = "FIBRPC_FAST_PATH"
_OFF: Final = frozenset({"0", "false", "no", "off"})
#: The pika release line these shortcuts are written and tested against.
TESTED_PIKA: Final = "1.4."

#: Every private name of pika used in this module, by where pika defines it: a module's
#: attribute, or a class's (a method, a class attribute, or an attribute pika's own code
#: of the class or its bases assigns to ``self``). ``missing_internals`` checks them all;
#: tests/test_boundary.py checks that this names every private name the module uses.
INTERNALS: Final[Mapping[str, tuple[str, ...]]] = {
    "pika.adapters.utils.io_services_utils": ("_AsyncPlaintextTransport",),
    "pika.adapters.utils.io_services_utils._AsyncPlaintextTransport": (
        "_produce",
        "_consume",
        "_on_socket_writable",
        "_tx_buffers",
        "_tx_buffered_byte_count",
        "_sock",
        "_state",
        "_STATE_ACTIVE",
        "_protocol",
    ),
    "pika.adapters.blocking_connection.BlockingConnection": ("_impl", "_closed_result", "_cleanup"),
    "pika.adapters.blocking_connection.BlockingChannel": (
        "_impl",
        "_basic_consume_ok_result",
        "_on_consumer_cancelled_by_broker",
        "_closing_reason",
    ),
    "pika.adapters.select_connection.SelectConnection": (
        "_transport",
        "_body_max_length",
        "_frame_buffer",
        "_channels",
        "_read_frame",
        "_trim_frame_buffer",
        "_process_frame",
        "_on_data_available",
        "_adapter_emit_data",
        "_terminate_stream",
    ),
    "pika.channel.Channel": ("_consumers", "_cancelled"),
}

#: Buffers handed to one ``sendmsg``: well under Linux's IOV_MAX (1024).
_GATHER: Final = 256
#: Bytes one read may take, and bytes one turn may read before the loop moves on.
_RECV_BYTES: Final = 1 << 18
_CONSUME_BYTES: Final = 1 << 22
#: Seconds a synchronous exchange with the broker (a consume's consume-ok) may take.
_ROUND_TRIP: Final = 30.0
#: Where a content header's property flags start, counted from its frame's start.
_FLAGS_AT: Final = FRAME_HEAD_SIZE + HEADER_FIXED
#: Where a content header's body size sits, counted from its frame's start.
_BODY_SIZE_AT: Final = FRAME_HEAD_SIZE + HEADER_BODY_SIZE_AT


@functools.cache
def usable() -> bool:
    """Whether this pika has every internal named in ``INTERNALS`` and is of the release
    line tested here (a warning, once, if not); decided once."""
    missing = missing_internals()
    if missing or not pika.__version__.startswith(TESTED_PIKA):
        log.warning(
            "fibrpc's fast path is written for pika %sx; with pika %s%s it uses pika's stock "
            "paths (slower)",
            TESTED_PIKA,
            pika.__version__,
            f" (it lacks {', '.join(missing)})" if missing else "",
        )
        return False
    return True


@functools.cache
def enabled() -> bool:
    """Whether the shortcuts are used (see the module docstring); decided once."""
    if os.environ.get(ENV, "1").strip().lower() in _OFF:
        log.info("%s is off: fibrpc uses pika's stock paths", ENV)
        return False
    return usable()


def missing_internals(internals: Mapping[str, tuple[str, ...]] = INTERNALS) -> list[str]:
    """The names of ``internals`` (``INTERNALS`` by default) that this pika lacks, each as
    ``owner.name``; an owner that cannot be found counts its names as missing."""
    missing = []
    for path, names in internals.items():
        owner = _resolve(path)
        missing += [f"{path}.{name}" for name in names if owner is None or not _has(owner, name)]
    return missing


def _resolve(path: str) -> Any:
    """The module or class at the dotted ``path``, or None."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            owner: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            owner = getattr(owner, name, None)
        return owner
    return None


def _has(owner: Any, name: str) -> bool:
    """Whether ``owner`` has ``name``, or (a class) pika's code of it or of one of its
    bases assigns ``self.<name>``: attributes made in ``__init__`` are on no class."""
    if hasattr(owner, name):
        return True
    if not isinstance(owner, type):
        return False
    assigned = re.compile(rf"\bself\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]")
    for klass in owner.__mro__:
        if not klass.__module__.startswith("pika"):
            continue
        if assigned.search(_module_source(klass.__module__)):
            return True
    return False


@functools.cache
def _module_source(module: str) -> str:
    """The source of pika's module ``module`` ("" if unreadable). The whole module, not
    the class: ``inspect.getsource`` of a class parses its module, and that was most of
    a client's start-up (0.3 s of ``fibrpc call``'s 0.5 s)."""
    try:
        return inspect.getsource(sys.modules[module])
    except (KeyError, OSError, TypeError):
        return ""


def install(connection: Any) -> None:
    """Put the shortcuts on ``connection`` (a ``pika.BlockingConnection`` just opened),
    if ``enabled()``; otherwise, if ``usable()``, only the tolerant reading of header
    tables, which every fibrpc connection needs (``_tolerant_take_in``)."""
    if not enabled():
        if usable():
            impl = connection._impl
            impl._on_data_available = types.MethodType(_tolerant_take_in, impl)
        return
    impl = connection._impl
    impl._fibrpc_pending = None
    impl._fibrpc_need = 0
    impl._on_data_available = types.MethodType(_take_in, impl)
    transport = impl._transport
    if type(transport) is pika_io._AsyncPlaintextTransport:
        transport._fibrpc_rx = bytearray(_RECV_BYTES)
        transport._produce = types.MethodType(_produce_gathered, transport)
        transport._consume = types.MethodType(_consume_until_short, transport)


def closing_reason(channel: Any) -> object:
    """Why a ``BlockingChannel`` closed (the broker's ``ChannelClosedByBroker``, say), or
    None: pika keeps it only in a private attribute (None too if this pika has none)."""
    return getattr(channel, "_closing_reason", None) if usable() else None


# -- publishing and acking without a write per call ---------------------------------------


def publish(
    channel: Any,
    routing_key: str,
    body: bytes,
    fields: Mapping[str, Any],
    *,
    message_type: str | None,
    mandatory: bool,
) -> None:
    """Queue a message for the default exchange on ``channel`` (a ``BlockingChannel``):
    its frames built by ``fibrpc.frames`` and written on the connection's next turn; what
    that does not cover (a body longer than one frame, a string too long, a closed
    channel) goes through pika's own channel, which queues it the same way and raises
    what pika raises. ``fields`` are the ``BasicProperties`` but ``type``."""
    impl = channel._impl
    connection = impl.connection
    if impl.is_open and 0 < len(body) <= connection._body_max_length:
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


def publish_properties(channel: Any, routing_key: str, body: bytes, properties: Any) -> None:
    """``publish`` with any pika ``BasicProperties`` (encoded by pika)."""
    channel._impl.basic_publish("", routing_key, body, properties)


def ack(channel: Any, delivery_tag: int) -> None:
    """Queue an ack of ``delivery_tag`` (see ``publish``); pika's own channel raises
    ``ChannelWrongStateError`` if it is closed."""
    impl = channel._impl
    if impl.is_open:
        _emit(impl.connection, frames.ack(impl.channel_number, delivery_tag), 1)
    else:
        impl.basic_ack(delivery_tag)


def _emit(connection: Any, data: bytes, count: int) -> None:
    """Queue ``count`` encoded frames on pika's connection, keeping its counters."""
    connection.bytes_sent += len(data)
    connection.frames_sent += count
    connection._adapter_emit_data(data)


def on_return(channel: Any, callback: Callable[..., None]) -> None:
    """``callback(channel, method, properties, body)`` for each message the broker
    returns, straight from pika's frame handling (``run_io`` dispatches no
    ``BlockingChannel`` events)."""
    channel._impl.add_on_return_callback(callback)


# -- consuming, and turning the I/O loop -------------------------------------------------


def consume(
    connection: Any,
    channel: Any,
    queue: str,
    on_message: Callable[..., None],
    *,
    auto_ack: bool,
    on_cancel: Callable[[Any], None] | None,
) -> str:
    """Start a consumer whose messages reach ``on_message`` straight from pika's frame
    handling; return its tag (``fibrpc.amqp.consume_direct`` says the rest).

    The ``BlockingChannel``'s own cancel handler is taken off, since it looks for the
    consumer among its own and, not finding it, its ``KeyError`` would drop the
    connection. Waits for the broker's consume-ok (or the channel's close)."""
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


def ask(connection: Any, channel: Any, method: str, timeout: float, **arguments: Any) -> bool:
    """Send the synchronous AMQP method ``method`` (``queue_declare``, ``queue_bind``,
    ``exchange_declare``: the name of pika's ``Channel`` method) with ``arguments`` on
    ``channel`` and wait up to ``timeout`` seconds for its answer; True if it came.
    Raises the broker's close of the channel (``ChannelClosedByBroker``) and what pika
    raises when the connection is lost."""
    answered: list[object] = []
    getattr(channel._impl, method)(callback=answered.append, **arguments)
    _turn_until(connection, lambda: bool(answered) or channel.is_closed, timeout)
    reason = closing_reason(channel)
    if not answered and channel.is_closed and isinstance(reason, BaseException):
        raise reason
    return bool(answered)


def cancel(connection: Any, channel: Any, tag: str, timeout: float) -> None:
    """Cancel a ``consume`` consumer and wait (up to ``timeout`` seconds) for the
    broker's cancel-ok. pika rejects, to be requeued, what still arrives for it
    meanwhile."""
    confirmed: list[object] = []
    channel._impl.basic_cancel(tag, callback=confirmed.append)
    _turn_until(connection, lambda: bool(confirmed) or channel.is_closed, timeout)


def _turn_until(connection: Any, done: Callable[[], bool], timeout: float) -> None:
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
            _raise_closed(connection)


def _raise_closed(connection: Any) -> None:
    """Raise why ``connection`` closed, if it has (the broker's close, such as RabbitMQ
    4.3's 541 at a consume racing its quorum queue's deletion, or the stream's loss):
    pika's ``process_data_events`` would raise a bare ``ConnectionWrongStateError``."""
    closed = connection._closed_result
    if closed.ready:
        error = closed.value.error
        connection._cleanup()  # as pika does: closes the loop's wake-up socket pair
        if isinstance(error, BaseException):
            raise error
        raise pika.exceptions.StreamLostError(f"The connection closed: {error!r}")
    if connection._impl.is_closed:
        connection.process_data_events(time_limit=0)  # raises what pika knows of it


def run_io(connection: Any) -> None:
    """One turn of ``connection``'s I/O loop (``fibrpc.amqp.run_io`` says what for),
    without ``process_data_events``' timer per call and event queue per delivery. Raises
    what pika raises when the connection is lost."""
    impl = connection._impl
    _flush(impl)
    impl.ioloop.poll()
    impl.ioloop.process_timeouts()
    _flush(impl)
    _raise_closed(connection)


def _flush(impl: Any) -> None:
    """Write what is queued now, rather than on the I/O loop's next turn: a request goes
    out before the wait for its reply, a reply as soon as its callback has queued it. What
    the kernel does not take stays queued. Plaintext with the shortcuts only: pika's TLS
    transport decides for itself whether a write or a read comes next."""
    transport = impl._transport
    if (
        type(transport) is pika_io._AsyncPlaintextTransport
        and transport._tx_buffers
        and "_produce" in transport.__dict__
    ):
        transport._on_socket_writable()


def keep_ticking(connection: Any, interval: float) -> None:
    """A timer due every ``interval`` seconds on the I/O loop that ``run_io`` turns."""
    ioloop = connection._impl.ioloop

    def tick() -> None:
        ioloop.call_later(interval, tick)

    ioloop.call_later(interval, tick)


def call_threadsafe(connection: Any, callback: Callable[[], None]) -> None:
    """Run ``callback`` during the next ``run_io`` (safe from any thread)."""
    connection._impl.ioloop.add_callback_threadsafe(callback)


def _nothing() -> None:
    """A callback that only wakes the I/O loop."""


def close_within(connection: Any, seconds: float) -> None:
    """Close ``connection`` (Connection.Close, then its close-ok), giving the broker at
    most ``seconds`` before the socket is dropped. Raises what pika raises; the caller
    cleans up."""
    impl = connection._impl
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


def cleanup(connection: Any) -> None:
    """Release what a closed ``connection`` holds (the I/O loop's wake-up sockets), as
    pika's own ``close`` does."""
    connection._cleanup()


def on_blocked(connection: Any, callback: Callable[[str | None], None]) -> None:
    """``callback(reason)`` when RabbitMQ blocks the connection's publishing,
    ``callback(None)`` when it unblocks it: straight from pika's frame handling."""
    impl = connection._impl
    impl.add_on_connection_blocked_callback(
        lambda _conn, frame: callback(str(getattr(frame.method, "reason", "") or "an alarm"))
    )
    impl.add_on_connection_unblocked_callback(lambda _conn, _frame: callback(None))


class QueueProbe:
    """``fibrpc.amqp.QueueProbe`` without waiting for the answer: a passive declare on a
    channel of the probe's own (a 404 closes the channel it happens on), answered on the
    connection's next turns by ``on_answer(consumers)``, with None when the queue does
    not exist, or once by ``on_refused(reply_code, reply_text)`` when the broker refuses
    the question (403, RabbitMQ 4.2.6 and later), after which it is not asked again."""

    def __init__(
        self,
        connection: Any,
        queue: str,
        on_answer: Callable[[int | None], None],
        on_refused: Callable[[int, str], None],
    ) -> None:
        self._pika = connection._impl
        self._queue = queue
        self._on_answer = on_answer
        self._on_refused = on_refused
        self._channel: Any = None
        self._asking = False
        self.refused = False

    def ask(self) -> None:
        """Send the question unless one is on its way already, or the broker refused it
        (any thread that drives the connection)."""
        if self._asking or self.refused or not self._pika.is_open:
            return
        self._asking = True
        channel = self._channel
        if channel is not None and channel.is_open:
            self._declare(channel)
        elif channel is None or channel.is_closed:
            self._channel = self._pika.channel(on_open_callback=self._declare)
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
        elif code in (403, 530):  # ACCESS_REFUSED, NOT_ALLOWED (fibrpc.refusals)
            self.refused = True
            self._on_refused(code, str(getattr(reason, "reply_text", reason)))


# -- the transport ---------------------------------------------------------------------


def _produce_gathered(self: Any) -> None:
    """pika's plaintext transport, writing all its queued frames in one system call.

    ``sendmsg`` hands the kernel every queued buffer at once (no copy); a partial write
    keeps the rest queued, as pika does. Exceptions (``EAGAIN`` among them) reach pika's
    own handler unchanged.
    """
    buffers: collections.deque[bytes] = self._tx_buffers
    while buffers:
        sent: int = self._sock.sendmsg(list(itertools.islice(buffers, _GATHER)))
        self._tx_buffered_byte_count -= sent
        while sent:
            head = buffers[0]
            if sent < len(head):
                buffers[0] = head[sent:]
                break
            buffers.popleft()
            sent -= len(head)


def _consume_until_short(self: Any) -> None:
    """pika's plaintext transport, reading until a read comes back short.

    pika reads 4 KB at a time until ``recv`` raises EAGAIN: on an RPC connection, where
    one message arrives at a time, every readable socket cost a second ``recv`` and an
    exception, and a 2 MB reply 500 reads. A short read means the kernel had no more just
    then; if more arrives, the poll (level-triggered) reports the socket again.
    """
    buffer: bytearray = self._fibrpc_rx
    view = memoryview(buffer)
    consumed = 0
    while self._state == self._STATE_ACTIVE and consumed < _CONSUME_BYTES:
        got = self._sock.recv_into(buffer)
        if not got:
            raise self.RxEndOfFile()
        consumed += got
        self._protocol.data_received(bytes(view[:got]))
        if got < len(buffer):
            return


# -- deliveries ------------------------------------------------------------------------


def _take_in(self: Any, data: bytes) -> None:
    """pika's ``Connection._on_data_available`` with a short way for deliveries (see the
    module docstring). A delivery is never split between the two ways, so pika never
    holds half of one; every other frame, and any delivery that is not plainly for a
    live consumer, goes through pika one frame at a time."""
    pending: bytearray | None = self._fibrpc_pending
    if pending is not None:  # the rest of a delivery: wait until it can be whole
        pending += data
        if len(pending) < self._fibrpc_need:
            return
        buffer = bytes(pending)
        self._fibrpc_pending = None
    else:
        buffer = self._frame_buffer + data if self._frame_buffer else data
    start = 0
    while len(buffer) - start >= FRAME_OVERHEAD:
        kind, channel_number, length = FRAME_HEAD.unpack_from(buffer, start)
        if start + length + FRAME_OVERHEAD > len(buffer):
            break  # the frame has not all arrived
        method_at = start + FRAME_HEAD_SIZE
        if kind == FRAME_METHOD and buffer[method_at : method_at + METHOD_ID_SIZE] == BASIC_DELIVER:
            whole = _whole_delivery(buffer, start, channel_number)
            if whole is None:  # wait for the rest of the message, without rescanning it
                self._fibrpc_need = _needed(buffer, start, self._body_max_length)
                self._fibrpc_pending = bytearray(memoryview(buffer)[start:])
                self._frame_buffer = b""
                return
            if whole is not False:
                end, frames, body = whole
                channel = self._channels.get(channel_number)
                method = pika.spec.Basic.Deliver()
                method.decode(buffer, method_at + METHOD_ID_SIZE)
                tag = method.consumer_tag
                consumer = channel._consumers.get(tag) if channel is not None else None
                if consumer is not None and channel.is_open and tag not in channel._cancelled:
                    properties = _properties(buffer, start + length + FRAME_OVERHEAD + _FLAGS_AT)
                    self.frames_received += frames
                    self.bytes_received += end - start
                    self._frame_buffer = buffer[end:]  # consistent while the consumer runs
                    consumer(channel, method, properties, body)
                    buffer, start = self._frame_buffer, 0
                    continue
        # Anything else: one frame, pika's way.
        self._frame_buffer = buffer[start:]
        consumed, frame_value = self._read_frame()
        if not frame_value:
            return
        self._trim_frame_buffer(consumed)
        self._process_frame(frame_value)
        buffer, start = self._frame_buffer, 0
    self._frame_buffer = buffer[start:]


def _tolerant_take_in(self: Any, data: bytes) -> None:
    """pika's own ``_on_data_available``, except that a content header whose table pika
    cannot decode loses its table instead of the connection (with it, the message would
    come back first on every reconnect and wedge the queue)."""
    pika_take_in = pika.connection.Connection._on_data_available
    try:
        pika_take_in(self, data)
    except (ValueError, OverflowError, OSError):
        buffer = self._frame_buffer  # the header frame pika choked on comes first
        kind, channel_number, length = FRAME_HEAD.unpack_from(buffer, 0)
        if kind != FRAME_HEADER:
            raise
        properties = _without_headers(buffer[: FRAME_HEAD_SIZE + length], _FLAGS_AT)
        payload = buffer[FRAME_HEAD_SIZE:_FLAGS_AT] + properties
        frame = FRAME_HEAD.pack(kind, channel_number, len(payload))
        rest = buffer[FRAME_OVERHEAD + length :]
        self._frame_buffer = frame + payload + FRAME_END_CHAR + rest
        log.warning("dropped the headers of a message: pika cannot decode them")
        pika_take_in(self, b"")


def _needed(buffer: bytes, start: int, body_frame_max: int) -> int:
    """At least how many bytes, from ``start``, the delivery there takes whole: a lower
    bound (every body frame carries at most ``body_frame_max`` bytes), so waiting for
    that many never waits for too many."""
    method: tuple[int, int, int] = FRAME_HEAD.unpack_from(buffer, start)
    at = start + method[2] + FRAME_OVERHEAD  # the content header
    if len(buffer) - at < FRAME_OVERHEAD + HEADER_FIXED:
        return at + FRAME_OVERHEAD + HEADER_FIXED - start
    header: tuple[int, int, int] = FRAME_HEAD.unpack_from(buffer, at)
    length = header[2]
    if len(buffer) - at < length + FRAME_OVERHEAD:
        return at + length + FRAME_OVERHEAD - start
    body_size: int = BODY_SIZE.unpack_from(buffer, at + _BODY_SIZE_AT)[0]
    count = max(1, -(-body_size // max(1, body_frame_max)))
    return at + length + FRAME_OVERHEAD + body_size + FRAME_OVERHEAD * count - start


def _whole_delivery(
    buffer: bytes, start: int, channel: int
) -> tuple[int, int, bytes] | Literal[False] | None:
    """Where the delivery whose method frame starts at ``start`` ends, how many frames it
    has and its body: None if some of it has not arrived yet, False if it is not laid
    out as a delivery should be (pika then takes it, and says what is wrong)."""
    at = start + FRAME_HEAD.unpack_from(buffer, start)[2] + FRAME_OVERHEAD
    if buffer[at - 1] != FRAME_END:
        return False
    length = _frame_length(buffer, at, FRAME_HEADER, channel)
    if length is None or length is False:
        return length
    (body_size,) = BODY_SIZE.unpack_from(buffer, at + _BODY_SIZE_AT)
    at += length + FRAME_OVERHEAD
    parts = []
    got = 0
    while got < body_size:
        length = _frame_length(buffer, at, FRAME_BODY, channel)
        if length is None or length is False:
            return length
        parts.append(buffer[at + FRAME_HEAD_SIZE : at + FRAME_HEAD_SIZE + length])
        got += length
        at += length + FRAME_OVERHEAD
    if got != body_size:
        return False
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    return at, 2 + len(parts), body


def _frame_length(buffer: bytes, at: int, kind: int, channel: int) -> int | Literal[False] | None:
    """The payload length of the frame at ``at``, if it is a whole frame of ``kind`` on
    ``channel``: None if it has not all arrived, False if it is something else. (A whole
    content header is at least 22 bytes: its body size can be read.)"""
    if len(buffer) - at < FRAME_OVERHEAD:
        return None
    head: tuple[int, int, int] = FRAME_HEAD.unpack_from(buffer, at)
    found, number, length = head
    if found != kind or number != channel:
        return False
    if at + length + FRAME_OVERHEAD > len(buffer):
        return None
    if buffer[at + FRAME_HEAD_SIZE + length] != FRAME_END:
        return False
    return length


def _properties(buffer: bytes, at: int) -> Any:
    """The message properties whose flags start at ``at``, decoded by pika; a header
    table pika cannot decode (a timestamp Python cannot represent, say: pika raises, which
    would drop the connection and bring the message back first every time) is left out,
    and the other properties kept."""
    properties = pika.spec.BasicProperties()
    try:
        properties.decode(buffer, at)
    except (ValueError, OverflowError, OSError):
        properties = pika.spec.BasicProperties()
        properties.decode(_without_headers(buffer, at), 0)
        log.warning("dropped the headers of a message: pika cannot decode them")
    return properties


def _without_headers(buffer: bytes, at: int) -> bytes:
    """The property list at ``at`` with its header table emptied (only the first flag
    word is read: the properties after it do not concern the headers' place)."""
    (flags,) = PROPERTY_FLAGS.unpack_from(buffer, at)
    offset = at + PROPERTY_FLAGS.size
    for flag in (CONTENT_TYPE_FLAG, CONTENT_ENCODING_FLAG):
        if flags & flag:
            offset += 1 + buffer[offset]  # a short string: its length, then its bytes
    if not flags & HEADERS_FLAG:
        return buffer[at:]
    (table,) = TABLE_LENGTH.unpack_from(buffer, offset)
    empty = TABLE_LENGTH.pack(0)
    return buffer[at:offset] + empty + buffer[offset + TABLE_LENGTH.size + table :]
