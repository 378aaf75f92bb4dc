"""The memo a server's workers share (``fibrpc.memo``), without a broker: its eviction
policy, its bound, its sharing between processes, and its clean-up.

The same on real servers (``kill -9``, a respawned worker) is in ``test_shared_memo.py``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import gmpy2
import pytest

from fibrpc import memo
from fibrpc.kernels import FastFib
from fibrpc.memo import LOW_WATER, Entry, LocalMemo, SharedMemo, evictions

# --- the policy -------------------------------------------------------------------------


def test_nothing_is_evicted_while_everything_fits():
    entries = [Entry("a", 40, 1), Entry("b", 40, 2)]
    assert evictions(entries, bound=100, incoming=20) == ([], 80)


def test_the_least_recently_used_go_first_down_to_the_low_water_mark():
    entries = [Entry("new", 30, 9), Entry("old", 30, 1), Entry("mid", 30, 5)]
    gone, kept = evictions(entries, bound=100, incoming=30)
    assert gone == ["old"]
    assert kept == 60
    assert kept + 30 <= 100 * LOW_WATER


def test_a_write_that_passes_the_bound_frees_a_tenth_of_it_so_the_next_ones_fit():
    entries = [Entry(str(i), 10, i) for i in range(10)]  # full: 100 of 100
    gone, kept = evictions(entries, bound=100, incoming=10)
    assert gone == ["0", "1"]  # 80 + 10 <= 90
    assert kept == 80


def test_a_large_incoming_entry_evicts_as_many_as_it_takes():
    entries = [Entry(str(i), 10, i) for i in range(10)]
    gone, kept = evictions(entries, bound=100, incoming=85)
    assert gone == [str(i) for i in range(10)]
    assert kept == 0


# --- one process ------------------------------------------------------------------------


@pytest.fixture(params=["local", "shared"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> memo.Memo:
    if request.param == "local":
        return LocalMemo(100)
    return SharedMemo(tmp_path, 100, page=1)


def test_a_memo_stays_within_its_bound_and_refreshes_what_it_hands_out(store: memo.Memo):
    for i in range(4):
        store.put(f"k{i}", bytes([i]) * 30)
        assert store.used() <= 100
    assert store.entries() == 3
    assert store.get("k0") is None  # the oldest went
    assert store.get("k1") == b"\x01" * 30
    _later(store, "k1")
    store.put("k4", b"\x04" * 30)
    assert store.contains("k1")  # refreshed by the get: k2 was older
    assert not store.contains("k2")
    assert store.used() <= 100


def test_an_entry_larger_than_the_whole_bound_is_not_stored(store: memo.Memo):
    store.put("big", b"x" * 101)
    assert not store.contains("big")
    assert store.used() == 0


def test_an_entry_already_there_is_not_written_twice(store: memo.Memo):
    store.put("k", b"first")
    store.put("k", b"again")
    assert store.get("k") == b"first"
    assert store.used() == 5


def _later(store: memo.Memo, key: str) -> None:
    """Make ``key`` the most recent for a ``SharedMemo`` on a coarse clock too."""
    if isinstance(store, SharedMemo):
        path = store.directory / key
        newest = max(p.stat().st_mtime_ns for p in store.directory.iterdir())
        os.utime(path, ns=(newest + 1_000_000, newest + 1_000_000))


# --- several processes ------------------------------------------------------------------


def test_an_entry_one_process_stores_is_a_hit_in_another(tmp_path: Path):
    directory = memo.create(os.getpid(), tmp_path)
    assert directory is not None
    script = (
        "import sys; from fibrpc.kernels import FastFib; from fibrpc.memo import SharedMemo;"
        "f = FastFib(memo_min_n=1000, memo=SharedMemo(sys.argv[1], 1 << 20));"
        "f.text(20000); print(f.hits, f.misses)"
    )
    first = subprocess.run(
        [sys.executable, "-c", script, str(directory)], capture_output=True, check=True, text=True
    )
    second = subprocess.run(
        [sys.executable, "-c", script, str(directory)], capture_output=True, check=True, text=True
    )
    assert first.stdout.split() == ["0", "1"]
    assert second.stdout.split() == ["1", "0"]
    fast = FastFib(memo_min_n=1_000, memo=SharedMemo(directory, 1 << 20))
    assert fast.text(20_000) == gmpy2.fib(20_000).digits()
    assert (fast.hits, fast.misses) == (1, 0)


def test_a_writer_killed_holding_the_lock_does_not_stop_the_others(tmp_path: Path):
    store = SharedMemo(tmp_path, 1_000, page=1)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: take the lock, say so, and wait to be killed
        lock = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.write(write, b"x")
        signal.pause()
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    store.put("k", b"value")  # would block forever if the dead child's lock held
    assert store.get("k") == b"value"


def test_counting_before_writing_errs_high_and_the_next_eviction_counts_again(tmp_path: Path):
    store = SharedMemo(tmp_path, 100, page=1)
    store.put("a", b"a" * 40)
    (tmp_path / ".b.tmp").write_bytes(b"b" * 40)  # a writer killed between count and rename
    _set_used(tmp_path, 80)
    store.put("c", b"c" * 40)  # 80 + 40 > 100: counts the files again (40), keeps "a"
    assert store.contains("a")
    assert store.contains("c")
    assert not (tmp_path / ".b.tmp").exists()
    assert store.used() == 80


def test_a_shared_entry_counts_as_the_whole_pages_it_takes(tmp_path: Path):
    store = SharedMemo(tmp_path, 10 * 4096, page=4096)
    store.put("a", b"a" * 10)  # one page
    store.put("b", b"b" * 4097)  # two
    assert store.used() == 3 * 4096
    store.put("c", b"c" * (6 * 4096 + 1))  # seven: the bound, just
    assert store.used() == 10 * 4096
    assert store.entries() == 3
    store.put("d", b"d")  # one more page passes it: the oldest go
    assert not store.contains("a")
    assert store.contains("d")
    assert store.used() <= 10 * 4096


def _set_used(directory: Path, value: int) -> None:
    (directory / ".lock").write_bytes(value.to_bytes(8, "little"))


# --- clean-up ---------------------------------------------------------------------------


def test_a_new_server_sweeps_the_memos_of_servers_that_are_gone(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{memo.PREFIX}{dead.pid}").mkdir()
    (tmp_path / f"{memo.PREFIX}{dead.pid}" / "t100000").write_bytes(b"1")
    alive = tmp_path / f"{memo.PREFIX}{os.getppid()}"
    alive.mkdir()
    other = tmp_path / "fibrpc-something-else"
    other.mkdir()
    directory = memo.create(os.getpid(), tmp_path)
    assert directory == tmp_path / f"{memo.PREFIX}{os.getpid()}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, other.name, directory.name]
    )
    memo.remove(directory)
    assert not directory.exists()


def test_shared_memos_live_on_tmpfs_where_there_is_one():
    if memo.SHM.is_dir():
        assert memo.root() == memo.SHM
