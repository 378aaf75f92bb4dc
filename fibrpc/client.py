"""The client: many correlated calls in flight on one connection, singly or in batches.

Three parts, each testable on its own (after aio-pika's RPC pattern, whose transport
lives elsewhere too):

* ``fibrpc.calls``: the registry of calls in flight, their deadlines and the window
  (pure bookkeeping);
* ``fibrpc.driver``: who turns the connection, and the hand-off of calls and replies
  between threads, over a ``Link`` to the broker (``fibrpc.link`` is the real one);
* this module: the public API (``call``, ``call_text``, ``submit``, ``map``, ``imap``),
  checking every argument before anything is reserved, and batching.

Replies come back through RabbitMQ's direct reply-to by default, so there is no reply
queue to declare, and a reply never outlives its client; ``reply_queue="exclusive"``
takes them on a server-named exclusive queue of the client's own instead (for clusters
of RabbitMQ 3.10, and requesters taking many replies a second: docs/client.md). Unknown
and duplicate replies are dropped and counted, never delivered.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import operator
import os
import threading
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, Final

from fibrpc import amqp, protocol, tracing
from fibrpc.calls import AS_INT, AS_INTS, AS_TEXT, Call, Registry
from fibrpc.config import (
    BROKER_MAX_MESSAGE_BYTES,
    DEFAULT_HEARTBEAT,
    DEFAULT_QUEUE,
    DEFAULT_REPLY_QUEUE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    DEFAULT_WINDOW,
    REPLY_QUEUES,
)
from fibrpc.driver import TICK, Driver, too_large
from fibrpc.errors import CallTimeoutError, ClientClosedError, ConfigError, ErrorCode, RequestError
from fibrpc.link import AmqpLink
from fibrpc.numbers import DEFAULT_ALGORITHM, estimate_digits
from fibrpc.tls import TLSOptions
from fibrpc.urls import redact, split_urls

log = logging.getLogger(__name__)

#: Automatic batches stop at this many values, or at this many estimated reply bytes.
#: 10,000 small results are 80 KB in binary; the broker's cost is per message, so a
#: batched run went from 2.1 to 5.0 M calls/s here against 1,000 (bench/README.md).
AUTO_BATCH_VALUES: Final = 10_000
AUTO_BATCH_BYTES: Final = 1 << 20
_FORK_LOCK = threading.Lock()


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds: any positive number; ``math.inf`` for no deadline.

    Raises ``ConfigError`` for zero, a negative number, NaN or anything not a number
    (a bool included), before anything is sent.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError(f"A timeout is a number of seconds; got {timeout!r}.")
    try:
        seconds = float(timeout)
    except OverflowError:  # an int too large for a float: no deadline that matters
        seconds = math.inf
    if not seconds > 0:  # NaN too
        raise ConfigError(
            f"A timeout must be more than 0 seconds (math.inf: no deadline); got {timeout!r}."
        )
    return seconds


def check_urls(url: str | Sequence[str], tls: TLSOptions | None) -> tuple[str, ...]:
    """The broker's nodes named by ``url`` (one URL, a list, or one string of them
    separated by commas), each one read as pika will read it, with ``tls``. Raises
    ``ConfigError`` for a URL pika cannot read or a bad TLS option."""
    urls = split_urls(url)
    for node in urls:
        amqp.parameters(node, tls=tls)
    return urls


def check_window(window: object) -> int:
    """``window`` as an int of 1 or more (not a bool); raises ``ConfigError``."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be a whole number of 1 or more; got {window!r}.")
    return window


def check_reply_queue(reply_queue: object) -> str:
    """``reply_queue`` if it is one of ``fibrpc.config.REPLY_QUEUES`` (``direct`` or
    ``exclusive``); raises ``ConfigError`` naming it otherwise."""
    if not isinstance(reply_queue, str) or reply_queue not in REPLY_QUEUES:
        raise ConfigError(
            f"reply_queue must be one of {', '.join(map(repr, REPLY_QUEUES))}; got {reply_queue!r}."
        )
    return reply_queue


def check_n(n: object) -> int:
    """``n`` as an int: any integral value (numpy's integers too, through
    ``operator.index``), never a bool. Raises ``RequestError`` (``not_an_integer``, as a
    server would answer) for anything else, before anything is sent."""
    if type(n) is int:
        return n
    if not isinstance(n, bool):
        try:
            return operator.index(n)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise RequestError(
        ErrorCode.NOT_AN_INTEGER,
        f"n must be an integer (an int, or a value operator.index takes, such as "
        f"numpy.int64); got {n!r}, a {type(n).__name__}.",
    )


def encode(
    n: object, algo: str, as_: int, max_message: int = 0, *, binary: bool = True
) -> tuple[int | list[int], tuple[bytes, str | None, str | None]]:
    """Check ``n`` and encode its request: returns n as an int (or, for a batch, the
    list of ints ``batches`` checked) and the request's body, content type and AMQP
    ``type`` (``protocol.encode_request``). ``as_`` is what the reply becomes
    (``AS_INTS``: n is a batch). Raises ``RequestError`` for an n that is not an
    integer (a list included, unless a batch), an unknown ``algo``, and a body over
    ``max_message`` bytes (the broker's limit once it has named one; else RabbitMQ's
    default, 16 MiB). ``binary``: a batch goes in the binary form (``protocol.U64``)."""
    if as_ != AS_INTS or not isinstance(n, list):
        n = check_n(n)
    encoded = protocol.encode_request(n, algo, binary=binary)
    largest = max_message or BROKER_MAX_MESSAGE_BYTES
    if len(encoded[0]) > largest:
        raise too_large(len(encoded[0]), largest)
    return n, encoded


class _Callbacks:
    """Runs futures' done-callbacks, in the order they came, on a thread of its own
    (started on first use): one wake-up serves every callback queued meanwhile, so a
    pipelined run pays a thread switch per turn of the connection, not per call."""

    def __init__(self, deferred: Any = None) -> None:
        """``deferred()``: whether to leave the waking to ``wake``, called at the end of
        the connection's turn (true on the thread inside the turn)."""
        self._deferred = deferred
        self._queue: collections.deque[tuple[Any, concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def run(self, fn: Any, future: concurrent.futures.Future[Any]) -> None:
        """Queue ``fn(future)``; run it here if the runner is closed."""
        if self._closed:
            _call_back(fn, future)
            return
        self._queue.append((fn, future))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._main, name="fibrpc-callbacks", daemon=True
                    )
                    self._thread.start()
        if self._deferred is None or not self._deferred():
            self.wake()

    def wake(self) -> None:
        """Wake the runner if callbacks wait (the runner clears the event before it drains
        the queue, so a set event means it will see them)."""
        if self._queue and not self._wake.is_set():
            self._wake.set()

    def close(self) -> None:
        """Run what is queued, then stop the thread (without waiting for it)."""
        self._closed = True
        self._wake.set()

    def _main(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            while queue:
                fn, future = queue.popleft()
                _call_back(fn, future)
            if self._closed:
                return


class _Future(concurrent.futures.Future[Any]):
    """A future whose done-callbacks run on the client's callback thread, never on the
    thread that drives the connection (where a slow one would stall every call)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    def add_done_callback(self, fn: Any) -> None:
        client = self._client
        super().add_done_callback(lambda future: client._run_callback(fn, future))


class Client:
    """A thread-safe RPC client for fibrpc servers (a context manager).

    ``url`` is an ``amqp://`` or ``amqps://`` URL, or the nodes of a cluster (a list of
    URLs, or one string of them separated by commas): the client connects to the first
    that answers and, when its connection is lost, fails over to the next, re-sending
    its calls in flight; ``queue`` is the request queue;
    ``timeout`` the seconds a call waits for its reply by default (``math.inf``: no
    limit); ``window`` the most calls (or batches) in flight at once; ``heartbeat`` the
    AMQP heartbeat in seconds; ``tls`` the ``TLSOptions`` of an ``amqps://`` URL;
    ``reply_queue`` where replies come: ``"direct"`` (RabbitMQ's direct reply-to) or
    ``"exclusive"`` (a server-named exclusive queue of the client's own, new on every
    connection; docs/client.md says when to choose it).

    Connects at once (within ``timeout``, at most 15 s). Raises ``ConfigError`` for a
    bad setting and ``BrokerError`` when the broker cannot be reached or refuses.
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
        self.urls = check_urls(url, tls)  # a bad URL: ConfigError, here
        self.url = self.urls[0]
        self.queue = queue
        self.reply_queue = check_reply_queue(reply_queue)
        self._heartbeat = heartbeat
        self._tls = tls
        self._start()

    def _start(self) -> None:
        """Everything but the settings: the calls in flight, the connection and its I/O
        thread. Done again, from scratch, in a forked child (``_after_fork``)."""
        self._pid = os.getpid()
        self._prefix = uuid.uuid4().hex[:12] + "."
        self._ids = itertools.count()
        self._closing = False
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
        self._callbacks = _Callbacks(lambda: driver.stepping == threading.get_ident())
        driver.after_step = self._callbacks.wake
        self._driver = driver
        self._driver.start()

    # -- public API -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None) -> int:
        """F(n) computed by a server with ``algo``, waiting up to ``timeout`` seconds
        (the client's by default).

        Raises ``RequestError`` if n is refused (by the server, or here when it is not an
        integer), ``CallTimeoutError`` after ``timeout``, ``NoServerError`` when no
        server consumes the queue, ``ConfigError`` for a bad timeout, ``BrokerError``.
        """
        call, held = self._submit(n, algo, timeout, AS_INT, hold=True)
        result: int = self._driver.wait(call, held)  # the driver after _submit: a fork renews it
        return result

    def call_text(self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None) -> str:
        """F(n) as decimal text, exactly as the server sent it (no int conversion: the
        way to take results of millions of digits). Raises as ``call`` does."""
        call, held = self._submit(n, algo, timeout, AS_TEXT, hold=True)
        text: str = self._driver.wait(call, held)
        return text

    def submit(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> concurrent.futures.Future[int]:
        """Send one call now and return its future (of an int); blocks while the window
        is full. Argument errors raise here, the call's own errors from the future.

        The I/O thread drives the connection until the future resolves. Callbacks added
        with ``add_done_callback`` run on a thread of the client's own, never on the one
        that drives the connection: a slow callback, or one that calls the client,
        holds up nobody else's calls.
        """
        future: concurrent.futures.Future[int] = _Future(self)
        self._submit(n, algo, timeout, AS_INT, future=future)
        self._driver.notify_io()
        return future

    def map(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """F(n) for every n, as a list in order, batched and pipelined (see ``imap``)."""
        out: list[int] = []
        for results in self._imap(ns, algo, batch_size, timeout):
            out.extend(results)  # a batch at a time: no Python step per value
        return out

    def imap(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[int]:
        """Stream F(n) for every n of a (possibly endless) iterable, in order.

        Values are packed ``batch_size`` to a message (by default up to 10,000, or fewer
        when their results would pass about 1 MB), and up to ``window`` messages are in
        flight at once. ``batch_size=1`` sends one message per call. ``timeout`` is per
        message. The first refused batch raises its ``RequestError``. Leaving the loop
        early (``break``, an exception, the ``close()`` of what ``imap`` returns or of
        the client) abandons what is in flight at once: the window is free, and servers
        skip those requests once their deadline passes.
        """
        return Stream(self._imap(ns, algo, batch_size, timeout))

    def _imap(
        self, ns: Iterable[int], algo: str, batch_size: int | None, timeout: float | None
    ) -> Generator[list[int], None, None]:
        """``imap``, a message's results at a time (a list of one with ``batch_size=1``)."""
        chunks, as_ = messages(ns, algo, batch_size)
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        in_flight: collections.deque[Call] = collections.deque()
        try:
            chunk: Any = next(chunks, END)
            while chunk is not END or in_flight:
                while chunk is not END:
                    call, _ = self._submit(chunk, algo, timeout, as_, block=not in_flight)
                    if call is None:
                        break
                    in_flight.append(call)
                    chunk = next(chunks, END)
                result = self._driver.wait(in_flight.popleft())
                yield [result] if as_ == AS_INT else result
        finally:
            if in_flight:
                gone = ClientClosedError("imap was left with this call in flight.")
                for call in in_flight:
                    self._driver.abandon(call, gone)

    def close(self) -> None:
        """Fail the calls still in flight with ``ClientClosedError`` and disconnect;
        returns within about a second, whatever the broker does."""
        if self._closing:
            return
        self._closing = True
        self._driver.close()
        self._callbacks.close()

    @property
    def in_flight(self) -> int:
        """Calls sent (or about to be) and not yet answered."""
        return self._driver.in_flight

    @property
    def dropped_unknown(self) -> int:
        """Replies dropped because no call of this client had their correlation id."""
        return self._driver.dropped_unknown

    @property
    def dropped_duplicates(self) -> int:
        """Replies dropped because their call was answered already (a redelivery)."""
        return self._driver.dropped_duplicates

    # -- submitting (any thread) ----------------------------------------------------------

    def _submit(
        self,
        n: int | list[int],
        algo: str,
        timeout: float | None,
        as_: int,
        *,
        block: bool = True,
        future: concurrent.futures.Future[Any] | None = None,
        hold: bool = False,
    ) -> tuple[Any, bool]:
        """Check, encode and hand over one call; return it (None if ``block`` is false
        and the window is full) and whether this thread kept the turn (``hold``: see
        ``Driver.submit``). Nothing is reserved before every argument is checked."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._closing:
            raise ClientClosedError("The client is closed.")
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        driver = self._driver
        n, encoded = encode(n, algo, as_, driver.max_message, binary=driver.binary_requests)
        if not self._driver.registry.reserve(seconds, block=block):
            if not block:
                return None, False
            raise CallTimeoutError(
                f"The client's window of {self.window} calls stayed full for {seconds} s.",
                url=redact(self.url),
                queue=self.queue,
                timeout=seconds,
            )
        call = Call(f"{self._prefix}{next(self._ids)}", n, algo, as_, seconds, encoded, future)
        tracing.start_call(call, self.queue, waits=hold)
        return call, self._driver.submit(call, hold=hold)

    def _run_callback(self, fn: Any, future: concurrent.futures.Future[Any]) -> None:
        """Run a future's done-callback on the client's callback thread."""
        self._callbacks.run(fn, future)

    def _after_fork(self) -> None:
        """This client was made in another process, which forked: its connection, its
        I/O thread and its calls belong to the parent. Start afresh, with a connection
        of this process's own (the parent's is left untouched)."""
        with _FORK_LOCK:
            if self._pid == os.getpid():
                return
            log.info(
                "client made in process %d, used in process %d: opening a connection of its own",
                self._pid,
                os.getpid(),
            )
            self._start()


class Stream(Iterator[int]):
    """What ``imap`` returns: the values of a generator of batches, one by one, and its
    ``close()`` (which abandons the calls in flight, as leaving a loop does).

    A ``for`` loop (or ``list``, ``islice``...) iterates ``itertools.chain`` over the
    batches, which hands out each batch's values in C: the generator runs once a message,
    not once a value (that step was a third of the client's time in a batched run)."""

    __slots__ = ("_batches", "_values")

    def __init__(self, batches: Generator[list[int], None, None]) -> None:
        self._batches = batches
        self._values = itertools.chain.from_iterable(batches)

    def __iter__(self) -> Iterator[int]:
        return self._values

    def __next__(self) -> int:
        return next(self._values)

    def close(self) -> None:
        """Stop: the calls in flight are abandoned, their window given back."""
        self._batches.close()


def _call_back(fn: Any, future: concurrent.futures.Future[Any]) -> None:
    try:
        fn(future)
    except Exception:
        log.exception("a done-callback of a fibrpc future raised")


def messages(ns: Iterable[object], algo: str, batch_size: int | None) -> tuple[Iterator[Any], int]:
    """How ``imap`` cuts ``ns`` into messages, and what each reply becomes: one n a
    message (``AS_INT``) with ``batch_size=1``, else ``batches`` (``AS_INTS``). Raises
    ``ConfigError`` for a ``batch_size`` under 1 (or a bool)."""
    if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"batch_size must be 1 or more; got {batch_size!r}.")
    if batch_size == 1:
        return iter(ns), AS_INT
    return batches(ns, batch_size, algo), AS_INTS


def batches(ns: Iterable[object], size: int | None, algo: str) -> Iterator[list[int]]:
    """Chunks of ``ns`` (each n checked by ``check_n``): ``size`` values each, or sized
    automatically by reply bytes. The usual chunk, all ints, is checked in C
    (``map(type, ...)``): a Python step per value costs batched calls a tenth."""
    it = iter(ns)
    if size is not None:
        while sized := list(itertools.islice(it, size)):
            if set(map(type, sized)) == _INT:
                yield sized  # type: ignore[misc]  # every member is an int: checked above
            else:
                yield [check_n(n) for n in sized]
        return
    limit = 1 if algo == "naive" else AUTO_BATCH_VALUES
    chunk: list[int] = []
    budget = AUTO_BATCH_BYTES
    for value in it:
        n = value if type(value) is int else check_n(value)
        cost = estimate_digits(n) if n > 93 else 24
        if chunk and (len(chunk) >= limit or cost > budget):
            yield chunk
            chunk, budget = [], AUTO_BATCH_BYTES
        chunk.append(n)
        budget -= cost
    if chunk:
        yield chunk


_INT: Final = {int}
#: The end of an iterable of n (None is a value there, refused as not an integer).
END: Final = object()
