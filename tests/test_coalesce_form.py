"""Coalesced calls without a broker: the form (docs/protocol.md's worked example, byte
for byte), the worker's decisions on a coalesced message, the handler's answers, and the
client's driver over a fake link that answers as a server would (or as an older one)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from fibrpc import coalesce, protocol
from fibrpc.calls import AS_INT, AS_TEXT, Call, Registry
from fibrpc.coalesce import CALLS, Answer, Outgoing
from fibrpc.config import Limits
from fibrpc.driver import Driver, LinkEvents, LinkLost
from fibrpc.errors import CallTimeoutError, ClientClosedError, NoServerError, RequestError
from fibrpc.handler import Handler, error_reply
from fibrpc.numbers import FAST_TABLE

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# The worked example of docs/protocol.md ("Coalesced calls").
EXAMPLE_REQUEST = (
    b'[{"id":"k.17","n":30},{"id":"k.18","n":90,"algo":"iter"},{"id":"k.19","n":94,"algo":"iter"},'
    b'{"id":"k.20","n":12,"deadline":1733333333333,"ttl":5000}]'
)
EXAMPLE_REPLY = (
    b'[{"id":"k.17","result":"832040"},{"id":"k.18","result":"2880067194370816120"},'
    b'{"id":"k.19","error":{"code":"out_of_range","message":"n = 94 is above the largest n '
    b"for 'iter', which is 93; use algo 'fast' for large n.\"}}]"
)


def _answer(handler: Handler, body: bytes, now_ms: float) -> tuple[bytes, coalesce.Plan]:
    """What a worker answers to a coalesced message at wall time ``now_ms`` (light calls
    in the reply; the rest in the plan)."""
    calls = coalesce.decode_calls(body, handler.limits)
    plan = coalesce.plan(
        calls,
        expired=lambda c: c.deadline_ms is not None and now_ms > c.deadline_ms + (c.ttl_ms or 0),
        is_heavy=handler.is_heavy,
    )
    answers = [Answer(c.id, error=c.error) for c in plan.refused]
    answers += handler.answer_calls(plan.light)
    order = {c.id: c.index for c in calls}
    answers.sort(key=lambda a: order[a.id])
    return coalesce.encode_answers(answers), plan


def test_the_worked_example_of_the_protocol_docs_holds_byte_for_byte():
    sent = coalesce.encode_calls(
        [
            Outgoing("k.17", 30, "fast"),
            Outgoing("k.18", 90, "iter"),
            Outgoing("k.19", 94, "iter"),
            Outgoing("k.20", 12, "fast", 1733333333333, 5000),
        ]
    )
    assert sent == EXAMPLE_REQUEST
    reply, plan = _answer(Handler(), sent, now_ms=1733333333333 + 5001)
    assert reply == EXAMPLE_REPLY
    assert [c.id for c in plan.expired] == ["k.20"]  # skipped: no entry
    text = DOCS.read_text()
    flat = re.sub(r"\s*\n\s*", "", text)  # the docs wrap the bodies over lines
    assert EXAMPLE_REQUEST.decode() in flat
    assert EXAMPLE_REPLY.decode() in flat
    assert [a.id for a in coalesce.decode_answers(reply)] == ["k.17", "k.18", "k.19"]


def test_a_bad_call_is_an_error_entry_of_its_own_and_its_neighbours_are_answered():
    calls = [{"id": f"c{i}", "n": i % 91} for i in range(100)]
    calls[37] = {"id": "c37", "n": -5}
    calls[38] = {"id": "c38", "n": 3.5}
    calls[39] = {"id": "c39", "n": 30, "algo": "quick"}
    calls[40] = {"id": "c40", "n": 30, "deadline": "soon"}
    reply, _ = _answer(Handler(), json.dumps(calls).encode(), now_ms=0)
    answers = {a.id: a for a in coalesce.decode_answers(reply)}
    assert len(answers) == 100
    assert answers["c37"].error is not None and answers["c37"].error.code == "negative"
    assert answers["c38"].error is not None and answers["c38"].error.code == "not_an_integer"
    assert answers["c39"].error is not None and answers["c39"].error.code == "unknown_algorithm"
    assert answers["c40"].error is not None and answers["c40"].error.code == "malformed"
    for i in (*range(37), *range(41, 100)):
        assert answers[f"c{i}"].result == str(FAST_TABLE[i % 91]), i


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[", "malformed"),
        (b'{"n": 3}', "malformed"),
        (b'[{"n": 3}]', "malformed"),  # no id: nobody to answer
        (b'[{"id": "", "n": 3}]', "malformed"),
        (json.dumps([{"id": "x" * 256, "n": 3}]).encode(), "malformed"),
        (json.dumps([{"id": str(i), "n": 1} for i in range(11)]).encode(), "batch_too_large"),
        (b"[" + b" " * 2000 + b"]", "body_too_large"),
    ],
)
def test_only_what_concerns_the_whole_message_refuses_it_whole(body, code):
    limits = Limits(max_batch=10, max_body_bytes=1000)
    with pytest.raises(RequestError) as refused:
        coalesce.decode_calls(body, limits)
    assert refused.value.code == code


def test_heavy_calls_are_split_out_and_light_ones_heavy_together_go_off_the_io_thread():
    handler = Handler(Limits(naive_max_n=40))
    body = json.dumps(
        [
            {"id": "a", "n": 30},
            {"id": "b", "n": 35, "algo": "naive"},  # heavy alone
            {"id": "c", "n": 200_000},  # heavy alone (fast, far past the table)
            {"id": "d", "n": 10, "algo": "naive"},
        ]
    ).encode()
    calls = coalesce.decode_calls(body, handler.limits)
    plan = coalesce.plan(calls, expired=lambda c: False, is_heavy=handler.is_heavy)
    assert [c.id for c in plan.split] == ["b", "c"]
    assert [c.id for c in plan.light] == ["a", "d"] and not plan.heavy_together
    assert coalesce.single_request(plan.split[0]) == b'{"n":35,"algo":"naive"}'
    many = json.dumps([{"id": str(i), "n": 22, "algo": "naive"} for i in range(50)]).encode()
    calls = coalesce.decode_calls(many, handler.limits)
    together = coalesce.plan(calls, expired=lambda c: False, is_heavy=handler.is_heavy)
    assert len(together.light) == 50 and together.heavy_together


def test_a_crash_suspect_is_split_into_every_call_but_the_refused_and_expired():
    handler = Handler()
    body = json.dumps(
        [{"id": "a", "n": 3}, {"id": "b", "n": -1}, {"id": "c", "n": 4, "deadline": 1, "ttl": 1}]
    ).encode()
    calls = coalesce.decode_calls(body, handler.limits)
    plan = coalesce.plan(
        calls,
        expired=lambda c: c.deadline_ms is not None,
        is_heavy=handler.is_heavy,
        crashed=True,
    )
    assert [c.id for c in plan.split] == ["a"]
    assert [c.id for c in plan.refused] == ["b"]
    assert [c.id for c in plan.expired] == ["c"]


def test_which_calls_are_light():
    assert coalesce.is_light(93, "fast") and coalesce.is_light(0, "iter")
    assert coalesce.is_light(22, "naive")
    assert not coalesce.is_light(94, "fast") and not coalesce.is_light(23, "naive")
    assert not coalesce.is_light(-1, "fast") and not coalesce.is_light(True, "fast")
    assert not coalesce.is_light(3, "quick")


# -- the driver, over a fake link ------------------------------------------------------


class ServerLink:
    """A ``Link`` answering on the turn after publishing, as a fibrpc server would
    (``old``: as one before coalesced calls, refusing the form)."""

    url = described = "amqp://fake"
    queue = "fake_queue"

    def __init__(self, *, old: bool = False) -> None:
        self.old = old
        self.stalled = False
        self.lose_next_turn = False
        self.returns = False  # no queue of that name: every request comes back
        self.skip: set[str] = set()  # ids of calls a worker skips as expired
        self.opened = 0
        self.handler = Handler()
        self.events: LinkEvents | None = None
        self.published: list[tuple[str, bytes, str | None]] = []
        self.controls: list[tuple[str, bytes]] = []  # cancels (fibrpc.control)
        self._waiting: list[Call] = []
        self._wake = threading.Event()

    def open(self, events: LinkEvents) -> None:
        self.events = events
        self.opened += 1

    def publish_control(
        self, content_type: str, body: bytes, corr_id: str | None, ttl_ms: int
    ) -> None:
        self.controls.append((content_type, body))

    def publish(self, call: Call) -> None:
        self.published.append((call.corr_id, call.body, call.content_type))
        self._waiting.append(call)

    def turn(self, *, wait: bool) -> None:
        if wait and not self._waiting:
            self._wake.wait(0.02)
            self._wake.clear()
        events = self.events
        assert events is not None
        if self.lose_next_turn:
            self.lose_next_turn = False
            self._waiting = []  # gone with the connection
            raise LinkLost("the fake lost its connection")
        if self.stalled:
            return
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if self.returns:
                events.on_return(call.corr_id)
                continue
            if call.content_type == CALLS:
                if self.old:
                    refusal = self.handler.handle(call.body, call.content_type, None)
                    events.on_reply(call.corr_id, refusal.content_type, refusal.body)
                    continue
                try:
                    kept = [c for c in json.loads(call.body) if c["id"] not in self.skip]
                    body, _ = _answer(self.handler, json.dumps(kept).encode(), now_ms=0)
                except RequestError as exc:
                    reply = error_reply(exc)
                    events.on_reply(call.corr_id, reply.content_type, reply.body)
                else:
                    events.on_reply(call.corr_id, CALLS, body)
                continue
            reply = self.handler.handle(call.body, call.content_type, call.msg_type)
            events.on_reply(call.corr_id, reply.content_type, reply.body)

    def channel_closed(self) -> Any:
        return None

    def reopen(self) -> None:
        pass

    def ask_consumers(self) -> None:
        pass

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._waiting = []


_ids = iter(range(10**9))


def _calls(driver: Driver, ns: list[int], algo: str = "fast", as_: int = AS_INT) -> list[Call]:
    calls = []
    for n in ns:
        assert driver.registry.reserve(5)
        encoded = protocol.encode_request(n, algo)
        calls.append(Call(f"c{next(_ids)}", n, algo, as_, 5.0, encoded))
    return calls


def _started(link: ServerLink, window: int = 4000) -> Driver:
    driver = Driver(link, Registry(window))
    driver.start()
    return driver


def test_calls_handed_over_together_share_a_message_and_each_gets_its_own_result():
    link = ServerLink()
    driver = _started(link)
    try:
        calls = _calls(driver, list(range(91)) * 30)  # 2,730: three messages
        driver.hand_over(calls)
        results = [driver.wait(call) for call in calls]
        assert results == [FAST_TABLE[n] for n in list(range(91)) * 30]
        coalesced = [p for p in link.published if p[2] == CALLS]
        assert len(coalesced) == 3 and len(link.published) == 3
        assert [len(json.loads(body)) for _, body, _ in coalesced] == [1000, 1000, 730]
        assert driver.registry.settled == 2730 and len(driver.registry) == 0
        text = _calls(driver, [30], as_=AS_TEXT)
        driver.hand_over(text + _calls(driver, [1000]))  # 1000 is not light: alone
        assert driver.wait(text[0]) == "832040"
    finally:
        driver.close()
    assert link.published[-1][1:] == (b"1000", None)


def test_a_call_alone_goes_out_exactly_as_before():
    link = ServerLink()
    driver = _started(link)
    try:
        [call] = _calls(driver, [30], algo="iter")
        assert driver.wait(call, driver.submit(call, hold=True)) == 832040
    finally:
        driver.close()
    assert link.published == [(call.corr_id, b"30", None)]
    assert call.msg_type == "iter"


def test_an_older_server_gets_every_call_again_one_message_each_and_no_more_coalescing():
    link = ServerLink(old=True)
    driver = _started(link)
    try:
        calls = _calls(driver, list(range(20)))
        driver.hand_over(calls)
        assert [driver.wait(call) for call in calls] == list(FAST_TABLE[:20])
        assert not driver.coalescing
        assert [p[2] for p in link.published] == [CALLS] + [None] * 20
        more = _calls(driver, [5, 6])
        driver.hand_over(more)
        assert [driver.wait(call) for call in more] == [5, 8]
        assert [p[2] for p in link.published[-2:]] == [None, None]
    finally:
        driver.close()


def test_a_cancelled_call_frees_its_slot_at_once_and_its_neighbours_are_answered():
    link = ServerLink()
    link.stalled = True
    driver = _started(link, window=3)
    calls = _calls(driver, [10, 11, 12])
    driver.hand_over(calls)
    try:
        for _ in range(200):  # bounded: the I/O thread publishes the message
            if link.published:
                break
            threading.Event().wait(0.01)
        assert [p[2] for p in link.published] == [CALLS]
        assert not driver.registry.reserve(0.01)  # the window is full
        driver.abandon(calls[1], ClientClosedError("cancelled"))
        assert driver.registry.reserve(0.01)  # its slot came back at once
        driver.registry.release()
        link.stalled = False
        assert driver.wait(calls[0]) == 55 and driver.wait(calls[2]) == 144
        with pytest.raises(ClientClosedError):
            calls[1].result()
        assert driver.dropped_duplicates + driver.dropped_unknown == 1  # its late answer
        # and the servers were told it was given up on (fibrpc.control), within the
        # driver's gathering of cancels (CANCEL_EVERY)
        for _ in range(200):  # bounded: 2 s
            if any(calls[1].corr_id.encode() in body for _, body in link.controls):
                break
            threading.Event().wait(0.01)
        assert any(calls[1].corr_id.encode() in body for _, body in link.controls)
    finally:
        driver.close()


def test_a_message_refused_whole_fails_each_of_its_calls_with_the_servers_error():
    link = ServerLink()
    link.handler.limits = Limits(max_body_bytes=50)
    driver = _started(link)
    try:
        calls = _calls(driver, [1, 2, 3, 4])
        driver.hand_over(calls)
        for call in calls:
            with pytest.raises(RequestError) as refused:
                driver.wait(call)
            assert refused.value.code == "body_too_large"
        assert len(driver.registry) == 0
    finally:
        driver.close()


# -- the worker, over test_worker's fake link ------------------------------------------


def _coalesced(calls: list[dict[str, Any]]) -> tuple[bytes, Any]:
    from test_worker import Props  # noqa: PLC0415 - its fake link's types

    return json.dumps(calls).encode(), Props(correlation_id="m+", content_type=CALLS)


def test_the_worker_splits_out_a_heavy_call_then_replies_for_the_rest_then_acks():
    from test_worker import FakeLink, make_worker, run  # noqa: PLC0415

    link = FakeLink()
    body, props = _coalesced(
        [{"id": "a", "n": 10}, {"id": "h", "n": 30, "algo": "naive"}, {"id": "b", "n": -1}]
    )
    link.deliver(body, props, tag=5)
    run(make_worker(link))
    assert link.done[0] == ("republish", "h", {})
    assert link.done[2:] == [("ack", 5), ("cancel",)]
    kind, corr_id, reply = link.done[1]
    assert (kind, corr_id) == ("reply", "m+")
    answers = coalesce.decode_answers(reply)
    assert [a.id for a in answers] == ["a", "b"]
    assert answers[0].result == "55"
    assert answers[1].error is not None and answers[1].error.code == "negative"


def test_the_worker_splits_a_redelivered_suspect_into_a_message_per_call_with_its_count():
    from test_worker import FakeLink, key, make_worker, run, suspect_board  # noqa: PLC0415

    link = FakeLink()
    body, props = _coalesced(
        [{"id": "a", "n": 10}, {"id": "b", "n": 11, "deadline": 1, "ttl": 1}, {"id": "c", "n": -1}]
    )
    link.deliver(body, props, tag=9, redelivered=True)
    run(make_worker(link, board=suspect_board(key(props))))
    assert link.done[0] == ("republish", "a", {protocol.DELIVERIES_HEADER: 2})
    kind, corr_id, reply = link.done[1]
    assert (kind, corr_id) == ("reply", "m+")  # the refused call's answer; b was expired
    assert [a.id for a in coalesce.decode_answers(reply)] == ["c"]
    assert link.done[2:] == [("ack", 9), ("cancel",)]  # nothing else: b skipped alone


def test_a_call_split_out_keeps_its_deadline_its_ttl_left_and_the_messages_other_headers():
    [call] = coalesce.decode_calls(b'[{"id":"x.1","n":40,"deadline":5000,"ttl":900}]', Limits())
    headers = {"x-fibrpc-accept": "a", "x-delivery-count": 3, protocol.DEADLINE_HEADER: 9999}
    body, single, copied = coalesce.alone(
        call, reply_to="r", headers=headers, counted=2, elapsed_ms=100
    )
    assert body == b'{"n":40,"algo":"fast"}'
    assert (single.correlation_id, single.reply_to, single.expiration) == ("x.1", "r", "800")
    assert single.content_type == protocol.JSON
    assert copied == {
        "x-fibrpc-accept": "a",
        protocol.DEADLINE_HEADER: 5000,
        protocol.DELIVERIES_HEADER: 2,
    }


def test_after_a_reconnect_each_call_of_a_coalesced_message_is_sent_again_alone():
    link = ServerLink()
    link.stalled = True
    driver = _started(link)
    calls = _calls(driver, [20, 21, 22])
    driver.hand_over(calls)
    try:
        for _ in range(200):  # bounded: the I/O thread publishes the message
            if link.published:
                break
            threading.Event().wait(0.01)
        assert [p[2] for p in link.published] == [CALLS]
        link.lose_next_turn = True
        link.stalled = False
        assert [driver.wait(call) for call in calls] == [6765, 10946, 17711]
        assert link.opened == 2
        assert [(p[0], p[1]) for p in link.published[1:]] == [
            (call.corr_id, str(call.n).encode()) for call in calls
        ]
    finally:
        driver.close()


def test_a_coalesced_message_returned_for_want_of_a_queue_fails_each_call_with_no_server():
    link = ServerLink()
    link.returns = True
    driver = _started(link)
    try:
        calls = _calls(driver, [1, 2, 3])
        driver.hand_over(calls)
        for call in calls:
            with pytest.raises(NoServerError):
                driver.wait(call)
        assert [p[2] for p in link.published] == [CALLS]
        assert len(driver.registry) == 0
    finally:
        driver.close()


def test_a_call_a_worker_skips_as_expired_is_told_at_its_own_deadline():
    link = ServerLink()
    driver = _started(link)
    try:
        calls = _calls(driver, [7, 8, 9])
        short = calls[1]
        short.timeout, short.deadline = 0.3, short.deadline - 4.7  # 0.3 s from its making
        link.skip.add(short.corr_id)
        driver.hand_over(calls)
        assert driver.wait(calls[0]) == 13 and driver.wait(calls[2]) == 34
        with pytest.raises(CallTimeoutError) as timed_out:
            driver.wait(short)
        assert timed_out.value.timeout == 0.3  # its own deadline, not its neighbours'
        assert len(driver.registry) == 0
    finally:
        driver.close()
