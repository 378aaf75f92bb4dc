"""fibrpc.amqp's changes to how pika writes (all queued frames in one ``sendmsg``) and
reads (until a read comes back short).

The write path runs against a real socket pair whose buffers are far smaller than what
is queued, so that the kernel takes partial writes and refuses some with EAGAIN, as a
busy broker connection does.
"""

from __future__ import annotations

import collections
import random
import select
import socket
import threading
from typing import Any

import pika.adapters.utils.io_services_utils as pika_io
import pytest

from fibrpc import amqp


class _Transport:
    """The three attributes of pika's transport that its ``_produce`` uses."""

    def __init__(self, sock: socket.socket, chunks: list[bytes]) -> None:
        self._sock = sock
        self._tx_buffers: collections.deque[bytes] = collections.deque(chunks)
        self._tx_buffered_byte_count = sum(map(len, chunks))


def test_the_plaintext_transport_writes_with_the_gathering_produce() -> None:
    produce: Any = pika_io._AsyncPlaintextTransport._produce
    assert produce is amqp._produce_gathered
    assert pika_io._AsyncSSLTransport._produce is not amqp._produce_gathered


def test_partial_writes_keep_every_byte_in_order_and_the_count_right() -> None:
    rng = random.Random(7)
    chunks = [rng.randbytes(rng.choice((7, 8, 300, 4096, 70_000))) for _ in range(600)]
    expected = b"".join(chunks)
    sender, receiver = socket.socketpair()
    with sender, receiver:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sender.setblocking(False)
        transport = _Transport(sender, chunks)
        received = bytearray()
        refused = 0
        while transport._tx_buffers:
            try:
                amqp._produce_gathered(transport)
            except BlockingIOError:
                refused += 1
            queued = sum(map(len, transport._tx_buffers))
            assert transport._tx_buffered_byte_count == queued
            while True:  # the broker reads: drain what the kernel holds
                receiver.setblocking(False)
                try:
                    data = receiver.recv(1 << 20)
                except BlockingIOError:
                    break
                received += data
        receiver.setblocking(True)
        receiver.settimeout(5)
        while len(received) < len(expected):
            received += receiver.recv(1 << 20)
    assert refused > 0  # the test did exercise blocked and partial writes
    assert bytes(received) == expected
    assert transport._tx_buffered_byte_count == 0


class _Receiver:
    """The attributes of pika's transport that its ``_consume`` uses, and a protocol
    that keeps what it is given."""

    _STATE_ACTIVE = 1
    _MAX_RECV_BYTES = pika_io._AsyncTransportBase._MAX_RECV_BYTES
    _MAX_CONSUME_BYTES = pika_io._AsyncTransportBase._MAX_CONSUME_BYTES
    RxEndOfFile = pika_io._AsyncTransportBase.RxEndOfFile

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._state = self._STATE_ACTIVE
        self.received = bytearray()
        self._protocol = self

    def data_received(self, data: bytes) -> None:
        self.received += data


def test_reads_stop_at_a_short_read_and_the_next_poll_gets_the_rest() -> None:
    rng = random.Random(11)
    payload = rng.randbytes(300_000)
    sender, receiver = socket.socketpair()
    with sender, receiver:
        receiver.setblocking(False)
        transport = _Receiver(receiver)
        sender.sendall(payload[:1000])
        amqp._consume_until_short(transport)  # one short read; no EAGAIN raised
        assert transport.received == payload[:1000]

        def send_the_rest() -> None:  # more than the socket buffers hold: from a thread
            sender.sendall(payload[1000:])
            sender.shutdown(socket.SHUT_WR)

        writer = threading.Thread(target=send_the_rest, daemon=True)
        writer.start()
        poller = select.poll()
        poller.register(receiver, select.POLLIN)
        with pytest.raises(pika_io._AsyncTransportBase.RxEndOfFile):
            for _ in range(10_000):
                assert poller.poll(5000), "readable data was never reported"
                amqp._consume_until_short(transport)
        writer.join(5)
    assert transport.received == payload
