"""The client for asyncio programs: ``AsyncClient``.

It is the threaded client's machinery with an asyncio face. The registry
(``fibrpc.calls``), the driver and its I/O thread (``fibrpc.driver``) and the link
(``fibrpc.link``) are the same objects, so every guarantee of ``fibrpc.Client`` holds
here as it is: the same errors, deadlines, window, batching, no-server detection,
failover and re-sending. What differs is only who waits:

* the event loop never touches the connection: a call is encoded on the loop and handed
  to the driver's I/O thread (``Driver.hand_over``), which publishes it and takes in the
  replies;
* replies settle on the I/O thread, which queues them and wakes the loop once per turn
  of the connection (``loop.call_soon_threadsafe``), not once per reply;
* the window is an ``asyncio.Semaphore``: a call waiting for a slot awaits, it never
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
import itertools
import math
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Final

from fibrpc import amqp
from fibrpc.calls import AS_INT, AS_INTS, AS_TEXT, Call, Registry
from fibrpc.client import batches, check_timeout, check_window, encode
from fibrpc.config import (
    DEFAULT_HEARTBEAT,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    DEFAULT_WINDOW,
)
from fibrpc.driver import TICK, Driver
from fibrpc.errors import CallTimeoutError, ClientClosedError, ConfigError
from fibrpc.link import AmqpLink
from fibrpc.numbers import DEFAULT_ALGORITHM

#: Seconds past its deadline after which the loop fails a call itself, if the I/O
#: thread has not (a connection stuck in a round trip, say): as the threaded client.
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


class AsyncClient:
    """An RPC client for fibrpc servers for asyncio programs (an async context manager).

    The settings are ``fibrpc.Client``'s: ``url`` (one ``amqp://`` or ``amqps://`` URL,
    or the nodes of a cluster: a list, or one string separated by commas), ``queue``,
    ``timeout`` (seconds a call waits for its reply by default; ``math.inf``: no limit),
    ``window`` (the most calls or batches in flight), ``heartbeat`` (seconds), ``tls``.
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
        tls: amqp.TLSOptions | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.window = check_window(window)
        self.urls = amqp.split_urls(url)
        self.url = self.urls[0]
        self.queue = queue
        self._heartbeat = heartbeat
        self._tls = tls
        for node in self.urls:
            amqp.parameters(node, tls=tls)  # a URL pika cannot read, a bad TLS option
        self._prefix = uuid.uuid4().hex[:12] + "."
        self._ids = itertools.count()
        self._driver: Driver | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._slots = asyncio.Semaphore(window)
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
        values = self.imap(ns, algo, batch_size=batch_size, timeout=timeout)
        return [value async for value in values]

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
        to 1,000, or fewer when their results would pass about 1 MB), up to ``window``
        messages in flight; ``timeout`` is per message; the first refused batch raises
        its ``RequestError``. Leaving the loop early (``break``, an exception,
        cancellation) gives back the window at once.
        """
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ConfigError(f"batch_size must be 1 or more; got {batch_size!r}.")
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        chunks: Iterator[int | list[int]]
        chunks = iter(ns) if batch_size == 1 else batches(ns, batch_size, algo)
        as_ = AS_INT if batch_size == 1 else AS_INTS
        slots = self._slots
        in_flight: collections.deque[tuple[Call, asyncio.Future[Any]]] = collections.deque()
        try:
            chunk = next(chunks, None)
            while chunk is not None or in_flight:
                # Fill the window; wait for a slot only when nothing is in flight.
                while chunk is not None and (not in_flight or not slots.locked()):
                    in_flight.append(await self._send(chunk, algo, seconds, as_))
                    chunk = next(chunks, None)
                call, future = in_flight.popleft()
                try:
                    result = await self._wait(call, future)
                finally:
                    slots.release()
                if as_ == AS_INT:
                    yield result
                else:
                    for value in result:
                        yield value
        finally:
            if in_flight:
                gone = ClientClosedError("imap was left with this call in flight.")
                for call, _ in in_flight:
                    self._abandon(call, gone)
                    slots.release()

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
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        call, future = await self._send(n, algo, seconds, as_)
        try:
            return await self._wait(call, future)
        finally:
            self._slots.release()

    async def _send(
        self, n: object, algo: str, seconds: float, as_: int
    ) -> tuple[Call, asyncio.Future[Any]]:
        """Check, encode and hand over one call, once a slot of the window is free;
        nothing is reserved before every argument is checked. The caller releases the
        slot once it is done with the call."""
        driver = self._open_driver()
        n, encoded = encode(n, algo, driver.max_message)
        await self._reserve(seconds)
        try:
            if self._closing:
                raise ClientClosedError("The client is closed.")
            while not driver.registry.reserve(seconds, block=False):
                # Rare: a call cancelled while the I/O thread was publishing it holds
                # its registry slot until its reply or deadline, a moment later.
                await asyncio.sleep(TICK)
            loop = self._loop
            assert loop is not None
            future = loop.create_future()
            call = Call(
                f"{self._prefix}{next(self._ids)}",
                n,
                algo,
                as_,
                seconds,
                encoded,
                _Waiter(self, future),
            )
            driver.hand_over(call)
        except BaseException:
            self._slots.release()
            raise
        return call, future

    async def _reserve(self, seconds: float) -> None:
        """Take a slot of the window, waiting up to ``seconds``."""
        slots = self._slots
        if not slots.locked():
            await slots.acquire()  # free: taken without yielding
            return
        try:
            if seconds == math.inf:
                await slots.acquire()
            else:
                async with asyncio.timeout(seconds):
                    await slots.acquire()
        except TimeoutError:
            raise CallTimeoutError(
                f"The client's window of {self.window} calls stayed full for {seconds} s.",
                url=amqp.redact(self.url),
                queue=self.queue,
                timeout=seconds,
            ) from None

    async def _wait(self, call: Call, future: asyncio.Future[Any]) -> Any:
        """The call's result; a cancelled wait abandons the call (its registry slot and
        pending entry are freed here and now)."""
        late = None
        if call.timeout != math.inf and self._loop is not None:
            late = self._loop.call_at(
                self._loop.time() + call.timeout + _LATE, self._fail_late, call
            )
        try:
            return await future
        except asyncio.CancelledError:
            self._abandon(call, ClientClosedError("The call was cancelled."))
            raise
        finally:
            if late is not None:
                late.cancel()

    def _fail_late(self, call: Call) -> None:
        """The I/O thread should have expired ``call`` by now: it is stuck. The deadline
        is kept all the same."""
        if not call.done and self._driver is not None:
            self._driver.abandon(call, self._driver.timed_out(call))

    def _abandon(self, call: Call, error: BaseException) -> None:
        if self._driver is not None and not call.done:
            self._driver.abandon(call, error)

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
