"""fibrpc's shortcuts through pika, installed on fibrpc's own connections only.

pika's general machinery cost a measurable share of a round trip (bench/README.md says
what each part still buys). On each connection ``fibrpc.amqp.connect`` opens, ``install``
puts in place:

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

Nothing of pika's modules or classes is replaced: the methods are set on the connection's
own objects. ``enabled()`` is False, and fibrpc runs on pika's stock paths, when
``FIBRPC_FAST_PATH`` is ``0`` (``false``, ``no``, ``off``) or when this pika lacks the
internals used here (one warning). The transport shortcuts are for plaintext only: TLS
must retry a blocked write with the same buffer, and a TLS socket may hold decrypted
bytes that no poll reports.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import struct
import types
from typing import Any, Final, Literal

import pika
import pika.adapters.blocking_connection
import pika.adapters.utils.io_services_utils as pika_io
import pika.connection
import pika.spec

log = logging.getLogger(__name__)

#: The environment variable that turns the fast path off.
ENV: Final = "FIBRPC_FAST_PATH"
_OFF: Final = frozenset({"0", "false", "no", "off"})
#: The pika release line these shortcuts are written and tested against.
TESTED_PIKA: Final = "1.4."

#: Buffers handed to one ``sendmsg``: well under Linux's IOV_MAX (1024).
_GATHER: Final = 256
#: Bytes one read may take, and bytes one turn may read before the loop moves on.
_RECV_BYTES: Final = 1 << 18
_CONSUME_BYTES: Final = 1 << 22

_FRAME_HEAD: Final = struct.Struct(">BHI")
_BODY_SIZE: Final = struct.Struct(">Q")
_PROPERTY_FLAGS: Final = struct.Struct(">H")
_BASIC_DELIVER: Final = struct.pack(">HH", 60, 60)
_FRAME_END: Final = 0xCE
#: Frame type numbers (AMQP 0-9-1): method, content header, content body.
_METHOD, _HEADER, _BODY = 1, 2, 3
#: A content header frame's payload before its property flags: class, weight, body size.
_HEADER_FIXED: Final = 12
#: The flags of the properties that come before ``headers`` in a content header.
_CONTENT_TYPE_FLAG: Final = 1 << 15
_CONTENT_ENCODING_FLAG: Final = 1 << 14
_HEADERS_FLAG: Final = 1 << 13


@functools.cache
def enabled() -> bool:
    """Whether the shortcuts are used (see the module docstring); decided once."""
    if os.environ.get(ENV, "1").strip().lower() in _OFF:
        log.info("%s is off: fibrpc uses pika's stock paths", ENV)
        return False
    missing = _missing_internals()
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


def _missing_internals() -> list[str]:
    needed = {
        pika_io._AsyncPlaintextTransport: ("_produce", "_consume", "_on_socket_writable"),
        pika.BlockingConnection: ("_cleanup",),
        pika.connection.Connection: (
            "_read_frame",
            "_trim_frame_buffer",
            "_process_frame",
            "_on_data_available",
            "_adapter_emit_data",
        ),
        pika.adapters.blocking_connection.BlockingChannel: ("_on_consumer_cancelled_by_broker",),
    }
    return [f"{c.__name__}.{a}" for c, names in needed.items() for a in names if not hasattr(c, a)]


def install(connection: Any) -> None:
    """Put the shortcuts on ``connection`` (a ``pika.BlockingConnection`` just opened),
    if ``enabled()``; otherwise only the tolerant reading of header tables, which every
    fibrpc connection needs (``_stock_take_in``)."""
    impl = connection._impl
    if not enabled():
        if hasattr(impl, "_frame_buffer"):
            impl._on_data_available = types.MethodType(_stock_take_in, impl)
        return
    impl._fibrpc_pending = None
    impl._fibrpc_need = 0
    impl._on_data_available = types.MethodType(_take_in, impl)
    transport = impl._transport
    if type(transport) is pika_io._AsyncPlaintextTransport:
        transport._fibrpc_rx = bytearray(_RECV_BYTES)
        transport._produce = types.MethodType(_produce_gathered, transport)
        transport._consume = types.MethodType(_consume_until_short, transport)


def flush(impl: Any) -> None:
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
    while len(buffer) - start >= 8:
        kind, channel_number, length = _FRAME_HEAD.unpack_from(buffer, start)
        if start + length + 8 > len(buffer):
            break  # the frame has not all arrived
        if kind == _METHOD and buffer[start + 7 : start + 11] == _BASIC_DELIVER:
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
                method.decode(buffer, start + 11)
                tag = method.consumer_tag
                consumer = channel._consumers.get(tag) if channel is not None else None
                if consumer is not None and channel.is_open and tag not in channel._cancelled:
                    properties = _properties(buffer, start + length + 8 + 7 + _HEADER_FIXED)
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


def _stock_take_in(self: Any, data: bytes) -> None:
    """pika's own ``_on_data_available``, except that a content header whose table pika
    cannot decode loses its table instead of the connection (with it, the message would
    come back first on every reconnect and wedge the queue)."""
    pika_take_in = pika.connection.Connection._on_data_available
    try:
        pika_take_in(self, data)
    except (ValueError, OverflowError, OSError):
        buffer = self._frame_buffer  # the header frame pika choked on comes first
        kind, _, length = _FRAME_HEAD.unpack_from(buffer, 0)
        if kind != _HEADER:
            raise
        flags_at = 7 + _HEADER_FIXED
        properties = _without_headers(buffer[: 7 + length], flags_at)
        payload = buffer[7:flags_at] + properties
        frame = _FRAME_HEAD.pack(kind, _FRAME_HEAD.unpack_from(buffer, 0)[1], len(payload))
        self._frame_buffer = frame + payload + bytes([_FRAME_END]) + buffer[8 + length :]
        log.warning("dropped the headers of a message: pika cannot decode them")
        pika_take_in(self, b"")


def _needed(buffer: bytes, start: int, body_frame_max: int) -> int:
    """At least how many bytes, from ``start``, the delivery there takes whole: a lower
    bound (every body frame carries at most ``body_frame_max`` bytes), so waiting for
    that many never waits for too many."""
    method: tuple[int, int, int] = _FRAME_HEAD.unpack_from(buffer, start)
    at = start + method[2] + 8  # the content header
    if len(buffer) - at < 8 + _HEADER_FIXED:
        return at + 8 + _HEADER_FIXED - start
    header: tuple[int, int, int] = _FRAME_HEAD.unpack_from(buffer, at)
    length = header[2]
    if len(buffer) - at < length + 8:
        return at + length + 8 - start
    body_size: int = _BODY_SIZE.unpack_from(buffer, at + 11)[0]
    frames = max(1, -(-body_size // max(1, body_frame_max)))
    return at + length + 8 + body_size + 8 * frames - start


def _whole_delivery(
    buffer: bytes, start: int, channel: int
) -> tuple[int, int, bytes] | Literal[False] | None:
    """Where the delivery whose method frame starts at ``start`` ends, how many frames it
    has and its body: None if some of it has not arrived yet, False if it is not laid
    out as a delivery should be (pika then takes it, and says what is wrong)."""
    at = start + _FRAME_HEAD.unpack_from(buffer, start)[2] + 8
    if buffer[at - 1] != _FRAME_END:
        return False
    length = _frame_length(buffer, at, _HEADER, channel)
    if length is None or length is False:
        return length
    (body_size,) = _BODY_SIZE.unpack_from(buffer, at + 11)
    at += length + 8
    parts = []
    got = 0
    while got < body_size:
        length = _frame_length(buffer, at, _BODY, channel)
        if length is None or length is False:
            return length
        parts.append(buffer[at + 7 : at + 7 + length])
        got += length
        at += length + 8
    if got != body_size:
        return False
    body = parts[0] if len(parts) == 1 else b"".join(parts)
    return at, 2 + len(parts), body


def _frame_length(buffer: bytes, at: int, kind: int, channel: int) -> int | Literal[False] | None:
    """The payload length of the frame at ``at``, if it is a whole frame of ``kind`` on
    ``channel``: None if it has not all arrived, False if it is something else. (A whole
    content header is at least 22 bytes: its body size can be read.)"""
    if len(buffer) - at < 8:
        return None
    head: tuple[int, int, int] = _FRAME_HEAD.unpack_from(buffer, at)
    found, number, length = head
    if found != kind or number != channel:
        return False
    if at + length + 8 > len(buffer):
        return None
    if buffer[at + length + 7] != _FRAME_END:
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
    (flags,) = _PROPERTY_FLAGS.unpack_from(buffer, at)
    offset = at + 2
    for flag in (_CONTENT_TYPE_FLAG, _CONTENT_ENCODING_FLAG):
        if flags & flag:
            offset += 1 + buffer[offset]  # a short string: its length, then its bytes
    if not flags & _HEADERS_FLAG:
        return buffer[at:]
    (table,) = struct.unpack_from(">I", buffer, offset)
    return buffer[at:offset] + b"\0\0\0\0" + buffer[offset + 4 + table :]
