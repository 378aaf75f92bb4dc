"""The calls a client has in flight: pure bookkeeping, no I/O and no pika.

``Registry`` holds what a client must know of its calls: the window (at most ``window``
calls in flight; ``reserve`` blocks while it is full, and fails at once for every waiter
when the client closes), the pending calls by correlation id, and their deadlines.
Settling a call frees its slot exactly once, however many threads race to settle it (the
reply, its deadline, the waiting thread, ``close``).
Memory is bounded by the calls in flight, not by the call rate times the timeout: the
deadlines of calls settled early are dropped as the heap outgrows the pending calls.

The client's driver (``fibrpc.driver``) is its only user; tests drive it directly.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import math
import threading
import time
from collections.abc import Iterable
from typing import Any, Final, Protocol

from fibrpc import coalesce, protocol, tracing
from fibrpc.errors import ClientClosedError

#: What a reply is turned into for the caller.
AS_INT: Final = 0
AS_TEXT: Final = 1
AS_INTS: Final = 2


#: Past this n a single result has more than 64 bits (F(94) and on).
_SMALL_N: Final = 93


def wants_binary(n: int | list[int], as_: int) -> bool:
    """Whether a call asks for its results in a binary form (``protocol.ACCEPT_HEADER``):
    every batch, and a single ``call`` of n whose F(n) passes 64 bits. A result of at
    most 20 digits costs nothing to read as text, and asking for binary on every single
    call cost pipelined calls a tenth of their rate (bench/README.md); ``call_text``
    wants text."""
    if as_ == AS_INTS:
        return True
    return as_ == AS_INT and n > _SMALL_N  # type: ignore[operator]  # an int here


def read_reply(body: bytes, content_type: str | None, as_: int) -> Any:
    """What a reply gives the caller of a call made ``as_``: an int (``AS_INT``), a
    batch's ints (``AS_INTS``) or decimal text (``AS_TEXT``), from any form the server
    answered in (text, JSON, or a binary form).

    Raises ``RequestError`` for an error envelope (the server's code and message), and
    ``ValueError`` or ``TypeError`` for a reply that does not fit the call."""
    if as_ != AS_TEXT and protocol.is_binary(content_type):
        values = protocol.decode_values(body, content_type)
        if as_ == AS_INTS:
            return values
        if len(values) != 1:
            raise ValueError(f"a reply to one call holds {len(values)} results")
        return values[0]
    value = protocol.decode_reply(body, content_type)
    if as_ == AS_INT:
        if not isinstance(value, str):
            raise TypeError("a reply to one call must be one result")
        return protocol.to_int(value)
    if as_ == AS_INTS:
        if not isinstance(value, list):
            raise TypeError("a reply to a batch must be a list of results")
        return protocol.to_ints(value)
    return value


#: The heap of deadlines is rebuilt from the pending calls when it holds more than
#: twice their number plus this many entries (calls settled before their deadline).
_HEAP_SLACK: Final = 1024


class Waiter(Protocol):
    """What ``Call.settle`` resolves, on the thread that settles the call: a
    ``concurrent.futures.Future`` (``Client.submit``), or the asyncio client's bridge to
    its event loop (``fibrpc.aio``)."""

    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


class Call:
    """One request in flight: its message, its deadline and, once settled, its outcome.

    Only ``submit`` and the asyncio client give a call a ``Waiter`` (``future``); ``call``
    and ``imap`` read the outcome from the call itself, which costs no lock (a future
    takes one on every ``done()``, and a round trip asked it several times).

    ``span`` and ``trace`` stay None unless the call is traced (``fibrpc.tracing.
    start_call``): then they are its span, ended when the call settles, and the trace
    context headers its request carries, every time it is sent.
    """

    __slots__ = (
        "algo",
        "as_",
        "body",
        "content_type",
        "corr_id",
        "deadline",
        "done",
        "expires",
        "future",
        "light",
        "msg_type",
        "n",
        "ok",
        "outcome",
        "span",
        "timeout",
        "trace",
    )

    def __init__(
        self,
        corr_id: str,
        n: int | list[int],
        algo: str,
        as_: int,
        timeout: float,
        encoded: tuple[bytes, str | None, str | None],
        future: Waiter | None = None,
    ) -> None:
        """``timeout`` in seconds (``math.inf``: none); ``encoded`` is the request's body,
        content type and AMQP ``type`` (``fibrpc.protocol.encode_request``)."""
        self.corr_id = corr_id
        self.n = n
        self.algo = algo
        self.as_ = as_
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        #: When its request leaves the queue unconsumed (the message's TTL, set at each
        #: publish): the deadline, or sooner when no server consumed the queue then.
        self.expires = self.deadline
        self.body, self.content_type, self.msg_type = encoded
        self.future = future
        #: A single call that may share a message with others (``fibrpc.coalesce``).
        self.light = as_ != AS_INTS and coalesce.is_light(n, algo)
        self.done = False
        self.ok = False
        self.outcome: Any = None
        self.span: Any = None
        self.trace: dict[str, str] | None = None

    def settle(self, outcome: Any, *, ok: bool) -> bool:
        """Record the result (``ok``) or the exception; resolve the future if any (unless
        its caller cancelled it). Returns False if the call was settled already. ``done``
        is set last: a waiting thread that sees it set finds the outcome in place."""
        if self.done:
            return False
        self.ok = ok
        self.outcome = outcome
        if self.span is not None:
            tracing.end_call(self.span, outcome, ok=ok)
        self.done = True
        if self.future is not None:
            try:
                if ok:
                    self.future.set_result(outcome)
                else:
                    self.future.set_exception(outcome)
            except concurrent.futures.InvalidStateError:
                pass
        return True

    def result(self) -> Any:
        """The outcome: the result, or the exception raised."""
        if self.ok:
            return self.outcome
        raise self.outcome

    def describe(self) -> str:
        """``fib(30) with 'fast'``, or ``a batch of 1000 value(s) with 'iter'``."""
        if isinstance(self.n, list):
            return f"a batch of {len(self.n)} value(s) with {self.algo!r}"
        return f"fib({self.n}) with {self.algo!r}"


class Registry:
    """The window, the pending calls and their deadlines (see the module docstring).

    ``reserve`` and ``release`` may be called from any thread. Everything else is called
    by whichever thread drives the connection, except ``fail``, which a waiting thread
    may also call on its own call (a dict's ``pop`` decides who settles it).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self._free = window
        # The window's lock is taken bare on the hot path (a Condition's own enter and
        # exit are Python code); it is waited on only when the window is full.
        self._lock = threading.Lock()
        self._window = threading.Condition(self._lock)
        self._blocked = 0  # threads waiting for a slot: only then is a release notified
        self.closed = False
        self._pending: dict[str, Call] = {}
        self._deadlines: list[tuple[float, str]] = []
        #: Calls settled so far: tells a driver whom to wake.
        self.settled = 0

    # -- the window ---------------------------------------------------------------------

    def reserve(self, timeout: float, *, block: bool = True) -> bool:
        """Take a slot of the window, waiting up to ``timeout`` seconds (``math.inf``:
        as long as it takes) if ``block``. Returns False if none came free. Raises
        ``ClientClosedError`` once the registry is closed, waiting or not."""
        with self._lock:
            if not block or self._free:
                return self._take()
            self._blocked += 1
            try:
                if timeout == math.inf or timeout >= threading.TIMEOUT_MAX:
                    self._window.wait_for(self._ready)
                else:
                    self._window.wait_for(self._ready, timeout)
            finally:
                self._blocked -= 1
            return self._take()

    def _ready(self) -> bool:
        return self._free > 0 or self.closed

    def _take(self) -> bool:
        if self.closed:
            raise ClientClosedError("The client was closed while this call waited for a slot.")
        if not self._free:
            return False
        self._free -= 1
        return True

    def release(self, count: int = 1) -> None:
        """Give back ``count`` slots (taken for calls settled, or never sent)."""
        with self._lock:
            if self._free + count > self.window:
                raise ValueError("a slot of the window was given back twice")
            self._free += count
            if self._blocked:
                self._window.notify(count)

    def close(self) -> None:
        """No more calls: every ``reserve``, waiting or to come, raises
        ``ClientClosedError`` (a thread blocked on a full window is woken at once)."""
        with self._window:
            self.closed = True
            self._window.notify_all()

    @property
    def free(self) -> int:
        """Slots of the window free now."""
        return self._free

    # -- the calls in flight ------------------------------------------------------------

    def track(self, call: Call) -> None:
        """``call`` is in flight: its reply or its deadline will settle it."""
        self._pending[call.corr_id] = call
        if call.deadline != math.inf:
            heapq.heappush(self._deadlines, (call.deadline, call.corr_id))
            if len(self._deadlines) > 2 * len(self._pending) + _HEAP_SLACK:
                self._compact()

    def pop(self, corr_id: str | None) -> Call | None:
        """The call ``corr_id`` answers, taken out of the calls in flight (None: unknown,
        or settled already)."""
        return self._pending.pop(corr_id, None) if corr_id is not None else None

    def settle(self, call: Call, outcome: Any, *, ok: bool) -> None:
        """Settle ``call`` (taken out with ``pop``, or never tracked): free its slot,
        count it, resolve it. A call settled already frees nothing."""
        if call.settle(outcome, ok=ok):
            self.release()
            self.settled += 1

    def settle_each(self, outcomes: Iterable[tuple[Call, Any, bool]]) -> None:
        """``settle`` each (call, outcome, ok), their slots freed together: one lock for
        a coalesced reply's calls, which a thread taking slots would otherwise contend
        for call by call."""
        freed = 0
        for call, outcome, ok in outcomes:
            if call.settle(outcome, ok=ok):
                freed += 1
        if freed:
            self.release(freed)
            self.settled += freed

    def fail(self, corr_id: str, error: BaseException) -> bool:
        """Fail the call ``corr_id`` if it is still in flight; whether it was."""
        call = self._pending.pop(corr_id, None)
        if call is None:
            return False
        self.settle(call, error, ok=False)
        return True

    def due(self, now: float) -> list[Call]:
        """The calls whose deadline has passed by ``now``, taken out of the calls in
        flight (the caller fails them)."""
        calls = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, corr_id = heapq.heappop(deadlines)
            call = self._pending.pop(corr_id, None)
            if call is not None:
                calls.append(call)
        return calls

    def next_deadline(self) -> float:
        """The earliest deadline among the calls in flight (``math.inf``: none), give or
        take deadlines of calls already settled."""
        return self._deadlines[0][0] if self._deadlines else math.inf

    def get(self, corr_id: str) -> Call | None:
        """The call ``corr_id`` in flight, left in flight (None: unknown or settled)."""
        return self._pending.get(corr_id)

    def calls(self) -> list[Call]:
        """The calls in flight, oldest first."""
        return list(self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, corr_id: object) -> bool:
        return corr_id in self._pending

    @property
    def heap_size(self) -> int:
        """Entries in the deadline heap (for tests of its bound)."""
        return len(self._deadlines)

    def _compact(self) -> None:
        self._deadlines = [
            (call.deadline, corr_id)
            for corr_id, call in self._pending.items()
            if call.deadline != math.inf
        ]
        heapq.heapify(self._deadlines)
