"""The worker (``fibrpc.server.Worker``) over a fake link: what it does with each delivery,
in which order it replies and acks, what it republishes, and how it reconnects. No broker.

The fake is a ``WorkerLink`` that hands the worker the deliveries it is given, records
every reply, ack and republished copy in one list (so their order shows), runs the
callbacks of the compute thread on its next turn, and can be told to lose its channel or
connection. Nothing here crosses a wire: what crosses one is tested against real RabbitMQ
elsewhere (test_faults.py, test_end_to_end.py, test_deliveries.py...).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_refusals import ACK_TIMEOUT  # RabbitMQ 4.0.5's words

from fibrpc import backoff, inflight, protocol
from fibrpc.errors import BrokerError, BrokerRefusedError, BrokerUnreachableError
from fibrpc.handler import Handler
from fibrpc.server import Worker
from fibrpc.serverlink import ChannelClosedError, LinkLostError
from fibrpc.workerstate import WorkerSettings

REPLY_TO = "amq.rabbitmq.reply-to.g2dkAA1yYWJiaXRAbG9jYWxob3N0AAAPSQAAAAAAAAAA.abc"
#: Every test ends within this; a worker that does not is a failure, not a hang.
BOUND = 10.0


@dataclasses.dataclass
class Props:
    """The properties of a delivery, as pika's ``BasicProperties`` has them."""

    correlation_id: str | None = "c1"
    reply_to: str | None = REPLY_TO
    headers: dict[str, Any] | None = None
    expiration: str | None = None
    content_type: str | None = None
    type: str | None = None


@dataclasses.dataclass
class Method:
    delivery_tag: int
    redelivered: bool = False
    routing_key: str = "rpc_queue"


class FakeLink:
    """A ``WorkerLink`` with no broker (see the module docstring)."""

    url = "amqp://fake"

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.opened = 0
        self.open_failures: list[Exception] = []  # raised by the next open()s, in order
        self.pending: list[tuple[Method, Props, bytes]] = []
        self.done: list[tuple[Any, ...]] = []  # ("reply", corr_id, body) ("ack", tag)...
        self.fail_after_turn: list[Exception] = []  # raised after the next turns' deliveries
        self.stop_when: Callable[[FakeLink], bool] = lambda link: not link.pending
        self.reconsumed = 0
        self.reconsume_failures = 0  # consume_again()s that find the queue gone again
        self.reconsume_lost: list[Exception] = []  # raised by the next consume_again()s
        self.channel_open = True
        self._on_request: Callable[[Any, Any, Any, bytes], None] | None = None
        self._on_cancel: Callable[[], None] | None = None
        self._on_control: Callable[[str, bytes], None] | None = None
        self.control_refused: str | None = None  # why open_control fails, or None
        self.forwarded: list[tuple[str, bytes]] = []  # heard back on the next turn
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._deadline = time.monotonic() + BOUND

    def deliver(self, body: bytes, props: Props | None = None, **method: Any) -> None:
        tag = len(self.pending) + len(self.done) + 1
        self.pending.append((Method(method.pop("tag", tag), **method), props or Props(), body))

    def open(self, on_request: Callable[..., None], on_cancel: Callable[[], None]) -> None:
        self.opened += 1
        if self.open_failures:
            raise self.open_failures.pop(0)
        self._on_request, self._on_cancel = on_request, on_cancel
        self.channel_open = True
        with self._lock:  # as pika's: a new connection runs none of the last one's callbacks
            self._callbacks.clear()

    def turn(self) -> None:
        assert time.monotonic() < self._deadline, "the worker did not stop in time"
        self._woken.wait(0.01)
        self._woken.clear()
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()
        forwarded, self.forwarded = self.forwarded, []
        for route, body in forwarded:
            assert self._on_control is not None
            self._on_control(route, body)
        deliveries, self.pending = self.pending, []
        assert self._on_request is not None
        for method, props, body in deliveries:
            self._on_request(None, method, props, body)
        if self.fail_after_turn:
            self.channel_open = False
            raise self.fail_after_turn.pop(0)
        if self.worker is not None and self.stop_when(self):
            self.worker.request_stop()

    def is_open(self) -> bool:
        return self.channel_open

    def reply(self, props: Any, body: bytes, content_type: str) -> None:
        self.done.append(("reply", props.correlation_id, body))

    def ack(self, tag: int) -> None:
        self.done.append(("ack", tag))

    def republish(self, routing_key: str, body: bytes, props: Any, headers: Any) -> None:
        self.done.append(("republish", props.correlation_id, dict(headers)))

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
        self._woken.set()

    def consume_again(self) -> bool:
        self.reconsumed += 1
        if self.reconsume_lost:
            self.channel_open = False
            raise self.reconsume_lost.pop(0)
        if self.reconsume_failures:  # the queue went again before the consume: a new channel
            self.reconsume_failures -= 1
            self.done.append(("new channel",))
            return False
        return True

    def cancel(self, timeout: float) -> None:
        self.done.append(("cancel",))

    def close(self) -> None:
        pass

    def open_control(
        self, server: str | None, on_control: Callable[[str, bytes], None]
    ) -> str | None:
        """The control path: what is forwarded comes back on the next turn (to this
        worker alone: the fake has no other), unless ``control_refused``."""
        self._on_control = on_control
        return self.control_refused

    def forward(self, route: str, body: bytes) -> bool:
        self.done.append(("forward", route))
        self.forwarded.append((route, body))
        return True

    def cancel_consumer(self) -> None:
        """The broker cancels the consumer (its queue was deleted)."""
        assert self._on_cancel is not None
        self._on_cancel()

    def replies(self) -> list[bytes]:
        return [item[2] for item in self.done if item[0] == "reply"]


class NoWait(backoff.Backoff):
    """Backoff that records each pause it is asked for and makes none."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float] = []

    def failed(self) -> float:
        self.asked.append(super().failed())
        return 0.0


def make_worker(
    link: FakeLink,
    *,
    board: inflight.Board | None = None,
    handler: Handler | None = None,
    retry: backoff.Backoff | None = None,
    exit: Any = None,
    **settings: Any,
) -> Worker:
    more = {} if exit is None else {"exit": exit}
    worker = Worker(
        WorkerSettings(**settings),
        handler,
        board=board,
        link=link,  # type: ignore[arg-type]
        retry=retry or NoWait(),
        **more,
    )
    link.worker = worker
    return worker


def run(worker: Worker) -> None:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(BOUND + 1)
    assert not thread.is_alive(), "the worker did not stop"


def suspect_board(*keys: bytes) -> inflight.Board:
    """A board on which a dead worker (slot 1) was computing each of ``keys``."""
    board = inflight.Board(2)
    for key in keys:
        board.slot(1).begin(inflight.INLINE, key)
        board.convict(1)
    return board


def key(props: Props) -> bytes:
    return inflight.key(props.reply_to, props.correlation_id)


# -- one delivery ---------------------------------------------------------------------


def test_a_light_request_is_replied_to_then_acked():
    link = FakeLink()
    link.deliver(b"10", tag=7)
    run(make_worker(link))
    assert link.done[:2] == [("reply", "c1", b"55"), ("ack", 7)]


def test_a_heavy_request_is_computed_on_the_compute_thread_and_answered_on_the_io_thread():
    link = FakeLink()
    handler = Handler()
    threads: list[str] = []
    compute = handler.compute

    def recording(request: Any) -> Any:
        threads.append(threading.current_thread().name)
        return compute(request)

    handler.compute = recording  # type: ignore[method-assign]
    link.deliver(b"25", Props(type="naive"), tag=3)
    link.stop_when = lambda link: bool(link.replies())
    run(make_worker(link, handler=handler))
    assert threads and threads[0].startswith("fibrpc-compute")
    assert link.done[:2] == [("reply", "c1", b"75025"), ("ack", 3)]


def test_a_request_whose_deadline_passed_is_acked_and_never_computed():
    link = FakeLink()
    past = int(time.time() * 1000) - 60_000
    link.deliver(b"10", Props(headers={protocol.DEADLINE_HEADER: past}, expiration="1000"), tag=2)
    worker = make_worker(link)
    run(worker)
    assert link.done[:1] == [("ack", 2)]
    assert not link.replies()
    assert worker.stats.expired == 1


def test_a_message_with_no_usable_reply_to_is_acked_and_dropped():
    link = FakeLink()
    link.deliver(b"10", Props(reply_to="amq.rabbitmq.reply-to"), tag=4)
    worker = make_worker(link)
    run(worker)
    assert link.done[:1] == [("ack", 4)]
    assert worker.stats.dropped == 1


def test_a_refused_request_gets_an_error_reply_then_its_ack():
    link = FakeLink()
    link.deliver(b"-1", tag=5)
    run(make_worker(link))
    [(what, corr_id, body), ack] = link.done[:2]
    assert (what, corr_id, ack) == ("reply", "c1", ("ack", 5))
    assert b'"negative"' in body


def test_a_redelivered_request_that_was_only_prefetched_is_computed_without_charge():
    link = FakeLink()
    link.deliver(b"10", tag=6, redelivered=True)
    worker = make_worker(link, board=inflight.Board(2))
    run(worker)
    assert link.done[:2] == [("reply", "c1", b"55"), ("ack", 6)]
    assert worker.stats.redelivered == 1


def test_a_redelivered_suspect_is_republished_with_its_count_and_the_original_acked():
    link = FakeLink()
    props = Props(headers={protocol.DELIVERIES_HEADER: 1, "x-delivery-count": 4})
    link.deliver(b"10", props, tag=8, redelivered=True)
    run(make_worker(link, board=suspect_board(key(props))))
    assert link.done[:2] == [("republish", "c1", {protocol.DELIVERIES_HEADER: 2}), ("ack", 8)]


def test_a_charged_suspect_only_prefetched_by_the_next_worker_that_died_is_not_charged_again():
    link = FakeLink()
    props = Props()
    board = suspect_board(key(props))
    link.deliver(b"10", props, tag=1, redelivered=True)  # computing when a worker died
    copy = Props(headers={protocol.DELIVERIES_HEADER: 2})
    link.deliver(b"10", copy, tag=2, redelivered=True)  # its copy, then only prefetched
    run(make_worker(link, board=board))
    assert link.done[:4] == [
        ("republish", "c1", {protocol.DELIVERIES_HEADER: 2}),
        ("ack", 1),
        ("reply", "c1", b"55"),
        ("ack", 2),
    ]
    assert not board.is_suspect(key(props), worker=0)


def test_a_redelivered_suspect_past_the_limit_is_acked_then_refused_as_poison():
    link = FakeLink()
    props = Props(headers={protocol.DELIVERIES_HEADER: 3})
    link.deliver(b"10", props, tag=9, redelivered=True)
    worker = make_worker(link, board=suspect_board(key(props)), max_deliveries=3)
    run(worker)
    [ack, (what, corr_id, body)] = link.done[:2]
    assert ack == ("ack", 9) and (what, corr_id) == ("reply", "c1")
    assert b'"poison"' in body and b"delivered 4 times" in body
    assert worker.stats.poison == 1


def test_a_refusal_redelivered_as_a_suspect_is_answered_and_not_charged():
    link = FakeLink()
    props = Props(headers={protocol.DELIVERIES_HEADER: 3})
    link.deliver(b"-1", props, tag=10, redelivered=True)
    run(make_worker(link, board=suspect_board(key(props)), max_deliveries=3))
    assert link.done[0][0] == "reply" and b'"negative"' in link.done[0][2]
    assert link.done[1] == ("ack", 10)


def test_a_bug_in_one_request_costs_that_message_only(caplog):
    link = FakeLink()
    handler = Handler()
    compute = handler.compute

    def buggy(request: Any) -> Any:
        if request.ns == [13]:
            raise RuntimeError("a bug")
        return compute(request)

    handler.compute = buggy  # type: ignore[method-assign]
    link.deliver(b"13", Props(correlation_id="bad"), tag=1)
    link.deliver(b"10", Props(correlation_id="good"), tag=2)
    with caplog.at_level(logging.ERROR, "fibrpc.server"):
        run(make_worker(link, handler=handler))
    assert link.done[:3] == [("ack", 1), ("reply", "good", b"55"), ("ack", 2)]
    assert "failed on a request (correlation_id='bad'); dropped" in caplog.text


# -- the link's failures --------------------------------------------------------------


def test_a_request_replied_to_when_the_channel_closed_is_charged_when_it_comes_back():
    link = FakeLink()
    props = Props(correlation_id="r1")
    link.deliver(b"10", props, tag=1)
    link.fail_after_turn = [ChannelClosedError(541, "INTERNAL_ERROR")]
    worker = make_worker(link, board=inflight.Board(1))
    original = link.turn

    def turn() -> None:
        original()
        if link.opened == 2 and not link.done[2:]:  # reconnected: the request comes back
            link.deliver(b"10", props, tag=1, redelivered=True)

    link.turn = turn  # type: ignore[method-assign]
    link.stop_when = lambda link: len(link.done) >= 4
    run(worker)
    assert link.done[:4] == [
        ("reply", "r1", b"55"),
        ("ack", 1),
        ("republish", "r1", {protocol.DELIVERIES_HEADER: 2}),
        ("ack", 1),
    ]


class RefusingLink(FakeLink):
    """A broker that closes the channel on every reply (as RabbitMQ 3.10 does for a reply
    to a direct reply-to address on another node of its cluster): the ack that follows
    is lost and the request redelivered; republished copies are queued as new messages."""

    def __init__(self, body: bytes, props: Props, *others: Props) -> None:
        super().__init__()
        self.queue: list[tuple[Method, Props, bytes]] = [(Method(1), props, body)]
        self.queue += [(Method(2 + i), other, body) for i, other in enumerate(others)]
        self.refused = props.reply_to  # the broker chokes on replies to this address only
        self.closes = 0
        self._replied_now = False
        self._acked_now: list[tuple[Method, Props, bytes]] = []
        self._held: dict[int, tuple[Method, Props, bytes]] = {}

    def turn(self) -> None:
        assert time.monotonic() < self._deadline, "the worker did not stop in time"
        self._replied_now, self._acked_now = False, []
        deliveries, self.queue = self.queue, []  # all it has, in one turn, in order
        for method, props, body in deliveries:
            self._held[method.delivery_tag] = (method, props, body)
            assert self._on_request is not None
            self._on_request(None, method, props, body)
        if self._replied_now:  # the broker closes the channel: the acks are lost
            self.closes += 1
            for method, props, body in self._acked_now:
                self.queue.append((dataclasses.replace(method, redelivered=True), props, body))
            self.channel_open = False
            raise ChannelClosedError(541, "INTERNAL_ERROR - case_clause")
        if not self.queue and self.worker is not None:
            self.worker.request_stop()

    def reply(self, props: Any, body: bytes, content_type: str) -> None:
        super().reply(props, body, content_type)
        self._replied_now = self._replied_now or props.reply_to == self.refused

    def ack(self, tag: int) -> None:
        super().ack(tag)
        self._acked_now.append(self._held.pop(tag))
        if not self._replied_now:
            self._acked_now.clear()  # acked before the reply that breaks the channel

    def republish(self, routing_key: str, body: bytes, props: Any, headers: Any) -> None:
        super().republish(routing_key, body, props, headers)
        tag = 100 + len(self.done)
        self.queue.append((Method(tag), dataclasses.replace(props, headers=dict(headers)), body))


def test_a_request_whose_replies_the_broker_keeps_refusing_is_dropped_with_one_error(caplog):
    link = RefusingLink(b"10", Props(correlation_id="r1"))
    with caplog.at_level(logging.WARNING, "fibrpc.server"):
        worker = make_worker(link, board=inflight.Board(1), max_deliveries=3)
        run(worker)
    # Replied 3 times (the request, then two copies carrying 2 and 3), each reply closing
    # the channel; the fourth delivery is past the limit: dropped, with no reply.
    assert link.closes == 3
    assert len(link.replies()) == 3
    assert [item[2] for item in link.done if item[0] == "republish"] == [
        {protocol.DELIVERIES_HEADER: 2},
        {protocol.DELIVERIES_HEADER: 3},
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, caplog.text
    assert REPLY_TO in errors[0] and "INTERNAL_ERROR - case_clause" in errors[0]
    assert worker.stats.dropped == 1
    assert link.done[-2][0] == "ack" and link.done[-1] == ("cancel",)  # no reply after it


def test_the_requests_replied_after_the_one_the_broker_refused_are_not_charged(caplog):
    bad = Props(correlation_id="bad", reply_to=REPLY_TO.replace("abc", "xyz"))
    good = [Props(correlation_id=f"good{i}") for i in range(3)]
    link = RefusingLink(b"10", bad, *good)
    with caplog.at_level(logging.ERROR, "fibrpc.server"):
        worker = make_worker(link, board=inflight.Board(1), max_deliveries=3)
        run(worker)
    republished = [item[1] for item in link.done if item[0] == "republish"]
    assert republished == ["bad", "bad"]  # only the culprit is charged
    assert worker.stats.dropped == 1 and "'bad'" in caplog.text
    assert all(("reply", g.correlation_id, b"55") in link.done for g in good)


class LostDuringAckLink(RefusingLink):
    """As ``RefusingLink``, but the broker's close of the connection comes while the ack
    after the refused reply is being written, and the ack raises (pika's stock path:
    ``basic_ack`` writes and waits, and sees the ``Connection.Close``)."""

    def ack(self, tag: int) -> None:
        super().ack(tag)
        if self._replied_now:
            self.closes += 1
            self.queue += [
                (dataclasses.replace(method, redelivered=True), props, body)
                for method, props, body in self._acked_now
            ]
            self._replied_now, self._acked_now = False, []
            self.channel_open = False
            raise LinkLostError("ConnectionClosedByBroker: (541, 'INTERNAL_ERROR')")


def test_a_request_whose_refused_reply_breaks_the_link_during_its_ack_is_still_charged(caplog):
    # CI, run 3 (pika's stock paths): the close came during the ack, which raised before
    # the reply was remembered; the request came back uncharged and was replied a 4th time.
    link = LostDuringAckLink(b"10", Props(correlation_id="r1"))
    with caplog.at_level(logging.WARNING, "fibrpc.server"):
        worker = make_worker(link, board=inflight.Board(1), max_deliveries=3)
        run(worker)
    assert link.closes == 3, caplog.text
    assert len(link.replies()) == 3
    assert worker.stats.dropped == 1


def test_every_reconnect_waits_a_growing_pause():
    link = FakeLink()
    link.deliver(b"10")
    link.open_failures = [BrokerUnreachableError("down")] * 3
    link.fail_after_turn = [LinkLostError("gone"), ChannelClosedError(320, "CONNECTION_FORCED")]
    retry = NoWait()
    worker = make_worker(link, retry=retry)
    run(worker)
    assert link.opened == 3 + 3  # three refused, then two lost, then the last
    assert len(retry.asked) == 5  # one pause before every reconnect, none before the first
    assert retry.asked[-1] > retry.asked[0]
    assert worker.stats.reconnects == 2


def test_an_outage_is_logged_once_and_its_end_once(caplog):
    link = FakeLink()
    link.deliver(b"10")
    link.open_failures = [BrokerUnreachableError("RabbitMQ at amqp://fake is down.")] * 5
    with caplog.at_level(logging.INFO, "fibrpc.server"):
        run(make_worker(link))
    assert caplog.text.count("is down") == 1
    assert caplog.text.count("answers again") == 1


def test_a_lost_connection_to_a_single_node_does_not_mention_a_next_node(caplog):
    link = FakeLink()
    link.deliver(b"10")
    link.fail_after_turn = [LinkLostError("StreamLostError: gone")]
    with caplog.at_level(logging.WARNING, "fibrpc.server"):
        run(make_worker(link))
    assert "lost the connection" in caplog.text
    assert "next node" not in caplog.text


def test_a_cancelled_consumer_consumes_again_on_the_same_link():
    link = FakeLink()
    link.deliver(b"10")
    original = link.turn

    def turn() -> None:
        if link.opened == 1 and not link.reconsumed and not link.done:
            link.cancel_consumer()
        original()

    link.turn = turn  # type: ignore[method-assign]
    run(make_worker(link))
    assert link.reconsumed == 1 and link.opened == 1
    assert link.replies() == [b"55"]


@pytest.mark.parametrize("gone_again", [0, 1])
def test_a_request_held_when_its_queue_is_deleted_is_answered_and_never_acked(gone_again):
    """RabbitMQ cancels the consumer of a deleted queue: what it delivered is answered
    but not acked (RabbitMQ 4 closes the channel, 406 unknown delivery tag, at an ack of
    a deleted quorum queue's delivery), and what the new consumer delivers is acked.
    ``gone_again``: a quorum queue still being deleted answers the declare and is gone by
    the consume; the link opens a fresh channel and the worker consumes again after a
    pause."""
    link = FakeLink()
    handler = Handler()
    release = threading.Event()
    compute = handler.compute

    def held(request: Any) -> Any:
        assert release.wait(BOUND)
        return compute(request)

    handler.compute = held  # type: ignore[method-assign]
    link.deliver(b"25", Props(type="naive"), tag=3)
    link.reconsume_failures = gone_again
    original = link.turn

    def turn() -> None:
        if not link.reconsumed and not link.pending:
            link.cancel_consumer()  # the request is held on the compute thread by now
        if link.reconsumed:
            release.set()
        if link.reconsumed == 1 + gone_again and len(link.replies()) == 1 and not link.pending:
            link.deliver(b"10", Props(correlation_id="c2"), tag=1)  # to the new consumer
        original()

    link.turn = turn  # type: ignore[method-assign]
    link.stop_when = lambda link: len(link.replies()) == 2
    run(make_worker(link, handler=handler))
    assert link.opened == 1 and link.reconsumed == 1 + gone_again
    assert link.done == [("new channel",)] * gone_again + [
        ("reply", "c1", b"75025"),
        ("reply", "c2", b"55"),
        ("ack", 1),
        ("cancel",),
    ]


def test_a_request_held_when_its_queue_is_deleted_is_answered_after_a_reconnect():
    """RabbitMQ 4.3 closes the whole connection (541 INTERNAL_ERROR, "failed consuming
    from quorum queue ...: noproc") at a consume racing the deletion of a quorum queue.
    What the cancelled consumer held never comes back: computed while the worker
    reconnects (the lost connection drops its callbacks), it is answered on the next
    connection, unacked. Before: dropped as if the broker had requeued it (CI, 14 of 40
    calls timed out)."""
    link = FakeLink()
    handler = Handler()
    release, computed = threading.Event(), threading.Event()
    compute = handler.compute

    def held(request: Any) -> Any:
        assert release.wait(BOUND)
        try:
            return compute(request)
        finally:
            computed.set()

    handler.compute = held  # type: ignore[method-assign]
    link.deliver(b"25", Props(type="naive"), tag=3)
    link.reconsume_lost = [LinkLostError("ConnectionClosedByBroker: (541) INTERNAL_ERROR")]
    original_turn, original_open = link.turn, link.open

    def turn() -> None:
        if not link.reconsumed and not link.pending:
            link.cancel_consumer()  # the request is held on the compute thread by now
        if link.opened == 2 and len(link.replies()) == 1 and not link.pending:
            link.deliver(b"10", Props(correlation_id="c2"), tag=1)  # to the new consumer
        original_turn()

    def reopen(*args: Any) -> None:
        if link.opened:  # reconnecting: the result comes meanwhile
            release.set()
            assert computed.wait(BOUND)
            time.sleep(0.05)  # its hand-back reached the old connection
        original_open(*args)

    link.turn = turn  # type: ignore[method-assign]
    link.open = reopen  # type: ignore[method-assign]
    link.stop_when = lambda link: len(link.replies()) == 2
    run(make_worker(link, handler=handler))
    assert link.opened == 2 and link.reconsumed == 1
    assert link.done == [
        ("reply", "c1", b"75025"),
        ("reply", "c2", b"55"),
        ("ack", 1),
        ("cancel",),
    ]


def held_handler() -> tuple[Handler, list[Any], threading.Event]:
    """A handler whose computations each wait for the event, and the requests it began."""
    handler = Handler()
    release = threading.Event()
    computed: list[Any] = []
    compute = handler.compute

    def held(request: Any) -> Any:
        computed.append(request)
        assert release.wait(BOUND)
        return compute(request)

    handler.compute = held  # type: ignore[method-assign]
    return handler, computed, release


def test_a_request_redelivered_while_still_computed_here_joins_that_computation():
    """RabbitMQ closes the channel of a delivery unacked past its consumer_timeout (406;
    measured on 4.0.5: once a minute) while the worker still computes it, and delivers
    it again. Before, the worker queued a second computation behind the first, dropped
    the first's result (its channel was gone), and the second's at the next close: a
    computation longer than the timeout was never answered. Now the redelivery joins the
    computation in progress, which answers it and acks the new delivery."""
    link = FakeLink()
    handler, computed, release = held_handler()
    props = Props(correlation_id="long", type="naive")
    link.deliver(b"25", props, tag=1)
    original_turn = link.turn
    redelivered = []

    def turn() -> None:
        if link.opened == 1 and computed and not link.fail_after_turn:
            # Held past the consumer timeout: the broker closes the channel.
            link.fail_after_turn = [ChannelClosedError(406, ACK_TIMEOUT)]
        elif link.opened == 2 and not redelivered:
            link.deliver(b"25", props, tag=1, redelivered=True)
            redelivered.append(True)
        original_turn()
        if redelivered and not link.pending:
            release.set()  # the first computation ends after the redelivery came

    link.turn = turn  # type: ignore[method-assign]
    link.stop_when = lambda link: bool(link.replies())
    run(make_worker(link, handler=handler, board=inflight.Board(1)))
    assert len(computed) == 1  # not computed again
    assert link.done == [("reply", "long", b"75025"), ("ack", 1), ("cancel",)]


def test_a_request_redelivered_after_its_consumer_was_cancelled_joins_its_computation():
    """RabbitMQ 4.3 cancels the consumer of a quorum queue's delivery held past its
    consumer timeout, and delivers it again to the next consumer: the worker consumes
    again, and the redelivery joins the computation in progress, which answers it once
    and acks it (not as an orphan, replied unacked, with its twin computed again)."""
    link = FakeLink()
    handler, computed, release = held_handler()
    props = Props(correlation_id="long", type="naive")
    link.deliver(b"25", props, tag=1)
    original_turn = link.turn

    def turn() -> None:
        again = bool(link.reconsumed) and not link.done and not release.is_set()
        if computed and not link.reconsumed:
            link.cancel_consumer()  # held past the timeout: the queue cancels the consumer
        elif again:
            link.deliver(b"25", props, tag=2, redelivered=True)
        original_turn()
        if again:
            release.set()  # the computation ends after the redelivery came

    link.turn = turn  # type: ignore[method-assign]
    link.stop_when = lambda link: bool(link.replies())
    worker = make_worker(link, handler=handler, board=inflight.Board(1))
    run(worker)
    assert len(computed) == 1
    assert link.done == [("reply", "long", b"75025"), ("ack", 2), ("cancel",)]
    assert worker._in_flight == 0 and not worker._orphans


def test_a_broker_that_does_not_confirm_the_consume_is_an_outage_not_a_crash():
    link = FakeLink()
    link.deliver(b"10")
    # What a quorum queue without a majority gives: no consume-ok within the round trip.
    link.open_failures = [BrokerError("RabbitMQ at amqp://fake failed: no consume-ok")] * 4
    worker = make_worker(link)
    run(worker)
    assert link.opened == 5
    assert link.replies() == [b"55"]


def test_a_refused_queue_ends_the_worker_at_once():
    link = FakeLink()
    link.open_failures = [BrokerRefusedError("inequivalent arg 'x-queue-type'", reply_code=406)]
    with pytest.raises(BrokerRefusedError):
        make_worker(link).run()
    assert link.opened == 1


@pytest.mark.parametrize("code", [403, 530])
def test_access_refused_on_open_ends_the_worker(code):
    from fibrpc.errors import AccessRefusedError  # noqa: PLC0415

    link = FakeLink()
    link.open_failures = [AccessRefusedError(f"refused ({code})")]
    worker = make_worker(link)
    with pytest.raises(AccessRefusedError):
        worker.run()
    assert link.opened == 1
