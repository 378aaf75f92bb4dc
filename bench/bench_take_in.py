"""Taking in deliveries: ``fastpath._take_in`` against pika's own ``_on_data_available``.

1,000 replies as RabbitMQ frames them (method, header, body; a correlation id each),
fed in 4 KB reads, as the socket hands them over, to a real connection from
``amqp.connect`` with a consumer that counts. Divide a round by 1,000 for one delivery.
The broker sends nothing meanwhile: the bytes come from here, the parsing is real.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.connection
import pytest
from conftest import URL
from pika import frame, spec
from pytest_benchmark.fixture import BenchmarkFixture

from fibrpc import amqp, fastpath


class _Counting:
    def __init__(self) -> None:
        self.conn = amqp.connect(URL)
        self.channel = self.conn.channel()
        self.queue = f"fibrpc-bench-takein-{uuid.uuid4().hex[:10]}"
        self.channel.queue_declare(self.queue, durable=True, auto_delete=True)
        self.count = 0
        self.tag = amqp.consume_direct(
            self.conn, self.channel, self.queue, self._count, auto_ack=True
        )

    def _count(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self.count += 1

    def reads(self) -> list[bytes]:
        number = self.channel.channel_number
        stream = b"".join(
            frame.Method(number, spec.Basic.Deliver(self.tag, i + 1, False, "", "x")).marshal()
            + frame.Header(  # type: ignore[arg-type]
                number, 20, pika.BasicProperties(correlation_id=f"0123456789ab.{i}")
            ).marshal()
            + frame.Body(number, b"%020d" % i).marshal()
            for i in range(1000)
        )
        return [stream[at : at + 4096] for at in range(0, len(stream), 4096)]


@pytest.fixture(scope="module")
def counting() -> Iterator[_Counting]:
    c = _Counting()
    yield c
    c.conn.close()


def _feed(counting: _Counting, take_in: Callable[[Any, bytes], None]) -> Callable[[], int]:
    """A round: every read of the 1,000 deliveries through ``take_in``."""
    reads, impl = counting.reads(), counting.conn._impl

    def run() -> int:
        for data in reads:
            take_in(impl, data)
        return counting.count

    return run


def test_take_in_1000_deliveries(benchmark: BenchmarkFixture, counting: _Counting) -> None:
    before = counting.count
    benchmark(_feed(counting, fastpath._take_in))
    assert counting.count > before and (counting.count - before) % 1000 == 0


def test_pika_on_data_available_1000_deliveries(
    benchmark: BenchmarkFixture, counting: _Counting
) -> None:
    before = counting.count
    benchmark(_feed(counting, pika.connection.Connection._on_data_available))
    assert counting.count > before and (counting.count - before) % 1000 == 0
