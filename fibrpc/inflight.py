"""What each worker of a server is computing, in memory its supervisor shares with it.

When a worker dies, RabbitMQ redelivers every request it held: the one it was computing,
which may be what killed it, and the ones merely prefetched behind it, which are not. To
tell them apart after the crash, each worker writes the key of a request into a slot of
its own before computing it, and clears the slot after (``WorkerSlot``). The supervisor,
reaping a dead worker, moves what its slots held into a ring of *suspects*
(``Board.convict``); a worker given a redelivered request asks ``Board.is_suspect``, and
clears the suspicion once it has charged the request for it (``Board.acquit``). A key
still in another worker's slot counts too: its worker may have died a moment ago, not
yet reaped.

The board is an anonymous shared ``mmap`` made before the first fork, so every worker,
and every respawned one, shares it. It holds bytes only: a slot is a little-endian length
and the key. A torn read (a key half overwritten) finds no match, and costs at worst one
uncounted delivery.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

#: A request's key: reply_to, a NUL, correlation_id (each an AMQP shortstr: <= 255 bytes).
KEY_BYTES: Final = 512
_LENGTH: Final = struct.Struct("<H")
_ENTRY: Final = _LENGTH.size + KEY_BYTES
#: Slots per worker: a request computed inline by the I/O thread, and one on the compute
#: thread.
INLINE: Final = 0
HEAVY: Final = 1
_SLOTS: Final = 2
#: Suspects remembered: the most recent ones, enough for every worker of a server to die
#: many times over.
SUSPECTS: Final = 64
_HEAD: Final = struct.Struct("<Q")
_EMPTY: Final = _LENGTH.pack(0)


def key(reply_to: object, correlation_id: object) -> bytes:
    """The key of a request (``bytes`` of at most ``KEY_BYTES``)."""
    return f"{reply_to or ''}\0{correlation_id or ''}".encode(errors="replace")[:KEY_BYTES]


class Board:
    """The shared memory of one server's ``workers`` workers (make it before forking)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._slots_at = _HEAD.size
        self._ring_at = self._slots_at + workers * _SLOTS * _ENTRY
        self._memory = mmap.mmap(-1, self._ring_at + SUSPECTS * _ENTRY)

    def slot(self, worker: int) -> WorkerSlot:
        """The slots of worker ``worker`` (0 .. workers - 1), for that worker to write."""
        return WorkerSlot(self._memory, self._slots_at + worker * _SLOTS * _ENTRY)

    def convict(self, worker: int) -> list[bytes]:
        """Worker ``worker`` died: make what it was computing suspects, clear its slots,
        and return those keys (for the supervisor's log)."""
        found = []
        for sub in range(_SLOTS):
            at = self._slots_at + (worker * _SLOTS + sub) * _ENTRY
            entry = self._read(at)
            if entry:
                found.append(entry)
                self._add_suspect(entry)
            self._memory[at : at + _LENGTH.size] = _LENGTH.pack(0)
        return found

    def is_suspect(self, request: bytes, *, worker: int | None = None) -> bool:
        """Whether ``request`` was being computed when a worker died (or is in the slot
        of a worker other than ``worker``, which may have just died)."""
        for i in range(SUSPECTS):
            if self._read(self._ring_at + i * _ENTRY) == request:
                return True
        for other in range(self.workers):
            if other == worker:
                continue
            for sub in range(_SLOTS):
                if self._read(self._slots_at + (other * _SLOTS + sub) * _ENTRY) == request:
                    return True
        return False

    def acquit(self, request: bytes) -> None:
        """``request`` was charged for the crash it is suspected of: it is a suspect no
        more, so a later redelivery (when it was only prefetched by a worker that died
        computing another) is not charged again. Only a death while computing it again
        (``convict``) makes it a suspect again."""
        for i in range(SUSPECTS):
            at = self._ring_at + i * _ENTRY
            if self._read(at) == request:
                self._memory[at : at + _LENGTH.size] = _EMPTY

    def close(self) -> None:
        self._memory.close()

    def _read(self, at: int) -> bytes:
        (length,) = _LENGTH.unpack_from(self._memory, at)
        start = at + _LENGTH.size
        return self._memory[start : start + min(length, KEY_BYTES)]

    def _add_suspect(self, request: bytes) -> None:
        (head,) = _HEAD.unpack_from(self._memory, 0)
        at = self._ring_at + (head % SUSPECTS) * _ENTRY
        self._memory[at : at + _LENGTH.size] = _LENGTH.pack(0)  # torn reads match nothing
        self._memory[at + _LENGTH.size : at + _LENGTH.size + len(request)] = request
        self._memory[at : at + _LENGTH.size] = _LENGTH.pack(len(request))
        _HEAD.pack_into(self._memory, 0, head + 1)


class WorkerSlot:
    """One worker's slots on the board: ``begin`` before computing, ``end`` after."""

    __slots__ = ("_at", "_memory")

    def __init__(self, memory: mmap.mmap, at: int) -> None:
        self._memory = memory
        self._at = at

    def begin(self, sub: int, request: bytes) -> None:
        """Worker computing ``request`` in slot ``sub`` (``INLINE`` or ``HEAVY``)."""
        at = self._at + sub * _ENTRY
        # One write, length first: a read torn by a crash right here matches nothing.
        self._memory[at : at + _LENGTH.size + len(request)] = _LENGTH.pack(len(request)) + request

    def end(self, sub: int) -> None:
        """Done computing in slot ``sub``."""
        at = self._at + sub * _ENTRY
        self._memory[at : at + 2] = _EMPTY
