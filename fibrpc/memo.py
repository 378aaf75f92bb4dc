"""The memo of large ``fast`` results, one per server, shared by all its workers.

Most of the cost of a large F(n) is its conversion (to decimal text, or to bytes), and a
load of repeated large requests should pay it once per server, not once per worker. The
supervisor makes one directory on tmpfs before it forks (``create``): every worker, and
every respawned one, reads and writes the same entries there (``SharedMemo``), one file
per entry. The kernel's page cache is the allocator; this module only decides what to
keep:

* **Files, whole.** An entry is written to a temporary name and renamed into place, so a
  reader sees a whole file or none. A reader that opens an entry as it is evicted still
  reads it whole (Linux frees an unlinked file when its last reader closes it).
* **Bounded in bytes** (``--memo-bytes``, for the server), of memory: an entry counts as
  the whole pages tmpfs gives it (a text of 2,090 digits takes 4 KiB). Writers take an exclusive
  ``flock`` on ``.lock`` (the kernel drops it when its holder dies, even by ``kill -9``)
  and keep the bytes in use in it. A write that would pass the bound first evicts
  the least recently used entries (``evictions``, a pure function: a hit bumps its
  entry's modification time) down to nine tenths of the bound, so the scan that finds
  them is paid once per tenth of the bound written, not per write. The count is raised
  before the file is written: a writer killed in between leaves it too high, never too
  low, and the next scan counts again from the files.
* **Cleaned up.** The supervisor removes the directory when it exits (``remove``). One
  killed with ``kill -9`` leaves it behind; the directory is named after the supervisor's
  pid, and the next server to start removes those of servers no longer running
  (``sweep``). So a killed server leaves at most one bounded directory, until the next.

Reads take no lock. A memo that cannot be written (tmpfs full: Docker gives a container
64 MB of ``/dev/shm`` by default) logs one warning and goes on computing: the memo only
ever saves time.

``LocalMemo`` is the same contract inside one process (an ``OrderedDict``): what a
``FastFib`` uses when no server made it a shared memo (tests, the library used directly).
This module imports no pika.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Final, NamedTuple, Protocol

log = logging.getLogger(__name__)

#: Where the directories of shared memos go: tmpfs (memory) where there is one.
SHM: Final = Path("/dev/shm")
#: A shared memo's directory is this and its supervisor's pid.
PREFIX: Final = "fibrpc-memo-"
#: A write that passes the bound evicts down to this fraction of it.
LOW_WATER: Final = 0.9
#: Writers' lock, and the bytes in use (8 bytes, little-endian) in it.
_LOCK: Final = ".lock"
_COUNT: Final = struct.Struct("<Q")


class Memo(Protocol):
    """What ``FastFib`` asks of a memo: entries of bytes by key, bounded in bytes."""

    bound: int

    def get(self, key: str) -> bytes | None:
        """The entry, refreshed as the most recently used; None if absent."""

    def contains(self, key: str) -> bool:
        """Whether the entry is there (neither refreshed nor counted)."""

    def put(self, key: str, value: bytes) -> None:
        """Store the entry unless it is there or larger than the whole bound, evicting
        the least recently used to stay within the bound."""

    def used(self) -> int:
        """Bytes of the entries held; never above ``bound``."""

    def entries(self) -> int:
        """Number of entries held."""


class Entry(NamedTuple):
    """One entry as the eviction policy sees it."""

    name: str
    size: int
    last_used: int  # any clock that only goes up: a larger value is more recent


def evictions(entries: Iterable[Entry], bound: int, incoming: int) -> tuple[list[str], int]:
    """Which entries to remove so that ``incoming`` more bytes fit within ``bound``.

    Nothing goes while everything fits. Otherwise the least recently used go first,
    until what stays plus ``incoming`` is at most ``LOW_WATER`` of the bound (so that the
    next writes fit without another scan). Returns the names to remove, oldest first, and
    the bytes that stay. The caller never offers an entry larger than the bound.
    """
    ordered = sorted(entries, key=lambda e: e.last_used)
    kept = sum(e.size for e in ordered)
    if kept + incoming <= bound:
        return [], kept
    target = int(bound * LOW_WATER)
    gone: list[str] = []
    for entry in ordered:
        if kept + incoming <= target:
            break
        gone.append(entry.name)
        kept -= entry.size
    return gone, kept


class LocalMemo:
    """A memo in this process only: an LRU ``OrderedDict`` bounded in bytes; thread-safe."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: str, value: bytes) -> None:
        size = len(value)
        if size > self.bound:
            return
        with self._lock:
            if key in self._entries:  # another thread computed it meanwhile
                return
            while self._used + size > self.bound:
                _, old = self._entries.popitem(last=False)
                self._used -= len(old)
            self._entries[key] = value
            self._used += size

    def used(self) -> int:
        return self._used

    def entries(self) -> int:
        return len(self._entries)


class SharedMemo:
    """The memo in ``directory``, shared by every process that opens it (see the module's
    docstring). Each process opens the directory and its lock for itself (``flock`` locks
    belong to an open file, which a fork would share), on first use; every file is then
    reached relative to the directory's descriptor, a few system calls per operation."""

    def __init__(self, directory: Path | str, bound: int, page: int = mmap.PAGESIZE) -> None:
        """``page``: the unit tmpfs allocates in; every entry counts as whole pages."""
        self.directory = Path(directory)
        self.bound = bound
        self.page = page
        self._fds: tuple[int, int, int] | None = None  # pid, the directory, .lock
        self._thread_lock = threading.Lock()  # the compute thread and the I/O thread
        self._warned = False

    def get(self, key: str) -> bytes | None:
        try:
            directory = self._open()[1]
            fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn("read", exc)
            return None
        try:
            chunks = []
            size = os.fstat(fd).st_size
            while size > 0 and (chunk := os.read(fd, size)):
                chunks.append(chunk)
                size -= len(chunk)
            _touch(fd)  # now the most recently used
        except OSError as exc:
            self._warn("read", exc)
            return None
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def contains(self, key: str) -> bool:
        try:
            os.stat(key, dir_fd=self._open()[1])
        except OSError:
            return False
        return True

    def put(self, key: str, value: bytes) -> None:
        size = self._footprint(len(value))
        if size > self.bound:
            return
        with self._thread_lock:
            try:
                _, directory, lock = self._open()
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    if self.contains(key):  # another worker computed it meanwhile
                        return
                    total = _read_count(lock)
                    if total + size > self.bound:
                        total = self._evict(size)
                    _write_count(lock, total + size)  # counted first: never too low
                    try:
                        _write_file(directory, key, value)
                    except OSError:
                        _write_count(lock, total)
                        raise
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            except OSError as exc:
                self._warn("write", exc)

    def used(self) -> int:
        try:
            return _read_count(self._open()[2])
        except OSError:
            return 0

    def entries(self) -> int:
        return sum(1 for e in self._scan())

    def close(self) -> None:
        """Close this process's descriptors of the memo (it reopens them if used again)."""
        fds, self._fds = self._fds, None
        if fds is not None and fds[0] == os.getpid():
            os.close(fds[1])
            os.close(fds[2])

    def _open(self) -> tuple[int, int, int]:
        fds = self._fds
        if fds is None or fds[0] != os.getpid():  # none yet, or a fork's
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            lock = os.open(_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=directory)
            fds = self._fds = (os.getpid(), directory, lock)
        return fds

    def _scan(self) -> Iterable[Entry]:
        with os.scandir(self.directory) as found:
            for item in found:
                if item.name.startswith("."):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    info = item.stat()
                    yield Entry(item.name, self._footprint(info.st_size), info.st_mtime_ns)

    def _footprint(self, size: int) -> int:
        return -(-size // self.page) * self.page

    def _evict(self, incoming: int) -> int:
        """Under the lock: count the entries again, remove the least recently used, and
        drop temporary files left by writers that died (none is being written now)."""
        for item in self.directory.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                item.unlink()
        gone, kept = evictions(self._scan(), self.bound, incoming)
        for name in gone:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()
        log.debug("memo: evicted %d entries, %d bytes stay", len(gone), kept)
        return kept

    def _warn(self, what: str, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "cannot %s the shared memo in %s (%s); computing instead", what, self.directory, exc
            )


def _write_file(directory: int, key: str, value: bytes) -> None:
    """Write ``value`` as ``key`` in ``directory`` (a descriptor): a temporary file first,
    renamed into place, so that a reader sees all of it or nothing."""
    temporary = f".{key}.tmp"
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=directory
    )
    try:
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
            _touch(fd)
        finally:
            os.close(fd)
        os.replace(temporary, key, src_dir_fd=directory, dst_dir_fd=directory)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=directory)
        raise


def _touch(fd: int) -> None:
    """Set a file's times to now, to the nanosecond: the times tmpfs sets itself tick
    with the kernel's coarse clock (milliseconds), too coarse to order entries by."""
    now = time.time_ns()
    os.utime(fd, ns=(now, now))


def _read_count(fd: int) -> int:
    data = os.pread(fd, _COUNT.size, 0)
    return _COUNT.unpack(data)[0] if len(data) == _COUNT.size else 0


def _write_count(fd: int, value: int) -> None:
    os.pwrite(fd, _COUNT.pack(max(0, value)), 0)


def root() -> Path:
    """Where shared memos go: ``/dev/shm`` (tmpfs), else the temporary directory."""
    if SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK):
        return SHM
    return Path(tempfile.gettempdir())


def create(supervisor: int, where: Path | None = None) -> Path | None:
    """Make the directory of the shared memo of server ``supervisor`` (a pid), after
    removing those of servers that were killed. None, with a warning, if it cannot be
    made: the workers then keep a memo each, as before."""
    where = where or root()
    sweep(where)
    directory = where / f"{PREFIX}{supervisor}"
    try:
        directory.mkdir(mode=0o700)
        (directory / _LOCK).write_bytes(_COUNT.pack(0))
    except OSError as exc:
        log.warning(
            "cannot make the shared memo %s (%s): each worker keeps its own", directory, exc
        )
        return None
    return directory


def sweep(where: Path) -> None:
    """Remove the memos of this user's servers that are no longer running."""
    with contextlib.suppress(OSError):
        for directory in where.glob(f"{PREFIX}*"):
            pid = directory.name.removeprefix(PREFIX)
            with contextlib.suppress(OSError):
                if (
                    pid.isdigit()
                    and directory.stat().st_uid == os.getuid()
                    and not _running(int(pid))
                ):
                    remove(directory)


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs (a reused pid only delays the sweep of a memo)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(directory: Path) -> None:
    """Remove a shared memo and everything in it."""
    shutil.rmtree(directory, ignore_errors=True)
