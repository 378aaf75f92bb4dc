"""The worker's delivery policy (``fibrpc.deliveries``) and the board of requests in flight
(``fibrpc.inflight``): pure, no broker."""

from __future__ import annotations

import os

import pytest

from fibrpc import deliveries, inflight
from fibrpc.deliveries import Action

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


# -- backoff ----------------------------------------------------------------------------


def test_reconnect_delays_grow_and_then_stay():
    from fibrpc.backoff import RECONNECT_DELAYS, reconnect_delay  # noqa: PLC0415

    delays = [reconnect_delay(attempt) for attempt in range(10)]
    assert delays == sorted(delays)
    assert delays[0] == 0.1 and delays[-1] == RECONNECT_DELAYS[-1] == 5.0
    assert reconnect_delay(-3) == 0.1
    assert reconnect_delay(99, (1.0, 2.0)) == 2.0
