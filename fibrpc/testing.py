"""Broker-free stand-ins for the client, for the tests of applications that call fibrpc.

After dramatiq's ``StubBroker``: ``StubClient`` has the API of ``fibrpc.Client`` and
``AsyncStubClient`` that of ``fibrpc.aio.AsyncClient``, and neither needs RabbitMQ or a
server. Each call goes the whole way a real one goes, minus the broker:

* the arguments are checked by the client's own checks (``check_n``, ``check_timeout``,
  its batching, the broker's 16 MiB message limit), so a bad one raises the same error
  before anything is "sent";
* the request is encoded by ``fibrpc.protocol.encode_request``: the very bytes, content
  type and AMQP ``type`` the client would publish;
* a ``fibrpc.handler.Handler``, the one every worker of ``fibrpc serve`` runs, with the
  same kernels and, by default, the same limits, decodes, bounds-checks and computes it;
* the reply is decoded by the same ``fibrpc.protocol`` functions as the client's driver
  (``decode_reply``, ``to_int``, ``to_ints``), so a refusal is the same ``RequestError``
  with the same ``ErrorCode`` a real server gives.

So the same inputs give the same results and the same errors as a real server
(``tests/test_testing.py`` holds them side by side). What a broker adds is left out:
there is no connection, no ``NoServerError``, no ``BrokerError``, and nothing is
pipelined. Importing this module imports no numba: the kernels load on the first call.

Use it where an application takes a client as a parameter::

    from fibrpc.testing import StubClient

    with StubClient() as client:
        assert my_app.total(client, [10, 20]) == 55 + 6765
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fibrpc import __version__, describe, protocol

# The client's own checks, encoding and batching: imported, not copied, so that a stub
# refuses and batches exactly as the clients do.
from fibrpc.calls import AS_INT, AS_TEXT, read_reply, wants_binary
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
)
from fibrpc.config import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MEMO_BYTES,
    DEFAULT_QUEUE,
    DEFAULT_REPLY_QUEUE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    DEFAULT_WINDOW,
    Limits,
)
from fibrpc.errors import (
    CallTimeoutError,
    ClientClosedError,
    ConfigError,
    RequestError,
    UnreadableReplyError,
)
from fibrpc.numbers import DEFAULT_ALGORITHM
from fibrpc.tls import TLSOptions
from fibrpc.urls import redact

if TYPE_CHECKING:
    from fibrpc.handler import Handler, Reply

__all__ = ["AsyncStubClient", "StubClient"]


class _Request:
    """One request as the client would publish it, and what its caller waits for."""

    __slots__ = ("algo", "as_", "body", "content_type", "n", "timeout", "type")

    def __init__(
        self,
        n: int | list[int],
        algo: str,
        as_: int,
        timeout: float,
        encoded: tuple[bytes, str | None, str | None],
    ) -> None:
        self.n = n
        self.algo = algo
        self.as_ = as_
        self.timeout = timeout
        self.body, self.content_type, self.type = encoded

    def describe(self) -> str:
        """``fib(30) with 'fast'``, or ``a batch of 1000 value(s) with 'iter'``."""
        if isinstance(self.n, list):
            return f"a batch of {len(self.n)} value(s) with {self.algo!r}"
        return f"fib({self.n}) with {self.algo!r}"


class _Stub:
    """What both stand-ins share: the settings, checked as ``Client`` checks them, and
    the way from a call's arguments to its result."""

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
        limits: Limits | None = None,
        memo_bytes: int = DEFAULT_MEMO_BYTES,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.window = check_window(window)
        self.urls = check_urls(url, tls)  # as Client: ConfigError for a URL or TLS option
        self.url = self.urls[0]
        self.queue = check_queue(queue)
        self.reply_queue = check_reply_queue(reply_queue)  # taken, and unused: no broker
        check_heartbeat(heartbeat)  # likewise
        self.limits = limits or Limits()
        self._memo_bytes = memo_bytes
        self._handler: Handler | None = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closing = False

    @property
    def in_flight(self) -> int:
        """Requests made and not yet answered: those an ``imap`` has read ahead (up to
        ``window``); a stub answers every other call before it returns."""
        return self._in_flight

    @property
    def handler(self) -> Handler:
        """The server's request handler (made on first use: it loads the kernels)."""
        if self._handler is None:
            with self._lock:
                if self._handler is None:
                    from fibrpc.handler import Handler  # noqa: PLC0415 - numba on first use

                    self._handler = Handler(self.limits, self._memo_bytes)
        return self._handler

    @property
    def dropped_unknown(self) -> int:
        """Always 0: no reply comes to a stub that it did not ask for."""
        return 0

    @property
    def dropped_duplicates(self) -> int:
        """Always 0: no request is delivered twice."""
        return 0

    def _seconds(self, timeout: float | None) -> float:
        """A call's timeout: the client's, or ``timeout`` checked (``ConfigError``)."""
        return self.timeout if timeout is None else check_timeout(timeout)

    def _check_open(self) -> None:
        """Raise ``ClientClosedError`` unless calls may be made."""
        if self._closing:
            raise ClientClosedError("The client is closed.")

    def _description(self, wait: float) -> list[describe.Description]:
        """``describe``'s answer: one server, this stub, with its limits and no counts
        (``ConfigError`` for a bad ``wait``, as the client's)."""
        if check_timeout(wait) == math.inf:
            raise ConfigError(f"describe waits a finite number of seconds; got {wait!r}.")
        now = time.time()
        data = describe.build(
            server={"id": "stub", "pid": os.getpid(), "queue": self.queue, "started": now},
            reports={},
            limits=self.limits,
            broker_max_message=None,
            version=__version__,
            host=socket.gethostname(),
            answered_by=os.getpid(),
            now=now,
        )
        return [describe.parse(describe.encode(data))]

    def _request(self, n: Any, algo: str, seconds: float, as_: int) -> _Request:
        """Check and encode one call (``fibrpc.client.encode``: ``RequestError`` for an
        n that is not an integer, or a body over the broker's 16 MiB), as the clients do:
        nothing is counted in flight before every argument is checked."""
        self._check_open()
        n, encoded = encode(n, algo, as_)
        request = _Request(n, algo, as_, seconds, encoded)
        with self._lock:
            self._in_flight += 1
        return request

    def _done(self, count: int = 1) -> None:
        with self._lock:
            self._in_flight -= count

    def _decode(self, request: _Request) -> protocol.Request | Reply:
        """What a worker makes of the request's bytes: a request, or the refusal."""
        if self._closing:
            raise ClientClosedError("The client was closed with this call in flight.")
        accept = protocol.ACCEPT_BINARY if wants_binary(request.n, request.as_) else None
        return self.handler.decode(request.body, request.content_type, request.type, accept)

    def _result(self, request: _Request, reply: Reply, started: float) -> Any:
        """The caller's result from a worker's reply, as the client's driver reads it
        (``Driver.on_reply``); ``CallTimeoutError`` if it came after the call's deadline."""
        if time.monotonic() - started > request.timeout:
            raise self._timed_out(request)
        try:
            return read_reply(reply.body, reply.content_type, request.as_)
        except RequestError:
            raise
        except Exception as exc:
            raise UnreadableReplyError(
                f"The reply to {request.describe()} could not be read: {exc}",
                url=redact(self.url),
                queue=self.queue,
            ) from exc

    def _timed_out(self, request: _Request) -> CallTimeoutError:
        url = redact(self.url)
        return CallTimeoutError(
            f"No reply to {request.describe()} within {request.timeout} s from queue "
            f"{self.queue!r} at {url}.",
            url=url,
            queue=self.queue,
            timeout=request.timeout,
        )

    def _chunks(
        self, ns: Iterable[int], algo: str, batch_size: int | None
    ) -> tuple[Iterator[Any], int]:
        """The requests' n of a ``map``: as ``Client.imap`` cuts them."""
        return messages(ns, algo, batch_size)

    def _read_ahead(
        self,
        chunks: Iterator[Any],
        pending: collections.deque[_Request],
        algo: str,
        timeout: float,
        as_: int,
    ) -> bool:
        """Fill ``pending`` up to ``window`` requests, as the client fills its window (so
        a bad n raises as soon as the client would have sent it); whether more follow."""
        while len(pending) < self.window:
            chunk = next(chunks, END)
            if chunk is END:
                return False
            pending.append(self._request(chunk, algo, timeout, as_))
        return True


class StubClient(_Stub):
    """A stand-in for ``fibrpc.Client`` that needs no broker and no server (a context
    manager; see the module docstring).

    Takes ``Client``'s settings and checks them as it does (``ConfigError`` for a bad
    timeout, window or URL; nothing connects), and two of ``fibrpc serve``'s:
    ``limits`` (a ``fibrpc.config.Limits``; by default the server's defaults) and
    ``memo_bytes`` (bytes of large results remembered; 64 MiB by default).

    Every call is computed synchronously, in the caller's thread, before it returns:
    ``naive`` 35 takes its second there. A call whose answer took longer than its timeout
    raises ``CallTimeoutError`` afterwards, as the real client would have (at its
    deadline). Thread-safe, as ``Client`` is.
    """

    def __enter__(self) -> StubClient:
        return self

    def describe(self, wait: float = 1.0) -> list[describe.Description]:
        """One description, of this stub: as ``Client.describe`` returns them."""
        self._check_open()
        return self._description(wait)

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None) -> int:
        """F(n) computed with ``algo``, as ``Client.call`` returns it.

        Raises ``RequestError`` (with a server's ``ErrorCode``) for an n or algo the
        server refuses, ``CallTimeoutError`` when the answer took more than ``timeout``
        seconds (the client's by default), ``ConfigError`` for a bad timeout and
        ``ClientClosedError`` once closed.
        """
        result: int = self._call(n, algo, timeout, AS_INT)
        return result

    def call_text(self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None) -> str:
        """F(n) as decimal text, as ``Client.call_text`` returns it. Raises as ``call``."""
        text: str = self._call(n, algo, timeout, AS_TEXT)
        return text

    def submit(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> concurrent.futures.Future[int]:
        """A future of F(n), already done when it is returned (computed here, in the
        caller's thread). Argument errors raise here, the call's own errors (a refusal,
        a timeout) from the future, as ``Client.submit``'s. A done-callback added to it
        runs at once, in the thread that adds it."""
        self._check_open()
        request = self._request(n, algo, self._seconds(timeout), AS_INT)
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            future.set_result(self._answer(request))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def map(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """F(n) for every n, as a list in order, batched as ``Client.map`` batches them."""
        return list(self.imap(ns, algo, batch_size=batch_size, timeout=timeout))

    def imap(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[int]:
        """Stream F(n) for every n of a (possibly endless) iterable, in order, as
        ``Client.imap`` does: the same batches (``batch_size``; ``timeout`` per batch),
        read up to ``window`` batches ahead, the first refused batch raising its
        ``RequestError``. Each batch is computed when its results are next."""
        chunks, as_ = self._chunks(ns, algo, batch_size)
        seconds = self._seconds(timeout)
        pending: collections.deque[_Request] = collections.deque()
        try:
            more = self._read_ahead(chunks, pending, algo, seconds, as_)
            while pending:
                result = self._answer(pending.popleft())
                if as_ == AS_INT:
                    yield result
                else:
                    yield from result
                if more:
                    more = self._read_ahead(chunks, pending, algo, seconds, as_)
        finally:
            self._done(len(pending))

    def close(self) -> None:
        """Close: every later call raises ``ClientClosedError``, as does the rest of an
        ``imap`` left running. Returns at once."""
        self._closing = True

    def _call(self, n: Any, algo: str, timeout: float | None, as_: int) -> Any:
        self._check_open()  # before the timeout, as Client
        return self._answer(self._request(n, algo, self._seconds(timeout), as_))

    def _answer(self, request: _Request) -> Any:
        """Serve ``request`` here and now, and read the reply."""
        started = time.monotonic()
        try:
            decoded = self._decode(request)
            if isinstance(decoded, protocol.Request):
                reply = self.handler.compute(decoded)
            else:
                reply = decoded
            return self._result(request, reply, started)
        finally:
            self._done()


class AsyncStubClient(_Stub):
    """A stand-in for ``fibrpc.aio.AsyncClient`` that needs no broker and no server
    (an async context manager; see the module docstring). Takes the same settings as
    ``StubClient``, checked the same way. As ``AsyncClient``, it is opened by ``async
    with`` (or ``await connect()``) and then serves that event loop's thread only.

    A request is decoded and, when it is light, computed inline, in the event loop:
    microseconds, and nothing else runs meanwhile, so a test's order of events is the
    order of its awaits. A heavy one (what a worker of ``fibrpc serve`` moves off its I/O
    thread: ``naive`` past 22, ``fast`` past about n = 50,000 and not remembered) is
    computed in a thread (``asyncio.to_thread``), as ``AsyncClient`` never blocks the
    event loop either; its timeout is then kept at its deadline (``CallTimeoutError``), and
    cancelling the awaiting task returns at once (the thread finishes its computation, as
    a worker would, and its result is dropped).
    """

    _loop_thread: int | None = None

    async def __aenter__(self) -> AsyncStubClient:
        await self.connect()
        return self

    async def describe(self, wait: float = 1.0) -> list[describe.Description]:
        """One description, of this stub: as ``AsyncClient.describe`` returns them."""
        self._check_open()
        return self._description(wait)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> int:
        """F(n) computed with ``algo``. Raises as ``StubClient.call`` does."""
        result: int = await self._answer(self._request(n, algo, self._seconds(timeout), AS_INT))
        return result

    async def call_text(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> str:
        """F(n) as decimal text. Raises as ``StubClient.call`` does."""
        text: str = await self._answer(self._request(n, algo, self._seconds(timeout), AS_TEXT))
        return text

    async def map(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """F(n) for every n, as a list in order (see ``imap``)."""
        return [
            value async for value in self.imap(ns, algo, batch_size=batch_size, timeout=timeout)
        ]

    async def imap(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[int]:
        """F(n) for every n of an iterable, in order, batched and read ahead as
        ``StubClient.imap``; ``async for`` it."""
        chunks, as_ = self._chunks(ns, algo, batch_size)
        seconds = self._seconds(timeout)
        pending: collections.deque[_Request] = collections.deque()
        try:
            more = self._read_ahead(chunks, pending, algo, seconds, as_)
            while pending:
                result = await self._answer(pending.popleft())
                if as_ == AS_INT:
                    yield result
                else:
                    for value in result:
                        yield value
                if more:
                    more = self._read_ahead(chunks, pending, algo, seconds, as_)
        finally:
            self._done(len(pending))

    async def connect(self) -> None:
        """What ``async with`` does: calls may be made from now on, in this event loop's
        thread. Raises ``ClientClosedError`` if the client is open already, or closed."""
        if self._closing or self._loop_thread is not None:
            raise ClientClosedError("This AsyncClient is open already, or closed.")
        asyncio.get_running_loop()  # RuntimeError outside a loop, as AsyncClient
        self._loop_thread = threading.get_ident()

    async def close(self) -> None:
        """Close: every later call raises ``ClientClosedError``. Returns at once."""
        self._closing = True

    def _check_open(self) -> None:
        """As ``AsyncClient``: ``ClientClosedError`` once closed, before ``connect``, or
        from another thread than its event loop's."""
        if self._closing or self._loop_thread is None:
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

    async def _answer(self, request: _Request) -> Any:
        """Serve ``request``: inline if light, in a thread if heavy (class docstring)."""
        started = time.monotonic()
        try:
            decoded = self._decode(request)
            if not isinstance(decoded, protocol.Request):
                reply = decoded
            elif not self.handler.is_heavy(decoded):
                reply = self.handler.compute(decoded)
            else:
                work = asyncio.to_thread(self.handler.compute, decoded)
                limit = None if math.isinf(request.timeout) else request.timeout
                try:
                    reply = await asyncio.wait_for(work, limit)
                except TimeoutError:
                    raise self._timed_out(request) from None
                if self._closing:
                    raise ClientClosedError("The client was closed with this call in flight.")
            return self._result(request, reply, started)
        finally:
            self._done()
