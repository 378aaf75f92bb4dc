"""A bare pika client for tests: publish any message, collect the replies that come back.

It is deliberately not fibrpc's client, so that tests see exactly what crosses the wire.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pika

DIRECT = "amq.rabbitmq.reply-to"


class RawClient:
    def __init__(self, url: str, queue: str) -> None:
        self.queue = queue
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.conn.channel()
        self.replies: dict[str | None, list[tuple[Any, bytes]]] = {}
        self.channel.basic_consume(DIRECT, self._on_reply, auto_ack=True)

    def _on_reply(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.replies.setdefault(props.correlation_id, []).append((props, body))

    def publish(
        self, body: bytes, *, reply: bool = True, corr_id: str | None = None, **props: Any
    ) -> str:
        corr_id = corr_id or uuid.uuid4().hex
        properties = pika.BasicProperties(
            reply_to=DIRECT if reply else None, correlation_id=corr_id, **props
        )
        self.channel.basic_publish("", self.queue, body, properties)
        return corr_id

    def wait(self, count: int, timeout: float = 15.0) -> None:
        """Wait until ``count`` replies in all have arrived."""
        deadline = time.monotonic() + timeout
        while sum(map(len, self.replies.values())) < count and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)

    def settle(self, seconds: float) -> None:
        """Keep receiving for ``seconds`` (to catch replies that should not come)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)

    def reply(self, corr_id: str, timeout: float = 15.0) -> tuple[Any, bytes]:
        deadline = time.monotonic() + timeout
        while corr_id not in self.replies and time.monotonic() < deadline:
            self.conn.process_data_events(time_limit=0.05)
        assert corr_id in self.replies, f"no reply to {corr_id} within {timeout}s"
        return self.replies[corr_id][0]

    def error_code(self, corr_id: str) -> str:
        props, body = self.reply(corr_id)
        assert props.content_type == "application/json", body[:200]
        code: str = json.loads(body)["error"]["code"]
        return code

    def close(self) -> None:
        self.conn.close()
