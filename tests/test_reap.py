"""The supervisor's reaping and respawning (``Supervisor.reap``, ``after_death``) with fake
processes, as rq tests ``reap_workers`` and ``check_workers(respawn=...)``: which slot gets
a new worker and when, what a dead worker's requests become, when the server gives up. No
process is forked here; test_supervisor.py does it for real."""

from __future__ import annotations

import signal

import pytest

from fibrpc import inflight
from fibrpc.exitcodes import ExitCode
from fibrpc.supervisor import MAX_BOOT_FAILURES, Slot, Supervisor, after_death
from fibrpc.workerstate import WorkerSettings


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None
        self.joined = False

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        self.joined = True


class FakePipe:
    closed = False

    def close(self) -> None:
        self.closed = True


class FakeSupervisor(Supervisor):
    """Spawns fake processes (pids 100, 101, ...) instead of forking."""

    def __init__(self, workers: int) -> None:
        super().__init__(WorkerSettings(), workers)
        self.spawned: list[int] = []

    def _spawn(self, slot: Slot) -> None:
        pid = 100 + len(self.spawned)
        self.spawned.append(slot.index)
        slot.process, slot.ready_pipe, slot.ready = FakeProcess(pid), FakePipe(), False


def started(workers: int = 2, *, ready: bool = True) -> FakeSupervisor:
    supervisor = FakeSupervisor(workers)
    for slot in supervisor.slots:
        supervisor._spawn(slot)
        slot.ready = ready
    supervisor.spawned.clear()
    return supervisor


def test_live_workers_are_left_alone():
    supervisor = started()
    assert supervisor.reap(respawn=True) is None
    assert supervisor.spawned == []


def test_a_worker_that_served_and_died_is_joined_and_replaced_at_once():
    supervisor = started()
    dead = supervisor.slots[1].process
    pipe = supervisor.slots[1].ready_pipe
    dead.exitcode = -signal.SIGKILL
    assert supervisor.reap(respawn=True) is None
    assert dead.joined and pipe.closed
    assert supervisor.spawned == [1]
    assert supervisor.slots[1].restarts == 1
    assert supervisor.boot_failures == 0


def test_without_respawn_a_dead_worker_s_slot_stays_empty():
    supervisor = started()
    supervisor.slots[0].process.exitcode = 1
    assert supervisor.reap(respawn=False) is None
    assert supervisor.slots[0].process is None and supervisor.spawned == []


def test_what_a_dead_worker_was_computing_becomes_a_suspect(caplog):
    supervisor = started()
    request = inflight.key("amq.rabbitmq.reply-to.abc", "c7")
    supervisor.board.slot(0).begin(inflight.HEAVY, request)
    supervisor.slots[0].process.exitcode = -signal.SIGKILL
    supervisor.reap(respawn=True)
    assert supervisor.board.is_suspect(request, worker=0)
    assert "died computing request 'c7'" in caplog.text


def test_a_worker_that_died_booting_is_replaced_only_after_a_pause():
    supervisor = started(ready=False)
    supervisor.slots[0].process.exitcode = 1
    supervisor.reap(respawn=True)
    assert supervisor.spawned == []  # not yet: its slot waits out the backoff
    assert supervisor.boot_failures == 1
    slot = supervisor.slots[0]
    supervisor.respawn_due(slot.not_before)
    assert supervisor.spawned == [0]


def test_workers_that_keep_dying_before_they_are_ready_end_the_server_as_a_crash_loop():
    supervisor = started(1, ready=False)
    slot = supervisor.slots[0]
    for failure in range(1, MAX_BOOT_FAILURES + 1):
        slot.process.exitcode = 1
        code = supervisor.reap(respawn=False)
        if failure < MAX_BOOT_FAILURES:
            assert code is None
            supervisor.respawn_due(slot.not_before)
        else:
            assert code is ExitCode.CRASH_LOOP


@pytest.mark.parametrize("code", [ExitCode.ACCESS_REFUSED, ExitCode.BROKER_REFUSED])
def test_a_worker_the_broker_refused_ends_the_server_with_that_code(code):
    supervisor = started()
    supervisor.slots[0].process.exitcode = int(code)
    assert supervisor.reap(respawn=True) == code
    assert supervisor.spawned == []


def test_the_pause_after_a_boot_failure_grows_with_jitter_and_a_cap():
    delays = [after_death(1, ready=False, boot_failures=n).delay for n in range(8)]
    assert delays == sorted(delays) and delays[0] == 0.25 and delays[-1] == 5.0
    assert after_death(1, ready=False, boot_failures=0, draw=0.0).delay == 0.125


def test_a_worker_that_served_is_replaced_without_a_pause_or_a_boot_failure():
    death = after_death(-signal.SIGKILL, ready=True, boot_failures=2)
    assert (death.delay, death.boot_failures, death.give_up, death.refused) == (
        0.0,
        2,
        False,
        False,
    )
