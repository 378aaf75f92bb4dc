"""AMQP 0-9-1 frames for the messages on the hot path, encoded in a few joins.

A request, a reply and an ack are all the hot path writes, and pika encodes each
through its general machinery (an object per frame, per property, per table value): in a
cProfile of 3,000 sequential calls, pika's ``_send_message`` was over a quarter of the
client's time. These functions
build the same bytes directly. They cover what fibrpc sends: the default exchange, a
few short-string properties, and integer and string headers (a deadline, a trace
context); ``fibrpc.fastpath`` hands anything else
(and bodies longer than one frame) to pika. The frame layout is named here once
(``FRAME_END``, the frame types, the content header's fields), for the encoders below and
for ``fibrpc.fastpath``'s reading of deliveries. No pika here: tests compare every byte
with what pika encodes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

# -- the frame layout (AMQP 0-9-1, 2.3.5 and 4.2.3), named as pamqp names it -----------------

#: Frame types: a method, a content header, a content body.
FRAME_METHOD: Final = 1
FRAME_HEADER: Final = 2
FRAME_BODY: Final = 3
#: The octet that ends every frame, as a number and as bytes.
FRAME_END: Final = 0xCE
FRAME_END_CHAR: Final = b"\xce"
#: A frame's head: its type, its channel, the length of its payload.
FRAME_HEAD: Final = struct.Struct(">BHI")
FRAME_HEAD_SIZE: Final = FRAME_HEAD.size  # 7
#: Bytes of a frame beyond its payload: the head and the end octet.
FRAME_OVERHEAD: Final = FRAME_HEAD_SIZE + 1

#: Class and method ids (``>HH``) of the methods read or written here.
BASIC_CLASS: Final = 60
BASIC_PUBLISH: Final = struct.pack(">HH", BASIC_CLASS, 40)
BASIC_DELIVER: Final = struct.pack(">HH", BASIC_CLASS, 60)
BASIC_ACK: Final = struct.pack(">HH", BASIC_CLASS, 80)
METHOD_ID_SIZE: Final = 4

#: A content header's payload before its property flags: class, weight, body size.
HEADER_FIXED: Final = 12
#: Where the body size (``>Q``) sits in a content header's payload.
HEADER_BODY_SIZE_AT: Final = 4
BODY_SIZE: Final = struct.Struct(">Q")
PROPERTY_FLAGS: Final = struct.Struct(">H")
#: A field table starts with its length in bytes.
TABLE_LENGTH: Final = struct.Struct(">I")

# Property flags, in the order their values follow the flags (AMQP 0-9-1, 4.2.6.1).
CONTENT_TYPE_FLAG: Final = 1 << 15
CONTENT_ENCODING_FLAG: Final = 1 << 14
HEADERS_FLAG: Final = 1 << 13
CORRELATION_ID_FLAG: Final = 1 << 10
REPLY_TO_FLAG: Final = 1 << 9
EXPIRATION_FLAG: Final = 1 << 8
TYPE_FLAG: Final = 1 << 5

#: Basic.Publish with ticket 0, then the default exchange ("").
_PUBLISH_DEFAULT_EXCHANGE: Final = BASIC_PUBLISH + struct.pack(">HB", 0, 0)

_INT32_MIN: Final = -(1 << 31)
_INT32_MAX: Final = (1 << 31) - 1


def _shortstr(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError(f"A short string is at most 255 bytes; this one is {len(raw)}.")
    return bytes((len(raw),)) + raw


def _table(headers: Mapping[str, int | str]) -> bytes:
    """A field table of integers and strings, typed as pika types them (int32 when it
    fits; a string as a long string of UTF-8)."""
    parts = []
    for key, value in headers.items():
        if type(value) is str:
            raw = value.encode()
            parts.append(_shortstr(key) + b"S" + struct.pack(">I", len(raw)) + raw)
            continue
        if type(value) is not int:
            raise TypeError(f"Only int and str header values are encoded here, not {type(value)}.")
        if _INT32_MIN <= value <= _INT32_MAX:
            parts.append(_shortstr(key) + b"I" + struct.pack(">i", value))
        else:
            parts.append(_shortstr(key) + b"l" + struct.pack(">q", value))
    payload = b"".join(parts)
    return TABLE_LENGTH.pack(len(payload)) + payload


def properties(
    *,
    content_type: str | None = None,
    headers: Mapping[str, int | str] | None = None,
    correlation_id: str | bytes | None = None,
    reply_to: str | None = None,
    expiration: str | None = None,
    message_type: str | None = None,
) -> tuple[int, bytes]:
    """The property flags and the encoded property list of a content header.

    Raises ``ValueError`` for a string over 255 bytes and ``TypeError`` for a header
    value that is neither an int nor a str (pika's own encoder takes those).
    """
    flags = 0
    parts = []
    if content_type is not None:
        flags |= CONTENT_TYPE_FLAG
        parts.append(_shortstr(content_type))
    if headers is not None:
        flags |= HEADERS_FLAG
        parts.append(_table(headers))
    if correlation_id is not None:
        flags |= CORRELATION_ID_FLAG
        parts.append(_shortstr(correlation_id))
    if reply_to is not None:
        flags |= REPLY_TO_FLAG
        parts.append(_shortstr(reply_to))
    if expiration is not None:
        flags |= EXPIRATION_FLAG
        parts.append(_shortstr(expiration))
    if message_type is not None:
        flags |= TYPE_FLAG
        parts.append(_shortstr(message_type))
    return flags, b"".join(parts)


def publish(
    channel: int,
    routing_key: str,
    body: bytes,
    props: tuple[int, bytes],
    *,
    mandatory: bool = False,
) -> bytes:
    """Basic.Publish to the default exchange, its content header and one body frame:
    the three frames of a message whose body fits one frame (the caller checks)."""
    method = (
        _PUBLISH_DEFAULT_EXCHANGE + _shortstr(routing_key) + (b"\x01" if mandatory else b"\x00")
    )
    flags, values = props
    header_size = 14 + len(values)
    return b"".join(
        (
            FRAME_HEAD.pack(FRAME_METHOD, channel, len(method)),
            method,
            FRAME_END_CHAR,
            FRAME_HEAD.pack(FRAME_HEADER, channel, header_size),
            struct.pack(">HHQH", BASIC_CLASS, 0, len(body), flags),
            values,
            FRAME_END_CHAR,
            FRAME_HEAD.pack(FRAME_BODY, channel, len(body)) if body else b"",
            body,
            FRAME_END_CHAR if body else b"",
        )
    )


def ack(channel: int, delivery_tag: int) -> bytes:
    """Basic.Ack of one delivery (``multiple`` off)."""
    return (
        FRAME_HEAD.pack(FRAME_METHOD, channel, 13)
        + BASIC_ACK
        + struct.pack(">QB", delivery_tag, 0)
        + FRAME_END_CHAR
    )
