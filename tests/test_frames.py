"""fibrpc.frames builds, byte for byte, the frames pika would build for the same message."""

from __future__ import annotations

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pika import frame, spec

from fibrpc import frames

short_text = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
maybe = st.none() | short_text
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def _pika_publish(channel: int, key: str, body: bytes, props: object, mandatory: bool) -> bytes:
    method = spec.Basic.Publish(exchange="", routing_key=key, mandatory=mandatory)
    out = frame.Method(channel, method).marshal()
    out += frame.Header(channel, len(body), props).marshal()  # type: ignore[arg-type]
    return out + (frame.Body(channel, body).marshal() if body else b"")


@given(
    channel=st.integers(1, 65535),
    key=short_text,
    body=st.binary(max_size=300),
    mandatory=st.booleans(),
    content_type=maybe,
    headers=st.none()
    | st.dictionaries(st.text(min_size=1, max_size=20), ints | st.text(max_size=80), max_size=3),
    correlation_id=maybe,
    reply_to=maybe,
    expiration=maybe,
    message_type=maybe,
)
def test_publish_matches_pika(
    channel: int,
    key: str,
    body: bytes,
    mandatory: bool,
    content_type: str | None,
    headers: dict[str, int | str] | None,
    correlation_id: str | None,
    reply_to: str | None,
    expiration: str | None,
    message_type: str | None,
) -> None:
    ours = frames.publish(
        channel,
        key,
        body,
        frames.properties(
            content_type=content_type,
            headers=headers,
            correlation_id=correlation_id,
            reply_to=reply_to,
            expiration=expiration,
            message_type=message_type,
        ),
        mandatory=mandatory,
    )
    props = pika.BasicProperties(
        content_type=content_type,
        headers=headers,
        correlation_id=correlation_id,
        reply_to=reply_to,
        expiration=expiration,
        type=message_type,
    )
    assert ours == _pika_publish(channel, key, body, props, mandatory)


@given(channel=st.integers(1, 65535), tag=st.integers(0, (1 << 64) - 1))
def test_ack_matches_pika(channel: int, tag: int) -> None:
    assert frames.ack(channel, tag) == frame.Method(channel, spec.Basic.Ack(tag)).marshal()


def test_what_it_does_not_encode_is_refused_so_that_pika_encodes_it() -> None:
    with pytest.raises(ValueError):
        frames.properties(correlation_id="x" * 256)
    with pytest.raises(TypeError):
        frames.properties(headers={"x-ratio": 1.5})  # type: ignore[dict-item]
