"""The client for asyncio programs: ``AsyncClient``.

It is the threaded client's machinery with an asyncio face. The registry
(``fibrpc.calls``), the driver and its I/O thread (``fibrpc.driver``) and the link
(``fibrpc.link``) are the same objects, so every guarantee of ``fibrpc.Client`` holds
here as it is: the same errors, deadlines, window, batching, no-server detection,
failover and re-sending. What differs is only who waits:

* the event loop never touches the connection: calls are encoded on the loop and handed
  to the driver's I/O thread (``Driver.hand_over``) once per turn of the loop, and that
  thread publishes them and takes in the replies;
* replies settle on the I/O thread, which queues them and wakes the loop once per turn
  of the connection (``loop.call_soon_threadsafe``), not once per reply;
* the window is a ``Window`` of the loop's: a call waiting for a slot awaits, it never
  blocks the loop; a cancelled call gives back its slot and its pending entry at once
  (the request already sent carries its deadline, so a worker skips it once it passes).

Why not a second client on aio-pika or aiormq: the driver already solves what the
threaded client needed (deadlines that hold when the connection stalls, failover,
re-sending, the broker's message-size limit, blocked publishing), and a second
implementation would have to solve it all again and be kept in step; the I/O thread
costs a thread switch per turn of the connection, not per call
(bench/README.md measures it against the threaded client).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any, Final

from fibrpc import control, describe, tracing
from fibrpc.calls import AS_INT, AS_TEXT, Call, Registry
from fibrpc.client import (
    END,
    check_heartbeat,
    check_queue,
    check_reply_queue,
    check_timeout,
    check_urls,
    check_window,
    encode,
    messages,
    sorted_descriptions,
)
from fibrpc.config import (
    DEFAULT_HEARTBEAT,
    DEFAULT_QUEUE,
    DEFAULT_REPLY_QUEUE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    DEFAULT_WINDOW,
)
from fibrpc.driver import TICK, Driver
from fibrpc.errors import CallTimeoutError, ClientClosedError, ConfigError
from fibrpc.link import AmqpLink
from fibrpc.numbers import DEFAULT_ALGORITHM
from fibrpc.tls import TLSOptions
from fibrpc.urls import redact

#: Seconds past its deadline after which the loop fails a call itself, if the I/O
#: thread has not (a connection stuck in a round trip, say): as the threaded client.
#: Also how late a wait for a slot of the window may fail.
_LATE: Final = 0.25


class _Waiter:
    """Resolves an asyncio future from the thread that settles its call (``Call.settle``
    calls ``set_result`` or ``set_exception``)."""

    __slots__ = ("client", "future")

    def __init__(self, client: AsyncClient, future: asyncio.Future[Any]) -> None:
        self.client = client
        self.future = future

    def set_result(self, result: Any, /) -> None:
        self.client._settled(self.future, result, True)

    def set_exception(self, exception: BaseException, /) -> None:
        self.client._settled(self.future, exception, False)


class Window:
    """The asyncio client's window: at most ``size`` calls in flight, and the tasks
    waiting for a slot served first come, first served (a freed slot goes straight to the
    oldest waiter). Taking and giving are O(1): ``asyncio.Semaphore`` (Python 3.11 and
    3.12) scans its waiters on every release, which with 2,000 tasks waiting held the
    event loop for tens of milliseconds at a time. A waiter's timeout is kept by
    ``expire``, which its owner calls now and then (a timer per waiter cost the loop
    more than the rest of a call)."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: collections.deque[tuple[asyncio.Future[None], float]] = collections.deque()

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody waits for one before us."""
        waiters = self._waiters
        while waiters and waiters[0][0].done():  # timed out or cancelled: gone
            waiters.popleft()
        if self.free and not waiters:
            self.free -= 1
            return True
        return False

    async def take(self, seconds: float) -> bool:
        """Take a slot, waiting up to ``seconds`` (``math.inf``: as long as it takes;
        kept by ``expire``); False if none came free in time. A cancelled waiter passes
        on a slot it was given meanwhile."""
        if self.try_take():
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, time.monotonic() + seconds))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give()  # the slot came with the cancellation: pass it on
            raise
        except TimeoutError:
            return False
        return True

    def give(self) -> None:
        """Give back a slot: to the oldest task still waiting, or to the pool."""
        waiters = self._waiters
        while waiters:
            waiter, _ = waiters.popleft()
            if not waiter.done():  # not timed out, not cancelled
                waiter.set_result(None)
                return
        self.free += 1

    def expire(self, now: float) -> bool:
        """Fail the waits whose time ran out by ``now`` (``time.monotonic()``); whether
        any wait with a deadline is left."""
        left = False
        for waiter, deadline in self._waiters:
            if waiter.done():
                continue
            if deadline <= now:
                waiter.set_exception(TimeoutError())
            elif deadline != math.inf:
                left = True
        return left


class AsyncClient:
    """An RPC client for fibrpc servers for asyncio programs (an async context manager).

    The settings are ``fibrpc.Client``'s: ``url`` (one ``amqp://`` or ``amqps://`` URL,
    or the nodes of a cluster: a list, or one string separated by commas), ``queue``,
    ``timeout`` (seconds a call waits for its reply by default; ``math.inf``: no limit),
    ``window`` (the most calls or batches in flight), ``heartbeat`` (seconds), ``tls``,
    ``reply_queue`` (``"direct"`` or ``"exclusive"``).
    They are checked here (``ConfigError``); the connection opens in ``async with`` (or
    ``await client.connect()``), within ``timeout`` and at most 15 s, and raises
    ``BrokerError`` when the broker cannot be reached or refuses.

    A client belongs to the event loop it was opened in; one client serves any number
    of tasks of that loop at once.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        queue: str = DEFAULT_QUEUE,
        timeout: float = DEFAULT_TIMEOUT,
        window: int = DEFAULT_WINDOW,
        heartbeat: int = DEFAULT_HEARTBEAT,
        tls: TLSOptions | None = None,
        reply_queue: str = DEFAULT_REPLY_QUEUE,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.window = check_window(window)
        self.urls = check_urls(url, tls)
        self.url = self.urls[0]
        self.queue = check_queue(queue)
        self.reply_queue = check_reply_queue(reply_queue)
        self._heartbeat = check_heartbeat(heartbeat)
        self._tls = tls
        self._prefix = uuid.uuid4().hex[:12] + "."
        self._ids = itertools.count()
        self._driver: Driver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._slots = Window(window)
        self._waiting: set[Call] = set()  # calls awaited here: the watchdog's
        self._outbox: list[Call] = []  # calls made in this turn of the loop
        self._watchdog: asyncio.TimerHandle | None = None
        self._settled_queue: collections.deque[tuple[asyncio.Future[Any], Any, bool]] = (
            collections.deque()
        )
        self._wake_pending = False
        self._closing = False

    # -- opening and closing --------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect (in a thread of the loop's executor; the loop keeps running). Raises
        ``BrokerError``; ``ClientClosedError`` if the client was closed or is open."""
        if self._closing or self._driver is not None:
            raise ClientClosedError("This AsyncClient is open already, or closed.")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        link = AmqpLink(
            self.urls,
            self.queue,
            heartbeat=self._heartbeat,
            tls=self._tls,
            connect_timeout=self.timeout,
            tick=TICK,
            reply_queue=self.reply_queue,
        )
        driver = Driver(link, Registry(self.window))
        driver.prefix = self._prefix
        driver.after_step = self._wake
        start = self._loop.run_in_executor(None, driver.start)
        try:
            await asyncio.shield(start)
        except asyncio.CancelledError:
            # The connection may still open: close it once it has, in the background.
            start.add_done_callback(lambda _: driver.close())
            raise
        self._driver = driver

    async def close(self) -> None:
        """Fail the calls still in flight with ``ClientClosedError`` and disconnect;
        returns within about a second, whatever the broker does."""
        if self._closing:
            return
        self._closing = True
        driver = self._driver
        if driver is not None:
            await asyncio.get_running_loop().run_in_executor(None, driver.close)
        self._drain()  # the calls failed by closing

    async def describe(self, wait: float = 1.0) -> list[describe.Description]:
        """What every server on the queue says it is: as ``Client.describe`` (those that
        answered within ``wait`` seconds, one per server), without blocking the loop."""
        seconds = check_timeout(wait)
        if seconds == math.inf:
            raise ConfigError(f"describe waits a finite number of seconds; got {wait!r}.")
        driver = self._open_driver()
        answers: list[tuple[str | None, bytes]] = []
        corr_id = f"{self._prefix}describe.{next(self._ids)}"
        driver.control(
            control.DESCRIBE,
            control.encode_describe(),
            corr_id,
            int(seconds * 1000),
            lambda content_type, body: answers.append((content_type, body)),
        )
        try:
            await asyncio.sleep(seconds)
        finally:
            driver.unlisten(corr_id)
        return sorted_descriptions(list(answers))

    # -- calls ----------------------------------------------------------------------------

    async def call(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> int:
        """F(n) computed by a server with ``algo``, waiting up to ``timeout`` seconds (the
        client's by default).

        Raises ``RequestError`` if n is refused (by the server, or here when it is not an
        integer), ``CallTimeoutError`` after ``timeout``, ``NoServerError`` when no
        server consumes the queue, ``ConfigError`` for a bad timeout, ``BrokerError``,
        ``ClientClosedError``. Cancelling the awaiting task frees the call's slot at once.
        """
        result: int = await self._one(n, algo, timeout, AS_INT)
        return result

    async def call_text(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> str:
        """F(n) as decimal text, exactly as the server sent it. Raises as ``call`` does."""
        text: str = await self._one(n, algo, timeout, AS_TEXT)
        return text

    async def map(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """F(n) for every n, as a list in order, batched and pipelined (see ``imap``)."""
        out: list[int] = []
        results = self._imap(ns, algo, batch_size, timeout)
        async with contextlib.aclosing(results):
            async for chunk in results:
                out.extend(chunk)  # a message's results at a time: no step per value
        return out

    async def imap(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[int]:
        """Stream F(n) for every n of a (possibly endless) iterable, in order.

        As ``Client.imap``: values are packed ``batch_size`` to a message (by default up
        to 10,000, or fewer when their results would pass about 1 MB), up to ``window``
        messages in flight; ``timeout`` is per message; the first refused batch raises
        its ``RequestError``. Leaving the loop early (``break``, an exception,
        cancellation) gives back the window at once.
        """
        results = self._imap(ns, algo, batch_size, timeout)
        async with contextlib.aclosing(results):
            async for chunk in results:
                for value in chunk:
                    yield value

    async def _imap(
        self, ns: Iterable[int], algo: str, batch_size: int | None, timeout: float | None
    ) -> AsyncGenerator[list[int], None]:
        """``imap``, a message's results at a time (a list of one with ``batch_size=1``)."""
        chunks, as_ = messages(ns, algo, batch_size)
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        slots = self._slots
        in_flight: collections.deque[tuple[Call, asyncio.Future[Any]]] = collections.deque()
        try:
            chunk: Any = next(chunks, END)
            while chunk is not END or in_flight:
                # Fill the window (wait for a slot only when nothing is in flight), giving
                # back each answer as soon as it is in: with an input that pauses, results
                # come while the input is still coming.
                while (
                    chunk is not END
                    and (not in_flight or slots.free)
                    and not (in_flight and in_flight[0][0].done)
                ):
                    in_flight.append(await self._send(chunk, algo, seconds, as_))
                    if chunks.slow:  # reading the input may take a while: hand the
                        await asyncio.sleep(0)  # calls over to the I/O thread first
                    chunk = next(chunks, END)
                call, future = in_flight.popleft()
                try:
                    result = await self._wait(call, future)
                finally:
                    slots.give()
                yield [result] if as_ == AS_INT else result
        finally:
            if in_flight:
                gone = ClientClosedError("imap was left with this call in flight.")
                for call, future in in_flight:
                    future.cancel()  # nobody awaits it: no "exception never retrieved"
                    self._abandon(call, gone)
                    slots.give()

    @property
    def in_flight(self) -> int:
        """Calls sent (or about to be) and not yet answered."""
        return self._driver.in_flight if self._driver is not None else 0

    @property
    def dropped_unknown(self) -> int:
        """Replies dropped because no call of this client had their correlation id."""
        return self._driver.dropped_unknown if self._driver is not None else 0

    @property
    def dropped_duplicates(self) -> int:
        """Replies dropped because their call was answered already (a redelivery)."""
        return self._driver.dropped_duplicates if self._driver is not None else 0

    # -- on the loop ----------------------------------------------------------------------

    async def _one(self, n: object, algo: str, timeout: float | None, as_: int) -> Any:
        # One coroutine frame for the whole call when a slot is free (the usual case):
        # the frames of _send, _reserve and _wait cost the loop a tenth of a call.
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        driver = self._open_driver()
        n, encoded = encode(n, algo, as_, driver.max_message, binary=driver.binary_requests)
        if not self._slots.try_take():
            await self._reserve(seconds)
        made = self._make(driver, n, algo, seconds, as_, encoded, True)
        if made is None:  # rare: see _make
            made = await self._make_later(driver, n, algo, seconds, as_, encoded, True)
        call, future = made
        waiting = self._waiting
        waiting.add(call)
        if self._watchdog is None and seconds != math.inf:
            self._arm_watchdog()
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(call, ClientClosedError("The call was cancelled."))
            raise
        finally:
            waiting.discard(call)
            self._slots.give()

    async def _send(
        self, n: object, algo: str, seconds: float, as_: int
    ) -> tuple[Call, asyncio.Future[Any]]:
        """Check, encode and hand over one call, once a slot of the window is free;
        nothing is reserved before every argument is checked. The caller releases the
        slot once it is done with the call."""
        driver = self._open_driver()
        n, encoded = encode(n, algo, as_, driver.max_message, binary=driver.binary_requests)
        await self._reserve(seconds)
        made = self._make(driver, n, algo, seconds, as_, encoded, False)
        if made is None:  # rare: see _make
            made = await self._make_later(driver, n, algo, seconds, as_, encoded, False)
        return made

    async def _make_later(
        self,
        driver: Driver,
        n: int | list[int],
        algo: str,
        seconds: float,
        as_: int,
        encoded: tuple[bytes, str | None, str | None],
        waits: bool,
    ) -> tuple[Call, asyncio.Future[Any]]:
        """``_make`` again after a pause, until the registry has a slot; the window's
        slot is given back if the wait is cancelled (``_make`` gives it back if it
        raises)."""
        while True:
            try:
                await asyncio.sleep(TICK)
            except BaseException:
                self._slots.give()
                raise
            made = self._make(driver, n, algo, seconds, as_, encoded, waits)
            if made is not None:
                return made

    def _make(
        self,
        driver: Driver,
        n: int | list[int],
        algo: str,
        seconds: float,
        as_: int,
        encoded: tuple[bytes, str | None, str | None],
        waits: bool,
    ) -> tuple[Call, asyncio.Future[Any]] | None:
        """The call of ``n`` (checked and encoded, its slot of the window taken), queued
        for the next hand-over to the I/O thread, and its future; None if the registry
        has no slot free yet (rare: a call cancelled while the I/O thread was publishing
        it holds its slot until its reply or deadline, a moment later: try again after a
        pause). ``waits``: the caller awaits this one call (``call``, ``call_text``),
        which makes its span, if traced, a CLIENT span. If this raises, the window's
        slot is given back."""
        try:
            if self._closing:
                raise ClientClosedError("The client is closed.")
            if not driver.registry.reserve(seconds, block=False):
                return None
            loop = self._loop
            assert loop is not None
            future = loop.create_future()
            corr_id = f"{self._prefix}{next(self._ids)}"
            call = Call(corr_id, n, algo, as_, seconds, encoded, _Waiter(self, future))
            tracing.start_call(call, self.queue, waits=waits)  # waits: call, call_text
        except BaseException:
            self._slots.give()
            raise
        if not self._outbox:
            loop.call_soon(self._hand_over)
        self._outbox.append(call)
        return call, future

    def _hand_over(self) -> None:
        """Hand the calls made in one turn of the loop to the I/O thread at once: one
        lock and one wake-up for them all (each is a system call, and a wait for the GIL
        while the I/O thread is busy)."""
        calls, self._outbox = self._outbox, []
        driver = self._driver
        if driver is None or not calls:
            return
        if not self._closing:
            driver.hand_over(calls)
            return
        closed = ClientClosedError("The client was closed with this call in flight.")
        for call in calls:
            driver.registry.settle(call, closed, ok=False)

    async def _reserve(self, seconds: float) -> None:
        """Take a slot of the window, waiting up to ``seconds``."""
        if self._slots.try_take():
            return
        if self._watchdog is None and seconds != math.inf:
            self._arm_watchdog()
        if await self._slots.take(seconds):
            return
        raise CallTimeoutError(
            f"The client's window of {self.window} calls stayed full for {seconds} s.",
            url=redact(self.url),
            queue=self.queue,
            timeout=seconds,
        )

    async def _wait(self, call: Call, future: asyncio.Future[Any]) -> Any:
        """The call's result; a cancelled wait abandons the call (its registry slot and
        pending entry are freed here and now)."""
        waiting = self._waiting
        waiting.add(call)
        if self._watchdog is None and call.timeout != math.inf:
            self._arm_watchdog()
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(call, ClientClosedError("The call was cancelled."))
            raise
        finally:
            waiting.discard(call)

    def _arm_watchdog(self) -> None:
        loop = self._loop
        if loop is not None and not self._closing:
            self._watchdog = loop.call_later(_LATE, self._watch)

    def _watch(self) -> None:
        """Every ``_LATE`` seconds while calls wait: fail the waits for a slot of the
        window that ran out of time, and the calls ``_LATE`` past their deadline (the I/O
        thread should have expired them, but it is stuck: in a broker round trip, say;
        the deadline is kept all the same). One timer for the client, not one per call
        (a timer per call cost the loop more than the rest of a call)."""
        self._watchdog = None
        driver = self._driver
        if driver is None:
            return
        now = time.monotonic()
        waiting = self._slots.expire(now)
        for call in [call for call in self._waiting if call.deadline < now - _LATE]:
            driver.abandon(call, driver.deadline_error(call))
        if waiting or any(call.timeout != math.inf for call in self._waiting):
            self._arm_watchdog()

    def _abandon(self, call: Call, error: BaseException) -> None:
        driver = self._driver
        if driver is None or call.done:
            return
        if call in self._outbox:  # not handed over yet: nobody else knows of it
            self._outbox.remove(call)
            driver.registry.settle(call, error, ok=False)
        else:
            driver.abandon(call, error)

    def _open_driver(self) -> Driver:
        driver = self._driver
        if driver is None or self._closing:
            raise ClientClosedError(
                "The client is closed."
                if self._closing
                else "The AsyncClient is not connected: use `async with AsyncClient(...)` or "
                "`await client.connect()` first."
            )
        if threading.get_ident() != self._loop_thread:
            raise ClientClosedError(
                "An AsyncClient serves the event loop (and thread) it was connected in; "
                "use fibrpc.Client from other threads."
            )
        return driver

    # -- settling (the I/O thread, or the loop) -------------------------------------------

    def _settled(self, future: asyncio.Future[Any], outcome: Any, ok: bool) -> None:
        """A call settled: resolve its future now if this is the loop's thread; else queue
        it, and wake the loop unless the I/O thread is inside a turn (it wakes the loop
        once at the end: ``_wake``)."""
        if threading.get_ident() == self._loop_thread:
            _resolve(future, outcome, ok)
            return
        self._settled_queue.append((future, outcome, ok))
        driver = self._driver
        if driver is None or driver.stepping != threading.get_ident():
            self._wake()

    def _wake(self) -> None:
        """Have the loop resolve what has settled (once per turn of the connection)."""
        if self._settled_queue and not self._wake_pending:
            self._wake_pending = True
            loop = self._loop
            try:
                if loop is not None:
                    loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody awaits these any more
                self._settled_queue.clear()

    def _drain(self) -> None:
        self._wake_pending = False
        queue = self._settled_queue
        while queue:
            future, outcome, ok = queue.popleft()
            _resolve(future, outcome, ok)


def _resolve(future: asyncio.Future[Any], outcome: Any, ok: bool) -> None:
    if future.done():  # cancelled by its caller
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)
