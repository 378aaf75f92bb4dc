"""The worker's link (``fibrpc.serverlink.AmqpWorkerLink``) against a real RabbitMQ: what
it does when its queue goes away under it. (The worker's side of the same story, with a
fake link, is in tests/test_worker.py; the whole server's in tests/test_faults.py.)"""

from __future__ import annotations

import time
from typing import Any

import pika
from conftest import URL, broker_connection

from fibrpc import amqp
from fibrpc.serverlink import AmqpWorkerLink

BOUND = 10.0


def _link(queue: str, queue_type: str = "classic") -> AmqpWorkerLink:
    return AmqpWorkerLink(
        [URL], queue, queue_type=queue_type, prefetch=10, heartbeat=30, tls=None, name="test"
    )


def test_a_queue_gone_between_the_declare_and_the_consume_leaves_a_fresh_channel(
    queue, monkeypatch
):
    """A quorum queue still being deleted answers the declare and is gone by the consume
    (RabbitMQ 4.0 did so in 7 of 15 runs of a server under held calls): the broker closes the
    channel with 404. The link says so (False) and opens a fresh channel on the same
    connection, on which a reply still goes out and the next try consumes."""
    cancelled: list[bool] = []
    link = _link(queue)
    link.open(lambda *args: None, lambda: cancelled.append(True))
    try:
        other = broker_connection()
        try:
            other.channel().queue_delete(queue)
            deadline = time.monotonic() + BOUND
            while not cancelled:  # RabbitMQ cancels the consumer
                assert time.monotonic() < deadline, "no basic.cancel"
                link.turn()
            declare = amqp.declare_request_queue

            def declare_then_lose(channel: Any, name: str, **kwargs: Any) -> None:
                declare(channel, name, **kwargs)
                other.channel().queue_delete(name)  # gone before the consume

            monkeypatch.setattr(amqp, "declare_request_queue", declare_then_lose)
            assert link.consume_again() is False
            monkeypatch.setattr(amqp, "declare_request_queue", declare)
            assert link.is_open()
            reply_to = other.channel().queue_declare("", exclusive=True).method.queue
            props = pika.BasicProperties(correlation_id="held", reply_to=reply_to)
            link.reply(props, b"55", "text/plain")
            link.turn()
            assert link.consume_again() is True
            link.turn()
            channel = other.channel()
            assert channel.queue_declare(queue, passive=True).method.consumer_count == 1
            got = None
            while got is None:
                assert time.monotonic() < deadline, "the reply did not arrive"
                _method, got_props, got = channel.basic_get(reply_to, auto_ack=True)
            assert (got, got_props.correlation_id) == (b"55", "held")
        finally:
            other.close()
    finally:
        link.close()
