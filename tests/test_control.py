"""Cancels and describes without a broker: the pure parts (``fibrpc.control``: the cancel
set and its expiry, the messages, the abandon decision; ``fibrpc.describe``: counts and
the stuck sign), the worker carrying them out through test_worker's fake link, the
supervisor's reading of an abandoned worker's exit, and the client's driver batching
cancels through test_driver's fake link. What crosses a wire: tests/test_cancel.py and
tests/test_describe.py, against real RabbitMQ."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest
from test_driver import FakeLink as FakeClientLink
from test_worker import BOUND, FakeLink, Props, key, make_worker

from fibrpc import control, describe, inflight, protocol
from fibrpc.calls import AS_INT, Call, Registry
from fibrpc.config import Limits
from fibrpc.driver import Driver
from fibrpc.errors import ClientClosedError, ErrorCode, RequestError, UnreadableReplyError
from fibrpc.exitcodes import ExitCode
from fibrpc.handler import Handler
from fibrpc.supervisor import after_death

# -- the cancel set ---------------------------------------------------------------------


def test_a_cancelled_key_is_remembered_until_its_memory_runs_out():
    cancels = control.CancelSet(memory=10.0)
    cancels.add([b"a"], now=100.0)
    assert cancels.cancelled(b"a", now=109.9)
    assert not cancels.cancelled(b"b", now=100.0)
    assert not cancels.cancelled(b"a", now=110.0)
    assert len(cancels) == 0  # forgotten once seen expired


def test_the_cancel_set_forgets_its_oldest_keys_past_its_capacity():
    cancels = control.CancelSet(memory=60.0, capacity=3)
    cancels.add([b"1", b"2", b"3", b"4"], now=0.0)
    assert len(cancels) == 3
    assert not cancels.cancelled(b"1", now=1.0)
    assert all(cancels.cancelled(k, now=1.0) for k in (b"2", b"3", b"4"))


def test_expired_keys_are_dropped_when_new_ones_come():
    cancels = control.CancelSet(memory=5.0)
    cancels.add([b"old"], now=0.0)
    cancels.add([b"new"], now=6.0)
    assert b"old" not in cancels
    assert b"new" in cancels


def test_a_cancel_set_of_no_memory_or_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity 0"):
        control.CancelSet(capacity=0)


# -- the messages -----------------------------------------------------------------------


def test_a_cancel_round_trips():
    assert control.decode_cancel(control.encode_cancel(["a.1", "a.2"])) == ["a.1", "a.2"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"nope", "b'nope'"),
        (b'{"cancel": "a.1"}', "a.1"),
        (b'{"cancel": [1]}', "got 1"),
        (b"[]", "b'[]'"),
    ],
)
def test_a_malformed_cancel_is_refused_naming_what_is_wrong(body, named):
    with pytest.raises(RequestError) as refused:
        control.decode_cancel(body)
    assert refused.value.code == ErrorCode.MALFORMED
    assert named in refused.value.message


def test_a_cancel_of_too_many_calls_is_refused():
    body = control.encode_cancel(str(i) for i in range(control.MAX_CANCEL_IDS + 1))
    with pytest.raises(RequestError, match="10,001"):
        control.decode_cancel(body)


def test_a_forwarded_message_keeps_the_reply_address_and_ids():
    body = control.forward("amq.rabbitmq.reply-to.X", "d.1", ["c.1"])
    assert control.read_forwarded(body) == control.Forwarded(
        "amq.rabbitmq.reply-to.X", "d.1", ("c.1",)
    )
    with pytest.raises(RequestError):
        control.read_forwarded(b'{"reply_to": 3}')


# -- the abandon decision ---------------------------------------------------------------


def test_a_cancelled_computation_is_abandoned():
    assert (
        control.abandon(cancelled=True, expired=False, stopping=False) is control.Abandon.CANCELLED
    )


def test_a_computation_past_its_deadline_is_abandoned():
    assert control.abandon(cancelled=False, expired=True, stopping=False) is control.Abandon.EXPIRED


def test_a_computation_whose_caller_waits_is_not_abandoned():
    assert control.abandon(cancelled=False, expired=False, stopping=False) is None


def test_a_draining_worker_abandons_nothing():
    assert control.abandon(cancelled=True, expired=True, stopping=True) is None


# -- the supervisor's reading of the exit -----------------------------------------------


def test_an_abandoning_worker_is_replaced_at_once_and_never_counts_as_a_boot_failure():
    for ready in (True, False):
        death = after_death(ExitCode.ABANDONED, ready=ready, boot_failures=3)
        assert (death.refused, death.give_up, death.delay) == (False, False, 0.0)
        assert death.boot_failures == 3


def test_a_released_slot_makes_nothing_a_suspect():
    board = inflight.Board(2)
    board.slot(0).begin(inflight.HEAVY, b"k")
    board.release(0)
    assert board.convict(0) == []
    assert not board.is_suspect(b"k")


# -- the worker, through the fake link --------------------------------------------------


class ExitedError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def exit_(code: int) -> NoReturn:
    raise ExitedError(code)


def cancel_props(corr_id: str = "cancel.1") -> Props:
    return Props(correlation_id=corr_id, content_type=control.CANCEL)


def test_a_cancel_is_forwarded_to_every_worker_and_acked_without_a_reply():
    link = FakeLink()
    link.deliver(control.encode_cancel(["c9"]), cancel_props(), tag=4)
    worker = make_worker(link)
    link.stop_when = lambda link: ("forward", control.ROUTE_CANCEL) in link.done
    worker.run()
    assert ("ack", 4) in link.done
    assert link.replies() == []
    # what was forwarded comes back to this worker (the fake's exchange has one queue)
    assert worker.desk.cancelled(Props().reply_to, "c9")


def test_a_cancelled_request_taken_later_is_acked_not_computed_and_counted_abandoned():
    link = FakeLink()
    link.control_refused = "the fake refuses"  # applied by the worker that takes it
    link.deliver(control.encode_cancel(["c1"]), cancel_props(), tag=1)
    link.deliver(b"25", Props(correlation_id="c1", type="naive"), tag=2)
    link.deliver(b"10", Props(correlation_id="c2"), tag=3)
    worker = make_worker(link, exit=exit_)
    worker.run()
    assert ("ack", 2) in link.done
    assert link.replies() == [b"55"]  # c2 only
    assert worker.stats.abandoned == 1
    assert worker.tally.as_dict()["unknown"]["abandoned"] == 1


def test_a_malformed_cancel_is_answered_malformed_and_acked():
    link = FakeLink()
    link.deliver(b'{"cancel": 5}', cancel_props(), tag=6)
    run_worker = make_worker(link)
    run_worker.run()
    [reply] = link.replies()
    assert json.loads(reply)["error"]["code"] == ErrorCode.MALFORMED
    assert ("ack", 6) in link.done


class SlowHandler:
    """A handler whose heavy computation waits until released (or BOUND passes)."""

    def __init__(self) -> None:
        self.real = Handler(Limits())
        self.limits = self.real.limits
        self.fast = self.real.fast
        self.started = threading.Event()
        self.release = threading.Event()

    def decode(self, *args: Any) -> Any:
        return self.real.decode(*args)

    def is_heavy(self, request: Any) -> bool:
        return True

    def compute(self, request: Any) -> Any:
        self.started.set()
        self.release.wait(BOUND)
        return self.real.compute(request)


def abandoning(link: FakeLink, handler: SlowHandler, board: inflight.Board) -> ExitedError:
    worker = make_worker(link, handler=handler, board=board, exit=exit_)  # type: ignore[arg-type]
    link.stop_when = lambda link: False
    with pytest.raises(ExitedError) as exited:
        worker.run()
    handler.release.set()
    return exited.value


def test_a_cancel_of_the_request_being_computed_abandons_it_and_ends_the_worker():
    link = FakeLink()
    link.control_refused = "the fake refuses"
    handler = SlowHandler()
    board = inflight.Board(1)
    props = Props(correlation_id="heavy", type="naive")
    link.deliver(b"30", props, tag=1)
    link.deliver(b"10", Props(correlation_id="light"), tag=2)

    def cancel_once_started(link: FakeLink) -> bool:
        if handler.started.is_set() and not any(p[1].content_type for p in link.pending):
            link.deliver(control.encode_cancel(["heavy"]), cancel_props(), tag=3)
        return False

    link.stop_when = cancel_once_started
    worker = make_worker(link, handler=handler, board=board, exit=exit_)  # type: ignore[arg-type]
    with pytest.raises(ExitedError) as exited:
        worker.run()
    handler.release.set()
    assert exited.value.code == ExitCode.ABANDONED
    assert ("ack", 1) in link.done  # acked, never answered
    # the request queued behind it is neither answered nor acked: RabbitMQ redelivers it
    assert link.replies() == []
    assert ("ack", 2) not in link.done
    assert not board.is_suspect(key(Props(correlation_id="light")))
    assert worker.stats.abandoned == 1
    assert worker.tally.as_dict()["naive"]["abandoned"] == 1
    assert board.convict(0) == []  # nothing is a suspect: the slot was cleared
    assert not board.is_suspect(key(props))


def test_a_computation_past_its_deadline_is_abandoned_by_the_io_loop():
    link = FakeLink()
    handler = SlowHandler()
    link.deliver(b"30", Props(correlation_id="late", type="naive", expiration="200"), tag=5)
    exited = abandoning(link, handler, inflight.Board(1))
    assert exited.code == ExitCode.ABANDONED
    assert ("ack", 5) in link.done
    assert link.replies() == []


def test_a_describe_is_answered_once_with_the_workers_own_counts():
    link = FakeLink()
    link.deliver(b"10", Props(correlation_id="c1"), tag=1)
    link.deliver(b"94", Props(correlation_id="c2", type="iter"), tag=2)
    link.deliver(
        control.encode_describe(), Props(correlation_id="d1", content_type=control.DESCRIBE), tag=3
    )
    link.stop_when = lambda link: len(link.replies()) == 3
    make_worker(link, server_id="s1").run()
    description = describe.parse(link.replies()[2])
    assert description.id == "s1"
    assert description.algorithms["iter"] == 93
    counts = description.counts["fast"]
    assert counts.served == 1
    assert description.counts["unknown"].refused == {"out_of_range": 1}  # refused in decoding
    assert ("ack", 3) in link.done


# -- describe: counts and the stuck sign ------------------------------------------------


def test_tallies_merge_counts_and_compute_times():
    a, b = describe.Tally(), describe.Tally()
    a.answered("fast", None, 0.5)
    b.answered("fast", None, 1.5)
    b.answered("fast", "out_of_range", 0.0)
    b.count("naive", "abandoned")
    merged = describe.merge(a.as_dict(), b.as_dict())
    assert merged["fast"]["served"] == 2
    assert merged["fast"]["compute"] == [2, 2.0, 1.5]
    assert merged["fast"]["refused"] == {"out_of_range": 1}
    assert merged["naive"]["abandoned"] == 1


def server_state(**report: Any) -> dict[str, Any]:
    return {"id": "s", "pid": 1, "queue": "q", "started": 0.0,
            "workers": [{"index": 0, "pid": 7, "ready": True}]}  # fmt: skip


def build(report: dict[str, Any], now: float) -> describe.Description:
    data = describe.build(
        server=server_state(), reports={7: report}, limits=Limits(), broker_max_message=None,
        version="v", host="h", answered_by=7, now=now,
    )  # fmt: skip
    return describe.parse(describe.encode(data))


def test_a_worker_holding_a_request_past_its_expected_end_is_stuck():
    busy = {"alive": 100.0, "busy_since": 90.0, "busy_until": 95.0}
    [worker] = build(busy, now=100.0 + describe.STUCK_SLACK).workers
    assert worker.late and worker.stuck
    assert worker.busy_seconds == pytest.approx(10.0 + describe.STUCK_SLACK)
    [worker] = build(busy, now=96.0).workers
    assert not worker.stuck


def test_a_worker_that_stopped_reporting_is_stuck():
    [worker] = build({"alive": 100.0}, now=100.0 + describe.SILENT_AFTER + 1).workers
    assert worker.silent and worker.stuck
    [worker] = build({"alive": 100.0}, now=101.0).workers
    assert not worker.stuck


def test_a_description_that_does_not_fit_is_unreadable():
    with pytest.raises(UnreadableReplyError, match="KeyError"):
        describe.parse(b'{"server": {}}')


# -- the client's driver: cancels batched -----------------------------------------------


def driver_with_calls(
    count: int, timeout: float = 30.0
) -> tuple[Driver, FakeClientLink, list[Call]]:
    link = FakeClientLink()
    link.stalled = True  # no replies: every call stays in flight
    driver = Driver(link, Registry(count + 1))
    driver.start()
    calls = []
    for i in range(count):
        assert driver.registry.reserve(1.0)
        call = Call(f"x.{i}", 5, "fast", AS_INT, timeout, protocol.encode_request(5, "fast"))
        driver.submit(call)
        calls.append(call)
    return driver, link, calls


def cancelled_ids(link: FakeClientLink) -> list[str]:
    return [
        i for ct, body in link.controls if ct == control.CANCEL for i in control.decode_cancel(body)
    ]


def wait_for(check: Any) -> None:
    deadline = time.monotonic() + BOUND
    while not check():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.01)


def test_a_storm_of_abandoned_calls_is_cancelled_in_a_few_messages():
    driver, link, calls = driver_with_calls(3000)
    wait_for(lambda: len(link.published) == 3000)
    try:
        for call in calls:
            driver.abandon(call, ClientClosedError("gone"))
        wait_for(lambda: len(cancelled_ids(link)) == 3000)
        assert sorted(cancelled_ids(link)) == sorted(c.corr_id for c in calls)
        assert len(link.controls) <= 20  # one per turn, not one per call
    finally:
        driver.close()


def test_a_call_that_times_out_is_cancelled():
    driver, link, [call] = driver_with_calls(1, timeout=0.05)
    try:
        wait_for(lambda: cancelled_ids(link) == [call.corr_id])
        assert not call.ok
    finally:
        driver.close()


def test_closing_with_calls_in_flight_cancels_them():
    driver, link, calls = driver_with_calls(3)
    wait_for(lambda: len(link.published) == 3)
    driver.close()
    assert sorted(cancelled_ids(link)) == sorted(c.corr_id for c in calls)


def test_a_call_never_sent_is_not_cancelled():
    link = FakeClientLink()
    driver = Driver(link, Registry(2))
    call = Call("never", 5, "fast", AS_INT, math.inf, protocol.encode_request(5, "fast"))
    driver.registry.reserve(1.0)
    driver.hand_over([call])  # not started: it stays in the outbox
    driver.abandon(call, ClientClosedError("gone"))
    assert link.controls == []


# -- docs/protocol.md's worked example --------------------------------------------------


def test_the_worked_example_of_a_cancel_in_protocol_md_is_what_the_code_sends_and_reads():
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = text[text.index("### Cancel") : text.index("### Describe")]
    [body] = re.findall(r'body=(\{"cancel".*?\})\s', section)
    assert control.decode_cancel(body.encode()) == ["7", "8"]
    assert control.encode_cancel(["7", "8"]).decode() == body
    assert f'content_type="{control.CANCEL}"' in section
    assert f'expiration="{control.CANCEL_TTL_MS}"' in section
    assert f"at most {control.MAX_CANCEL_IDS:,} a message" in section
    assert f"`{control.exchange_name('rpc_queue')}`" in section
