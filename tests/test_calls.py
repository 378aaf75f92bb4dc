"""The client's registry of calls in flight (``fibrpc.calls``): pure, no broker."""

from __future__ import annotations

import math
import threading
import time

from fibrpc.calls import AS_INT, Call, Registry
from fibrpc.errors import CallTimeoutError


def _call(corr_id: str, timeout: float = 10.0) -> Call:
    return Call(corr_id, 30, "fast", AS_INT, timeout, (b"30", None, None))


def test_a_slot_is_freed_exactly_once_however_many_settle_the_call():
    registry = Registry(1)
    assert registry.reserve(0.1)
    call = _call("a")
    registry.track(call)
    taken = registry.pop("a")
    registry.settle(taken, 832040, ok=True)
    registry.settle(taken, CallTimeoutError("late"), ok=False)  # a second settler
    assert not registry.fail("a", CallTimeoutError("late"))
    assert call.result() == 832040
    assert registry.reserve(0.1)  # one slot, free again
    assert not registry.reserve(0.05)  # and only one: it was not freed twice


def test_a_full_window_blocks_until_a_call_settles():
    registry = Registry(2)
    calls = [_call(str(i)) for i in range(2)]
    for call in calls:
        assert registry.reserve(1)
        registry.track(call)
    assert not registry.reserve(0.05)
    threading.Timer(0.1, lambda: registry.fail("0", RuntimeError("x"))).start()
    started = time.monotonic()
    assert registry.reserve(5)
    assert 0.05 < time.monotonic() - started < 2


def test_due_calls_are_taken_out_in_deadline_order():
    registry = Registry(10)
    now = time.monotonic()
    for corr_id, timeout in [("late", 5.0), ("soon", 0.0), ("never", math.inf)]:
        registry.reserve(1)
        registry.track(_call(corr_id, timeout))
    assert [c.corr_id for c in registry.due(now + 1)] == ["soon"]
    assert "soon" not in registry and "late" in registry
    assert [c.corr_id for c in registry.due(now + 100)] == ["late"]
    assert [c.corr_id for c in registry.calls()] == ["never"]
    assert registry.next_deadline() == math.inf


def test_memory_is_bounded_by_the_calls_in_flight_not_by_rate_times_timeout():
    registry = Registry(1)
    for i in range(20_000):  # long timeouts, answered at once
        registry.reserve(1)
        call = _call(str(i), 600.0)
        registry.track(call)
        registry.settle(registry.pop(call.corr_id), i, ok=True)
    assert len(registry) == 0
    assert registry.heap_size <= 2 * 1 + 1024 + 1


def test_an_infinite_reservation_waits_without_a_limit_and_wakes_on_release():
    registry = Registry(1)
    registry.reserve(math.inf)
    threading.Timer(0.05, registry.release).start()
    assert registry.reserve(math.inf)


def test_a_call_describes_itself_for_messages():
    assert _call("a").describe() == "fib(30) with 'fast'"
    batch = Call("b", [1, 2], "iter", AS_INT, 1.0, (b"", None, None))
    assert batch.describe() == "a batch of 2 value(s) with 'iter'"
