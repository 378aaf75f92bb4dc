"""fibrpc's fast path (``fibrpc.fastpath``): how its connections write (all queued frames
in one ``sendmsg``), read (until a read comes back short) and take in deliveries (whole,
and in time linear in their size), and that nothing of pika is changed for anyone else.

The write path runs against a real socket pair whose buffers are far smaller than what
is queued, so that the kernel takes partial writes and refuses some with EAGAIN, as a
busy broker connection does.
"""

from __future__ import annotations

import collections
import itertools
import random
import select
import socket
import threading
from typing import Any

import pika
import pika.adapters.utils.io_services_utils as pika_io
import pika.connection
import pytest
from conftest import URL
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pika import frame, spec

from fibrpc import amqp, fastpath


class _Transport:
    """The three attributes of pika's transport that its ``_produce`` uses."""

    def __init__(self, sock: socket.socket, chunks: list[bytes]) -> None:
        self._sock = sock
        self._tx_buffers: collections.deque[bytes] = collections.deque(chunks)
        self._tx_buffered_byte_count = sum(map(len, chunks))


_SNAPSHOT = """
import json, sys, pika, pika.adapters.blocking_connection as blocking, pika.connection
import pika.adapters.utils.io_services_utils as io, pika.data, pika.spec
def snap():
    seen = {}
    for owner in (pika.data, pika.spec, pika.connection, io, blocking, pika.spec.BasicProperties,
                  io._AsyncPlaintextTransport, io._AsyncSSLTransport, io._AsyncTransportBase,
                  pika.connection.Connection, blocking.BlockingConnection,
                  blocking.BlockingChannel):
        for name, value in vars(owner).items():
            seen[f"{getattr(owner, '__name__', owner)}.{name}"] = id(value)
    return seen
before = snap()
import fibrpc, fibrpc.server, fibrpc.supervisor
with fibrpc.Client(sys.argv[1], queue="fibrpc-test-no-such-queue", timeout=1) as client:
    try:
        client.call(30)
    except fibrpc.FibrpcError:
        pass
after = snap()
print(json.dumps(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))))
"""


@pytest.mark.broker
def test_importing_and_using_fibrpc_leaves_every_attribute_of_pika_as_it_was() -> None:
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    result = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT, URL],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.broker
def test_fibrpc_connections_and_only_they_write_with_the_gathering_produce() -> None:
    assert pika_io._AsyncPlaintextTransport._produce is not fastpath._produce_gathered
    conn = amqp.connect(URL)
    try:
        transport = conn._impl._transport
        assert transport._produce.__func__ is fastpath._produce_gathered
        assert type(transport)._produce is not fastpath._produce_gathered
    finally:
        conn.close()


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
                fastpath._produce_gathered(transport)
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
    RxEndOfFile = pika_io._AsyncTransportBase.RxEndOfFile

    def __init__(self, sock: socket.socket) -> None:
        self._fibrpc_rx = bytearray(4096)
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
        fastpath._consume_until_short(transport)  # one short read; no EAGAIN raised
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
                fastpath._consume_until_short(transport)
        writer.join(5)
    assert transport.received == payload


# -- deliveries taken in without pika's frame objects ----------------------------------------


class _Recorder:
    """A connection from ``amqp.connect`` with a consumer that records what it is given."""

    def __init__(self, queue: str) -> None:
        self.conn = amqp.connect(URL)
        self.channel = self.conn.channel()
        self.channel.queue_declare(queue, durable=True, auto_delete=True)
        self.seen: list[tuple[Any, ...]] = []
        self.tag = amqp.consume_direct(self.conn, self.channel, queue, self._record, auto_ack=True)

    def _record(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        self.seen.append(
            (
                method.consumer_tag,
                method.delivery_tag,
                method.redelivered,
                method.exchange,
                method.routing_key,
                props.correlation_id,
                props.content_type,
                props.headers,
                props.reply_to,
                bytes(body),
            )
        )


def _deliveries(channel: int, tag: str, bodies: list[bytes], frame_max: int) -> list[bytes]:
    """The frames RabbitMQ would send: one message per body, split at ``frame_max``;
    every third one for a consumer that does not exist, with heartbeats between."""
    out = []
    for i, body in enumerate(bodies):
        consumer = tag if i % 3 else "ctag-nobody"
        props = pika.BasicProperties(
            correlation_id=f"c{i}",
            content_type="application/json" if i % 2 else None,
            headers={"x-n": i} if i % 4 == 1 else None,
            reply_to="amq.rabbitmq.reply-to.x" if i % 5 == 2 else None,
        )
        deliver = spec.Basic.Deliver(consumer, i + 1, bool(i % 2), "", f"key{i}")
        message = frame.Method(channel, deliver).marshal()
        message += frame.Header(channel, len(body), props).marshal()  # type: ignore[arg-type]
        for at in range(0, len(body), frame_max):
            message += frame.Body(channel, body[at : at + frame_max]).marshal()
        out.append(message)
        if i % 7 == 3:
            out.append(frame.Heartbeat().marshal())
    return out


@pytest.mark.broker
@given(
    bodies=st.lists(
        st.one_of(  # short ones, and long ones that take several frames
            st.binary(max_size=40),
            st.builds(lambda n, b: bytes([b]) * n, st.integers(41, 1500), st.integers(0, 255)),
        ),
        min_size=1,
        max_size=25,
    ),
    frame_max=st.sampled_from([64, 300, 4096]),
    cuts=st.lists(st.integers(1, 900), min_size=1, max_size=40),
)
@example(bodies=[b"x" * 200, b"y" * 150, b"", b"z" * 5000], frame_max=64, cuts=[1, 7, 300])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_deliveries_reach_the_consumer_exactly_as_through_pika(
    bodies: list[bytes], frame_max: int, cuts: list[int]
) -> None:
    """The same bytes, cut into reads anywhere, give the consumer the same calls whether
    ``fastpath._take_in`` or pika's own ``_on_data_available`` takes them in."""
    queue = f"fibrpc-test-takein-{random.getrandbits(40):x}"
    ours, theirs = _Recorder(queue), _Recorder(queue + "-pika")
    try:
        stream = b"".join(_deliveries(ours.channel.channel_number, ours.tag, bodies, frame_max))
        reads, at = [], 0
        for i in itertools.cycle(range(len(cuts))):
            if at >= len(stream):
                break
            reads.append(stream[at : at + cuts[i]])
            at += cuts[i]
        impl = ours.conn._impl
        for data in reads:
            impl._on_data_available(data)
        twin = theirs.conn._impl
        theirs_stream = stream.replace(ours.tag.encode(), theirs.tag.encode())
        assert len(theirs_stream) == len(stream)
        pika.connection.Connection._on_data_available(twin, theirs_stream)
        assert impl._frame_buffer == b""
        assert impl._fibrpc_pending is None
        assert [s[1:] for s in ours.seen] == [s[1:] for s in theirs.seen]
        assert len(ours.seen) == sum(1 for i in range(len(bodies)) if i % 3)
    finally:
        for recorder in (ours, theirs):
            recorder.conn.close()


@pytest.mark.broker
def test_a_large_delivery_in_small_reads_is_scanned_a_few_times_not_once_a_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Intake is linear: a 2 MB message in 128 KB frames, fed 4 KB at a time (512 reads),
    is looked at as a whole only when enough bytes are there for it."""
    queue = f"fibrpc-test-takein-{random.getrandbits(40):x}"
    ours = _Recorder(queue)
    scans = []
    real = fastpath._whole_delivery

    def counting(*args: Any) -> Any:
        scans.append(1)
        return real(*args)

    monkeypatch.setattr(fastpath, "_whole_delivery", counting)
    try:
        body = random.Random(3).randbytes(2 << 20)
        frame_max = ours.conn._impl._body_max_length
        stream = b"".join(
            _deliveries(ours.channel.channel_number, ours.tag, [b"", body], frame_max)
        )
        impl = ours.conn._impl
        for at in range(0, len(stream), 4096):
            impl._on_data_available(stream[at : at + 4096])
        assert [s[-1] for s in ours.seen] == [body]
        assert len(scans) <= 4, len(scans)
    finally:
        ours.conn.close()


@pytest.mark.broker
def test_a_header_table_pika_cannot_decode_is_dropped_and_the_message_kept() -> None:
    queue = f"fibrpc-test-takein-{random.getrandbits(40):x}"
    ours = _Recorder(queue)
    try:
        props = pika.BasicProperties(
            content_type="text/plain", correlation_id="c1", reply_to="r", headers={"x": 1}
        )
        deliver = spec.Basic.Deliver(ours.tag, 1, False, "", queue)
        channel = ours.channel.channel_number
        header = frame.Header(channel, 2, props).marshal()  # type: ignore[arg-type]
        # The header table's value: an int (b"I" + 4 bytes) becomes a timestamp of the
        # year 10000 and more (b"T" + 8 bytes): pika cannot make a datetime of it.
        table = b"\x01xI\x00\x00\x00\x01"
        assert table in header
        bad_table = b"\x01xT" + (300_000_000_000).to_bytes(8, "big")
        header = header.replace(table, bad_table)
        length = int.from_bytes(header[3:7], "big") + len(bad_table) - len(table)
        header = header[:3] + length.to_bytes(4, "big") + header[7:]
        header = header.replace(b"\x00\x00\x00\x07\x01xT", b"\x00\x00\x00\x0b\x01xT")
        stream = frame.Method(channel, deliver).marshal() + header
        stream += frame.Body(channel, b"30").marshal()
        ours.conn._impl._on_data_available(stream)
        assert ours.conn.is_open
        [seen] = ours.seen
        assert seen[5:] == ("c1", "text/plain", {}, "r", b"30")
    finally:
        ours.conn.close()
