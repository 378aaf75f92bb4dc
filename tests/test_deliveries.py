"""The worker's delivery policy (``fibrpc.deliveries``) and the board of requests in flight
(``fibrpc.inflight``): pure, no broker."""

from __future__ import annotations

import os

import pytest

from fibrpc import backoff, deliveries, inflight
from fibrpc.deliveries import Action, Decision, Fate
from fibrpc.protocol import DEADLINE_HEADER, DELIVERIES_HEADER

# -- expiry ----------------------------------------------------------------------------


def _expired(*, skew_ms=0.0, held=0.0, deadline_in_ms=None, budget_ms=None):
    """A request whose client set ``deadline_in_ms`` from its own clock, judged by a
    worker whose wall clock is ``skew_ms`` ahead, ``held`` seconds after it arrived."""
    client_now = 1_700_000_000_000.0
    deadline = None if deadline_in_ms is None else int(client_now + deadline_in_ms)
    return deliveries.expired(
        now_wall_ms=client_now + skew_ms + held * 1000,
        now=100.0 + held,
        received=100.0,
        deadline_ms=deadline,
        budget_ms=budget_ms,
    )


def test_a_fresh_request_is_not_expired():
    assert not _expired(deadline_in_ms=1000, budget_ms=1000)
    assert not _expired()


def test_a_request_held_past_its_whole_budget_is_expired_whatever_the_clocks_say():
    assert _expired(held=1.2, deadline_in_ms=1000, budget_ms=1000, skew_ms=-60_000)


def test_a_clock_ahead_by_less_than_the_timeout_never_skips_a_call():
    assert not _expired(skew_ms=1500, deadline_in_ms=1000, budget_ms=1000, held=0.1)
    assert not _expired(skew_ms=9_000, deadline_in_ms=10_000, budget_ms=10_000)


def test_a_deadline_passed_by_more_than_the_allowance_is_expired():
    # Delivered late (the TTL counts time in the queue; the worker's clock does not).
    assert _expired(skew_ms=2_500, deadline_in_ms=1000, budget_ms=1000)


def test_without_a_budget_the_deadline_is_taken_as_it_is():
    assert _expired(skew_ms=1_001, deadline_in_ms=1000)
    assert not _expired(skew_ms=999, deadline_in_ms=1000)


# -- poison ----------------------------------------------------------------------------


@pytest.mark.parametrize(("redelivered", "suspect"), [(False, False), (True, False), (False, True)])
def test_only_a_redelivered_suspect_is_charged(redelivered, suspect):
    verdict = deliveries.judge(
        redelivered=redelivered, suspect=suspect, counted=5, max_deliveries=3
    )
    assert verdict.action is Action.COMPUTE


def test_a_suspect_is_republished_with_its_count_until_the_limit_then_refused():
    counted = None
    actions = []
    for _ in range(3):
        verdict = deliveries.judge(
            redelivered=True, suspect=True, counted=counted, max_deliveries=3
        )
        actions.append((verdict.action, verdict.deliveries))
        counted = verdict.deliveries
    assert actions == [
        (Action.REPUBLISH, 2),
        (Action.REPUBLISH, 3),
        (Action.REFUSE_POISON, 4),
    ]


def test_max_deliveries_one_refuses_the_first_suspect_redelivery():
    verdict = deliveries.judge(redelivered=True, suspect=True, counted=None, max_deliveries=1)
    assert verdict == deliveries.Verdict(Action.REFUSE_POISON, 2)


# -- the board --------------------------------------------------------------------------


def test_a_dead_worker_s_requests_become_suspects_and_its_slots_are_cleared():
    board = inflight.Board(2)
    heavy = inflight.key("amq.rabbitmq.reply-to.abc", "c1")
    light = inflight.key("amq.rabbitmq.reply-to.abc", "c2")
    slot = board.slot(0)
    slot.begin(inflight.HEAVY, heavy)
    slot.begin(inflight.INLINE, light)
    slot.end(inflight.INLINE)
    assert board.convict(0) == [heavy]
    assert board.is_suspect(heavy, worker=1)
    assert not board.is_suspect(light, worker=1)
    assert board.convict(0) == []  # cleared


def test_a_request_in_another_worker_s_slot_is_suspect_before_it_is_reaped():
    board = inflight.Board(2)
    request = inflight.key("r", "c")
    board.slot(0).begin(inflight.HEAVY, request)
    assert board.is_suspect(request, worker=1)
    assert not board.is_suspect(request, worker=0)  # its own slot: computing it now


def test_the_board_is_shared_with_a_forked_child():
    board = inflight.Board(1)
    request = inflight.key("r", "c")
    pid = os.fork()
    if pid == 0:  # the child writes, as a worker does
        board.slot(0).begin(inflight.HEAVY, request)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.convict(0) == [request]


def test_an_acquitted_request_is_a_suspect_no_more_until_convicted_again():
    board = inflight.Board(2)
    request = inflight.key("amq.rabbitmq.reply-to.x", "c1")
    board.slot(1).begin(inflight.INLINE, request)
    board.convict(1)
    board.acquit(request)
    assert not board.is_suspect(request, worker=0)
    board.slot(1).begin(inflight.HEAVY, request)
    board.convict(1)
    assert board.is_suspect(request, worker=0)


def test_the_ring_keeps_the_most_recent_suspects():
    board = inflight.Board(1)
    keys = [inflight.key("r", f"c{i}") for i in range(inflight.SUSPECTS + 5)]
    for request in keys:
        board.slot(0).begin(inflight.HEAVY, request)
        board.convict(0)
    assert all(board.is_suspect(request) for request in keys[5:])
    assert not any(board.is_suspect(request) for request in keys[:5])


def test_keys_are_bounded_and_tell_reply_addresses_apart():
    assert inflight.key("a", "1") != inflight.key("b", "1")
    assert inflight.key(None, None) == b"\0"
    assert len(inflight.key("x" * 300, "y" * 300)) == inflight.KEY_BYTES


# -- a delivery's fate: one test per rule ------------------------------------------------

NOW_MS = 1_700_000_000_000


def screen(**overrides):
    arguments = {"reply_to_ok": True, "headers": None, "budget_ms": None, "now_wall_ms": NOW_MS}
    return deliveries.screen(**{**arguments, **overrides})


def decide(**overrides):
    arguments = {
        "refused": False,
        "heavy": False,
        "redelivered": False,
        "suspect": False,
        "unacked_reply": None,
        "counted": None,
        "max_deliveries": 3,
    }
    return deliveries.decide(**{**arguments, **overrides})


def test_a_message_with_no_usable_reply_to_is_dropped_before_decoding():
    assert screen(reply_to_ok=False).fate is Fate.DROP


def test_a_request_past_its_deadline_and_its_allowance_is_skipped_before_decoding():
    headers = {DEADLINE_HEADER: NOW_MS - 5_001}
    assert screen(headers=headers, budget_ms=5_000).fate is Fate.EXPIRED


def test_a_request_within_its_allowance_is_decoded():
    assert screen(headers={DEADLINE_HEADER: NOW_MS - 4_999}, budget_ms=5_000) is None


def test_a_deadline_that_is_not_an_integer_is_ignored():
    assert screen(headers={DEADLINE_HEADER: "soon"}) is None
    assert screen(headers={DEADLINE_HEADER: True}) is None


def test_a_light_request_is_computed_inline_and_a_heavy_one_on_the_compute_thread():
    assert decide() is deliveries.LIGHT
    assert decide(heavy=True) is deliveries.HEAVY


def test_a_refused_request_is_answered_with_its_refusal():
    assert decide(refused=True).fate is Fate.REFUSE


def test_a_redelivered_request_that_was_only_prefetched_is_computed_without_charge():
    assert decide(redelivered=True, counted=2) is deliveries.LIGHT


def test_a_redelivered_suspect_is_republished_with_its_count():
    assert decide(redelivered=True, suspect=True, counted=2) == Decision(Fate.REPUBLISH, 3)


def test_a_redelivered_suspect_past_the_limit_is_refused_as_poison():
    assert decide(redelivered=True, suspect=True, counted=3) == Decision(Fate.POISON, 4)


def test_a_suspect_refusal_is_answered_not_charged():
    assert decide(refused=True, redelivered=True, suspect=True, counted=3).fate is Fate.REFUSE


def test_a_request_whose_reply_went_unacked_is_charged_when_it_comes_back():
    decision = decide(redelivered=True, unacked_reply="541 INTERNAL_ERROR")
    assert decision == Decision(Fate.REPUBLISH, 2, "541 INTERNAL_ERROR")


def test_a_refusal_whose_reply_went_unacked_is_charged_too():
    assert decide(refused=True, redelivered=True, unacked_reply="x").fate is Fate.REPUBLISH


def test_a_request_whose_replies_went_unacked_past_the_limit_is_dropped_without_a_reply():
    decision = decide(redelivered=True, suspect=True, unacked_reply="541 x", counted=3)
    assert decision == Decision(Fate.UNREPLYABLE, 4, "541 x")


def test_a_request_not_redelivered_is_never_charged_whatever_it_carries():
    assert decide(suspect=True, unacked_reply="x", counted=99) is deliveries.LIGHT


def test_a_count_that_is_not_an_integer_counts_as_none():
    assert decide(redelivered=True, suspect=True, counted="9") == Decision(Fate.REPUBLISH, 2)
    assert decide(redelivered=True, suspect=True, counted=True) == Decision(Fate.REPUBLISH, 2)


def test_a_quorum_queue_s_count_says_redelivered_and_is_left_out_of_a_copy():
    assert deliveries.redelivered(False, {deliveries.QUORUM_DELIVERIES: 1})
    assert not deliveries.redelivered(False, None)
    copied = deliveries.recount({deliveries.QUORUM_DELIVERIES: 5, "a": "b"}, 2)
    assert copied == {"a": "b", DELIVERIES_HEADER: 2}


@pytest.mark.parametrize(
    ("expiration", "budget"), [("250", 250), ("", None), ("x", None), (None, None), (b"7", 7)]
)
def test_a_ttl_is_read_in_milliseconds_or_not_at_all(expiration, budget):
    assert deliveries.budget_ms(expiration) == budget


# -- backoff with jitter -----------------------------------------------------------------


def test_jittered_pauses_double_up_to_the_cap_and_keep_at_least_half():
    assert [backoff.jittered(a, draw=1.0) for a in range(8)] == [
        0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0,
    ]  # fmt: skip
    assert backoff.jittered(3, draw=0.0) == pytest.approx(0.4)
    assert backoff.jittered(10**6, draw=0.5) == pytest.approx(3.75)


def test_a_reconnect_loop_starts_from_the_first_pause_after_a_healthy_connection():
    clock = [0.0]
    retry = backoff.Backoff(clock=lambda: clock[0], draw=lambda: 1.0, healthy_after=10.0)
    assert [retry.failed() for _ in range(3)] == [0.1, 0.2, 0.4]
    retry.up()
    clock[0] += 9.0  # not healthy long enough: the pauses keep growing
    assert retry.failed() == 0.8
    retry.up()
    clock[0] += 10.0
    assert retry.failed() == 0.1


def test_no_reconnect_loop_tries_more_than_a_few_times_a_second_once_it_failed_a_few_times():
    retry = backoff.Backoff(draw=lambda: 0.0)  # the shortest pauses jitter allows
    pauses = [retry.failed() for _ in range(20)]
    assert sum(pauses[:10]) > 2.0
    assert min(pauses[5:]) >= 1.6
