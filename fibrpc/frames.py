"""AMQP 0-9-1 frames for the messages on the hot path, encoded in a few joins.

A request, a reply and an ack are all the hot path writes, and pika encodes each
through its general machinery (an object per frame, per property, per table value): in a
cProfile of 3,000 sequential calls, pika's ``_send_message`` was over a quarter of the
client's time. These functions
build the same bytes directly. They cover what fibrpc sends: the default exchange, a
few short-string properties, and integer and string headers (a deadline, a trace
context); ``fibrpc.amqp`` hands anything else
(and bodies longer than one frame) to pika. No pika here: tests compare every byte with
what pika encodes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

_FRAME_METHOD: Final = 1
_FRAME_HEADER: Final = 2
_FRAME_BODY: Final = 3
_FRAME_END: Final = b"\xce"

#: Basic.Publish (class 60, method 40) with ticket 0, then the default exchange ("").
_PUBLISH_DEFAULT_EXCHANGE: Final = struct.pack(">HHHB", 60, 40, 0, 0)

# Property flags, in the order their values follow the flags (AMQP 0-9-1, 4.2.6.1).
_CONTENT_TYPE: Final = 1 << 15
_HEADERS: Final = 1 << 13
_CORRELATION_ID: Final = 1 << 10
_REPLY_TO: Final = 1 << 9
_EXPIRATION: Final = 1 << 8
_TYPE: Final = 1 << 5

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
    return struct.pack(">I", len(payload)) + payload


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
        flags |= _CONTENT_TYPE
        parts.append(_shortstr(content_type))
    if headers is not None:
        flags |= _HEADERS
        parts.append(_table(headers))
    if correlation_id is not None:
        flags |= _CORRELATION_ID
        parts.append(_shortstr(correlation_id))
    if reply_to is not None:
        flags |= _REPLY_TO
        parts.append(_shortstr(reply_to))
    if expiration is not None:
        flags |= _EXPIRATION
        parts.append(_shortstr(expiration))
    if message_type is not None:
        flags |= _TYPE
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
            struct.pack(">BHI", _FRAME_METHOD, channel, len(method)),
            method,
            _FRAME_END,
            struct.pack(">BHIHHQH", _FRAME_HEADER, channel, header_size, 60, 0, len(body), flags),
            values,
            _FRAME_END,
            struct.pack(">BHI", _FRAME_BODY, channel, len(body)) if body else b"",
            body,
            _FRAME_END if body else b"",
        )
    )


def ack(channel: int, delivery_tag: int) -> bytes:
    """Basic.Ack of one delivery (``multiple`` off)."""
    return struct.pack(">BHIHHQB", _FRAME_METHOD, channel, 13, 60, 80, delivery_tag, 0) + _FRAME_END
