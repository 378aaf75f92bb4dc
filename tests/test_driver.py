"""The client's driver (``fibrpc.driver``) over a fake link: the hand-off of calls and
replies between threads, deadlines, reconnects and the window, with no broker.

The fake is a ``Link`` that answers F(n) from the table on a later turn, or never (a
stalled broker), and can be told to lose its connection. Nothing here crosses a wire:
what crosses one is tested against real RabbitMQ nodes elsewhere.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from typing import Any

import pytest

from fibrpc import backoff, coalesce, protocol
from fibrpc.calls import AS_INT, Call, Registry
from fibrpc.driver import Driver, LinkEvents, LinkLost
from fibrpc.errors import (
    AccessRefusedError,
    BrokerUnreachableError,
    CallTimeoutError,
    ClientClosedError,
    FibrpcError,
    NoServerError,
)
from fibrpc.numbers import FAST_TABLE

#: RabbitMQ 4.3.6's refusal of a passive declare by a user with no permission on the queue.
_REFUSED_TEXT = (
    "ACCESS_REFUSED - configure access to queue 'fake_queue' in vhost '/' refused for user "
    "'fibrpc-client'"
)


class FakeLink:
    """Answers every request on the turn after it is published, unless ``stalled``."""

    url = described = "amqp://fake"
    queue = "fake_queue"

    def __init__(self) -> None:
        self.events: LinkEvents | None = None
        self.opened = 0
        self.published: list[str] = []
        self.stalled = False
        self.consumers: int | None = 1
        self.refuse_probe = False  # answer the consumer probe with a 403, as RabbitMQ 4.3
        self.asked = 0
        self.lose_next_turn = False
        self.refuse: FibrpcError | None = None  # what open raises, if anything
        self.coalesced = 0  # coalesced messages answered
        self._waiting: list[Call] = []
        self._asked = False
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.turning = 0  # threads inside turn() at once: must never exceed 1
        self.max_turning = 0
        self.controls: list[tuple[str, bytes]] = []  # cancels and describes published

    def open(self, events: LinkEvents) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.events = events
        self.opened += 1

    def publish(self, call: Call) -> None:
        self.published.append(call.corr_id)
        self._waiting.append(call)

    def turn(self, *, wait: bool) -> None:
        with self._lock:
            self.turning += 1
            self.max_turning = max(self.max_turning, self.turning)
        try:
            if self.lose_next_turn:
                self.lose_next_turn = False
                raise LinkLost("the fake lost its connection")
            if wait and (self.stalled or not self._waiting):
                self._wake.wait(0.02)
                self._wake.clear()
            assert self.events is not None
            if self._asked:
                self._asked = False
                if self.refuse_probe:
                    self.events.on_probe_refused(403, _REFUSED_TEXT)
                else:
                    self.events.on_consumers(self.consumers)
            if not self.stalled:
                waiting, self._waiting = self._waiting, []
                for call in waiting:
                    if call.content_type == coalesce.CALLS:  # calls sharing a message
                        self.coalesced += 1
                        answers = [
                            coalesce.Answer(c["id"], str(FAST_TABLE[c["n"]]))
                            for c in json.loads(call.body)
                        ]
                        body = coalesce.encode_answers(answers)
                        self.events.on_reply(call.corr_id, coalesce.CALLS, body)
                        continue
                    assert isinstance(call.n, int)
                    self.events.on_reply(call.corr_id, None, str(FAST_TABLE[call.n]).encode())
        finally:
            with self._lock:
                self.turning -= 1

    def channel_closed(self) -> Any:
        return None

    def reopen(self) -> None:
        pass

    def ask_consumers(self) -> None:
        self._asked = True
        self.asked += 1

    def publish_control(
        self, content_type: str, body: bytes, corr_id: str | None, ttl_ms: int
    ) -> None:
        self.controls.append((content_type, body))

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._waiting = []


def _driver(window: int = 8) -> tuple[Driver, FakeLink]:
    link = FakeLink()
    driver = Driver(link, Registry(window))
    driver.start()
    return driver, link


_ids = iter(range(10**9))


def _call(driver: Driver, n: int, timeout: float = 5.0) -> Any:
    assert driver.registry.reserve(timeout)
    call = Call(f"c{next(_ids)}", n, "fast", AS_INT, timeout, protocol.encode_request(n, "fast"))
    return driver.wait(call, driver.submit(call, hold=True))


def test_many_threads_each_get_their_own_answer_and_one_thread_turns_at_a_time():
    driver, link = _driver(window=4)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = [_call(driver, (k * 7 + i) % 91) for i in range(200)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    driver.close()
    assert not errors, errors
    for k, got in results.items():
        assert got == [FAST_TABLE[(k * 7 + i) % 91] for i in range(200)]
    assert link.max_turning == 1
    assert driver.in_flight == 0


def test_a_stalled_link_fails_each_call_at_its_own_deadline():
    driver, link = _driver()
    link.stalled = True
    times: list[float] = []

    def run(timeout: float) -> None:
        started = time.monotonic()
        with pytest.raises(CallTimeoutError) as timed_out:
            _call(driver, 30, timeout)
        assert timed_out.value.timeout == timeout
        times.append((time.monotonic() - started) - timeout)

    threads = [threading.Thread(target=run, args=(t,)) for t in (0.2, 0.5, 0.8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(times) == 3 and all(0 <= late < 0.5 for late in times), times
    link.stalled = False
    assert _call(driver, 30) == 832040  # every slot came back
    assert driver.in_flight == 0
    driver.close()


def test_calls_in_flight_are_sent_again_after_the_link_is_lost():
    driver, link = _driver()
    link.stalled = True
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(_call(driver, 40)))
    thread.start()
    time.sleep(0.1)
    link.lose_next_turn = True
    time.sleep(0.2)  # the connection is lost, the driver reconnects
    link.stalled = False
    thread.join(10)
    assert results == [FAST_TABLE[40]]
    assert link.opened == 2
    assert link.published.count(link.published[0]) == 2  # published, then re-sent
    driver.close()


def _unserved_driver() -> tuple[Driver, FakeLink]:
    link = FakeLink()
    link.stalled = True
    link.consumers = 0
    driver = Driver(link, Registry(8))
    driver.start()
    return driver, link


def test_no_consumer_fails_the_waiting_calls_with_no_server_error():
    driver, _ = _unserved_driver()
    started = time.monotonic()
    with pytest.raises(NoServerError):
        _call(driver, 30, math.inf)
    assert time.monotonic() - started < 3
    driver.close()


def test_a_queue_deleted_under_held_calls_and_declared_again_fails_none_of_them():
    """A probe that finds the queue gone (deleted; its workers still hold the calls and
    declare it again) fails nothing until the queue has been gone the grace; it was
    failing every call at once."""
    probes = threading.Semaphore(0)

    class Probed(FakeLink):
        def ask_consumers(self) -> None:
            super().ask_consumers()
            probes.release()

    link = Probed()
    driver = Driver(link, Registry(8))
    driver.start()
    link.stalled = True  # held by a worker
    link.consumers = None  # the queue does not exist...
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_call(driver, 30, math.inf)))
    thread.start()
    for _ in range(2):  # the second probe is asked once the first was answered
        assert probes.acquire(timeout=5)
    link.consumers = 1  # ...then is declared and consumed again
    link.stalled = False
    thread.join(5)
    assert outcome == [FAST_TABLE[30]]
    driver.close()


def test_a_queue_that_stays_gone_fails_the_waiting_calls_with_no_server_error():
    driver, link = _driver()
    link.stalled = True
    link.consumers = None
    with pytest.raises(NoServerError, match="does not exist"):
        _call(driver, 30, math.inf)
    driver.close()


def test_a_request_sent_to_an_unserved_queue_expires_before_its_call_says_no_server():
    driver, link = _unserved_driver()
    calls: list[Call] = []
    link_publish = link.publish

    def publish(call: Call) -> None:
        calls.append(call)
        link_publish(call)

    link.publish = publish  # type: ignore[method-assign]
    with pytest.raises(NoServerError):
        _call(driver, 30, 60.0)
    failed_at = time.monotonic()
    driver.close()
    assert len(calls) == 1
    assert calls[0].expires <= calls[0].deadline - 50  # a TTL of about a second, not 60 s
    assert failed_at >= calls[0].expires  # its request was gone from the queue by then


def test_a_call_sent_while_a_server_consumed_waits_its_deadline_then_says_no_server():
    driver, link = _driver()  # a consumer at first
    link.stalled = True
    link.consumers = 0  # then none
    started = time.monotonic()
    with pytest.raises(NoServerError):
        _call(driver, 30, 2.5)  # its request may be queued for 2.5 s: a server may come
    assert 2.5 <= time.monotonic() - started < 4
    driver.close()


def test_a_call_handed_over_while_the_link_is_down_keeps_its_deadline():
    driver, link = _driver()
    link.refuse = BrokerUnreachableError("nothing listens")
    link.lose_next_turn = True
    link.wake()
    time.sleep(0.3)  # lost, and reconnecting
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    assert driver.registry.reserve(1)
    call = Call("down", 30, "fast", AS_INT, 1.0, protocol.encode_request(30, "fast"), future)
    driver.hand_over([call])
    with pytest.raises(BrokerUnreachableError, match="nothing listens"):
        future.result(3)
    driver.close()


def test_a_broker_that_refuses_the_reconnect_fails_every_call_at_once():
    driver, link = _driver()
    link.stalled = True
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    assert driver.registry.reserve(1)
    call = Call("in", 30, "fast", AS_INT, 60.0, protocol.encode_request(30, "fast"), future)
    driver.hand_over([call])
    time.sleep(0.2)
    link.refuse = AccessRefusedError("vhost not found")
    link.lose_next_turn = True
    link.wake()
    with pytest.raises(AccessRefusedError, match="vhost not found"):
        future.result(3)
    driver.close()


def test_close_while_reconnecting_logs_no_traceback(caplog):
    driver, link = _driver()
    link.refuse = BrokerUnreachableError("nothing listens")
    link.lose_next_turn = True
    link.wake()
    time.sleep(0.5)
    with caplog.at_level(logging.DEBUG, logger="fibrpc"):
        started = time.monotonic()
        driver.close()
    assert time.monotonic() - started < 1.5
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_close_wakes_a_thread_waiting_for_a_slot_of_the_window():
    driver, link = _driver(window=2)
    link.stalled = True
    assert driver.registry.reserve(1) and driver.registry.reserve(1)  # held, and late
    held = Call("held", 30, "fast", AS_INT, 60.0, protocol.encode_request(30, "fast"))
    driver.hand_over([held])
    outcome: list[BaseException] = []

    def wait_for_slot() -> None:
        try:
            driver.registry.reserve(30)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_slot)
    thread.start()
    time.sleep(0.2)
    driver.close()
    thread.join(2)
    assert not thread.is_alive()
    assert outcome and isinstance(outcome[0], ClientClosedError)
    late: concurrent.futures.Future[int] = concurrent.futures.Future()
    call = Call("late", 30, "fast", AS_INT, 60.0, protocol.encode_request(30, "fast"), late)
    driver.hand_over([call])  # a call that got its slot before the close, sent after it
    with pytest.raises(ClientClosedError):
        late.result(1)


def test_closing_fails_what_is_in_flight_and_frees_the_window():
    driver, link = _driver(window=2)
    link.stalled = True
    outcomes: list[BaseException] = []

    def run() -> None:
        try:
            _call(driver, 30, 30)
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    driver.close()
    for thread in threads:
        thread.join(5)
    assert time.monotonic() - started < 2
    assert len(outcomes) == 2 and all(isinstance(e, ClientClosedError) for e in outcomes)
    assert driver.registry.free == 2  # every slot given back
    with pytest.raises(ClientClosedError):  # and none taken again: the client is closed
        driver.registry.reserve(0.1)


def test_a_refused_consumer_probe_is_said_once_and_not_asked_again_and_calls_go_on(caplog):
    driver, link = _driver()
    asked = link.asked  # the client's first probe, as it connected: answered
    link.refuse_probe = True
    with caplog.at_level("WARNING", logger="fibrpc.driver"):
        link.stalled = True
        thread = threading.Thread(target=lambda: results.append(_call(driver, 30, 10)))
        results: list[int] = []
        thread.start()
        time.sleep(1.5)  # three probe intervals with a call in flight
        link.stalled = False
        thread.join(10)
        assert [_call(driver, n) for n in range(50)] == list(FAST_TABLE[:50])
    driver.close()
    assert results == [832040]
    assert link.asked == asked + 1  # refused once, never asked again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "'fibrpc-client'" in warnings[0] and "'fake_queue'" in warnings[0]
    assert r"'^(amq\.default|fake_queue)$'" in warnings[0]
    assert driver.probe_refused is not None


# -- reconnecting with the one backoff policy (fibrpc.backoff.Backoff) ---------------------


class DroppingLink(FakeLink):
    """A broker that accepts every connection and drops it on the first turn; the
    pauses the driver takes between opens are recorded instead of slept."""

    def __init__(self, opens: int) -> None:
        super().__init__()
        self.opens = opens
        self.enough = threading.Event()

    def open(self, events: LinkEvents) -> None:
        super().open(events)
        if self.opened >= self.opens:
            self.enough.set()

    def turn(self, *, wait: bool) -> None:
        if not self.enough.is_set():
            raise LinkLost("dropped at once")
        super().turn(wait=wait)


def test_a_broker_that_drops_every_connection_at_once_is_retried_with_growing_pauses():
    link = DroppingLink(opens=8)
    driver = Driver(link, Registry(8))
    driver.retry = backoff.Backoff(cap=driver.retry.cap, draw=lambda: 0.0)
    pauses: list[float] = []
    driver._pause = pauses.append  # type: ignore[method-assign]
    driver.start()
    try:
        assert driver.registry.reserve(5.0)
        call = Call("c-drop", 30, "fast", AS_INT, 30.0, protocol.encode_request(30, "fast"))
        driver.submit(call)
        driver.notify_io()
        assert link.enough.wait(10), f"only {link.opened} opens"
    finally:
        driver.close()
    # Open 1 is the client's start; a pause before each of the 7 reconnects, doubling up
    # to a reconnect every 1-2 s (the client's cap, jittered), however fast the broker
    # drops the connections.
    assert link.opened == 8
    assert pauses == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0], pauses
