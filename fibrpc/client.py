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
import contextlib
import itertools
import logging
import math
import operator
import os
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, Final

from fibrpc import amqp, control, describe, protocol, tracing
from fibrpc.callerrors import too_large
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
from fibrpc.driver import TICK, Driver
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

    A timeout longer than ``MAX_TIMEOUT`` (about 292 years) is no deadline (``math.inf``):
    none that long can be kept, and its milliseconds would overflow a message's TTL.
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
    return seconds if seconds <= MAX_TIMEOUT else math.inf


#: The longest timeout kept as a deadline, in seconds (threading's limit, 2**63 ns).
MAX_TIMEOUT: Final = threading.TIMEOUT_MAX


def check_heartbeat(heartbeat: object) -> int:
    """``heartbeat`` as whole seconds, 0 (none) to 65,535 (AMQP's field is 16 bits);
    else ``ConfigError``."""
    if type(heartbeat) is not int or not 0 <= heartbeat <= MAX_HEARTBEAT:
        raise ConfigError(
            f"heartbeat must be a whole number of seconds from 0 (none) to {MAX_HEARTBEAT}; "
            f"got {heartbeat!r}."
        )
    return heartbeat


#: The longest AMQP heartbeat, in seconds: connection.tune's field is a short.
MAX_HEARTBEAT: Final = 65535


def check_queue(queue: object) -> str:
    """``queue`` if it names a queue (1 to 255 bytes of UTF-8); else ``ConfigError``
    (an empty name would be one the broker makes up)."""
    if type(queue) is not str or not 0 < len(queue.encode("utf-8", "replace")) <= 255:
        raise ConfigError(f"queue must be a queue's name, 1 to 255 bytes; got {queue!r}.")
    return queue


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
        f"numpy.int64); got {n!r}, of type {type(n).__name__}.",
    )


def encode(
    n: object, algo: str, as_: int, max_message: int = 0, *, binary: bool = True
) -> tuple[int | list[int], tuple[bytes, str | None, str | None]]:
    """Check ``n`` and encode its request: returns n as an int (or, for a batch, the
    list of ints ``Chunks`` checked) and the request's body, content type and AMQP
    ``type`` (``protocol.encode_request``). ``as_`` is what the reply becomes
    (``AS_INTS``: n is a batch). Raises ``RequestError`` for an n that is not an
    integer (a list included, unless a batch), an n of 2**64 or more (no server computes
    it: ``out_of_range``), an ``algo`` that is not a str, and a body over
    ``max_message`` bytes (the broker's limit once it has named one; else RabbitMQ's
    default, 16 MiB). ``binary``: a batch goes in the binary form (``protocol.U64``)."""
    if type(n) is int and 0 <= n < _SMALL_N_END and as_ != AS_INTS and type(algo) is str:
        # The usual call, a small n: its request is the table's (encode_request's text).
        return n, (_SMALL_BODIES[n], None, None if algo == DEFAULT_ALGORITHM else algo)
    check_algo(algo)
    if as_ != AS_INTS or not isinstance(n, list):
        n = check_n(n)
        if n > MAX_N:
            raise _too_large_n(n)
        encoded = protocol.encode_request(n, algo, binary=binary)
    else:
        packed: tuple[bytes, str | None, str | None] | None = None
        with contextlib.suppress(ValueError):  # not packed, and an n past int's text limit
            packed = protocol.encode_request(n, algo, binary=True) if binary else None
        if packed is not None and packed[1] == protocol.U64:
            encoded = packed
        else:
            # As JSON (rare): every n checked first; a negative n is the server's to refuse.
            _check_batch_range(n)
            encoded = protocol.encode_request(n, algo)
    largest = max_message or BROKER_MAX_MESSAGE_BYTES
    if len(encoded[0]) > largest:
        raise too_large(len(encoded[0]), largest)
    return n, encoded


#: The n whose request bodies are made once (``encode``): those of light calls and more.
_SMALL_N_END: Final = 128
_SMALL_BODIES: Final = tuple(str(n).encode("ascii") for n in range(_SMALL_N_END))

#: The largest n a request may carry: 2**64 - 1 (F(n) past it would have quintillions of
#: digits; every server's bound is far lower).
MAX_N: Final = 2**64 - 1


def _check_batch_range(ns: list[int]) -> None:
    """Raise ``RequestError`` naming the first member of ``ns`` over ``MAX_N``."""
    if not ns or max(ns) <= MAX_N:
        return
    for i, n in enumerate(ns):
        if n > MAX_N:
            error = _too_large_n(n)
            raise RequestError(error.code, f"Batch member {i}: {error.message}")


def _too_large_n(n: int) -> RequestError:
    return RequestError(
        ErrorCode.OUT_OF_RANGE,
        f"n of {n.bit_length():,} bits is too large to send: no server computes F(n) for "
        f"n of 2**64 or more.",
    )


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
    thread that drives the connection (where a slow one would stall every call); its
    ``cancel()`` gives the call up and tells the servers (``fibrpc.control``)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client
        self.call: Call | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        call = self.call
        if call is not None:
            self._client._driver.abandon(call, ClientClosedError("The call was cancelled."))
        return True

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
        self.queue = check_queue(queue)
        self.reply_queue = check_reply_queue(reply_queue)
        self._heartbeat = check_heartbeat(heartbeat)
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
                # Fill the window, giving back each answer as soon as it is in: with an
                # input that pauses, results come while the input is still coming.
                while chunk is not END and not (in_flight and in_flight[0].done):
                    call, _ = self._submit(chunk, algo, timeout, as_, block=not in_flight)
                    if call is None:
                        break
                    in_flight.append(call)
                    if chunks.slow:  # reading the input may take a while: let the I/O
                        self._driver.notify_io()  # thread take the replies meanwhile
                    chunk = next(chunks, END)
                result = self._driver.wait(in_flight.popleft())
                yield [result] if as_ == AS_INT else result
        finally:
            if in_flight:
                gone = ClientClosedError("imap was left with this call in flight.")
                for call in in_flight:
                    self._driver.abandon(call, gone)

    def close(self) -> None:
        """Fail the calls still in flight with ``ClientClosedError``, tell the servers
        they are given up on, and disconnect; returns within about a second, whatever
        the broker does."""
        if self._closing:
            return
        self._closing = True
        if self._pid != os.getpid():
            # Made in a parent process, never used here: its connection, I/O thread and
            # locks are the parent's (a lock another thread held at the fork stays held
            # here for good). Nothing of this process's own to close.
            return
        self._driver.close()
        self._callbacks.close()

    def describe(self, wait: float = 1.0) -> list[describe.Description]:
        """What every server on the queue says it is (``fibrpc.describe.Description``):
        version, algorithms and bounds, limits, forms, per-algorithm counts, workers.
        Each server answers once; this returns those that answered within ``wait``
        seconds (none: an empty list), sorted by host and pid. Raises ``ConfigError``
        for a bad ``wait``, ``ClientClosedError`` if the client is closed, and
        ``UnreadableReplyError`` for an answer that is not a description."""
        seconds = check_timeout(wait)
        if seconds == math.inf:
            raise ConfigError(f"describe waits a finite number of seconds; got {wait!r}.")
        if self._pid != os.getpid():
            self._after_fork()
        if self._closing:
            raise ClientClosedError("The client is closed.")
        answers: list[tuple[str | None, bytes]] = []
        corr_id = f"{self._prefix}describe.{next(self._ids)}"
        driver = self._driver
        driver.control(
            control.DESCRIBE,
            control.encode_describe(),
            corr_id,
            int(seconds * 1000),
            lambda content_type, body: answers.append((content_type, body)),
        )
        try:
            time.sleep(seconds)
        finally:
            driver.unlisten(corr_id)
        return sorted_descriptions(answers)

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
        if isinstance(future, _Future):
            future.call = call
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


def sorted_descriptions(answers: list[tuple[str | None, bytes]]) -> list[describe.Description]:
    """The descriptions among a describe's answers, one per server (the first of each
    id), sorted by host and pid. A server that refused the describe (an older fibrpc
    answers ``unsupported_content_type``) is left out, with a log line. Raises
    ``UnreadableReplyError`` for an answer that is neither."""
    found: dict[str, describe.Description] = {}
    for content_type, body in answers:
        if protocol.media_type(content_type) == protocol.JSON:
            try:
                protocol.decode_reply(body, content_type)
            except RequestError as exc:
                log.info("a server refused the describe (an older fibrpc?): %s", exc)
                continue
        description = describe.parse(body)
        found.setdefault(description.id, description)
    return sorted(found.values(), key=lambda d: (d.host, d.pid))


def _call_back(fn: Any, future: concurrent.futures.Future[Any]) -> None:
    try:
        fn(future)
    except Exception:
        log.exception("a done-callback of a fibrpc future raised")


def messages(ns: Iterable[object], algo: str, batch_size: object) -> tuple[Chunks, int]:
    """How ``imap`` cuts ``ns`` into messages, and what each reply becomes: one n a
    message (``AS_INT``) with ``batch_size=1``, else batches (``AS_INTS``). Raises
    ``ConfigError`` for a ``batch_size`` that is not a whole number of 1 or more, and for
    an ``ns`` that is not iterable, before anything is read or sent."""
    size = check_batch_size(batch_size)
    try:
        values = iter(ns)
    except TypeError:
        raise ConfigError(
            f"The values of n must come as an iterable (a list, a range, a generator...); "
            f"got {_show(ns)}, of type {type(ns).__name__}."
        ) from None
    check_algo(algo)
    chunks = Chunks(values, size, algo)
    return chunks, AS_INT if size == 1 else AS_INTS


def check_batch_size(batch_size: object) -> int | None:
    """``batch_size`` as an int of 1 or more (numpy's integers too), or None (sized by
    reply bytes). Raises ``ConfigError`` naming anything else (a bool, 2.5, "3")."""
    if batch_size is None:
        return None
    if not isinstance(batch_size, bool):
        try:
            size = operator.index(batch_size)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            if size >= 1:
                return size
    raise ConfigError(
        f"batch_size must be a whole number of 1 or more (or None: sized by the reply); "
        f"got {_show(batch_size)}."
    )


def check_algo(algo: object) -> str:
    """``algo`` if it is a str; else ``RequestError`` (``unknown_algorithm``, as a server
    answers a name it does not know: which names exist is the server's to say)."""
    if type(algo) is not str:
        raise RequestError(
            ErrorCode.UNKNOWN_ALGORITHM,
            f"algo must be the name of an algorithm (a str such as 'fast'); got "
            f"{_show(algo)}, of type {type(algo).__name__}.",
        )
    return algo


class Chunks(Iterator[Any]):
    """The messages of an ``imap``: each n checked by ``check_n``; ``size`` values a
    batch, or as many as fit ``AUTO_BATCH_BYTES`` of estimated reply and
    ``AUTO_BATCH_VALUES`` (one for ``naive``); single values with ``size`` 1.

    A batch is read from the input in runs of 1, 2, 4... values (each taken in C, with
    ``itertools.islice``, and checked in C when all are ints): an input that pauses (a
    generator yielding now and then) ends the batch at the run that took longer than
    ``LINGER``, so its values are sent, and their results given back, while the input is
    still coming; a quick input makes full batches as before, at a few clock reads a
    batch. ``slow`` says whether the last message was cut short so.
    """

    def __init__(self, values: Iterator[Any], size: int | None, algo: str) -> None:
        self._values = values
        self._size = size
        self._limit = size or (1 if algo == "naive" else AUTO_BATCH_VALUES)
        self._carry: list[int] = []  # values read and checked, not yet in a message
        self._done = False
        self.slow = False

    def __iter__(self) -> Chunks:
        return self

    def __next__(self) -> Any:
        if self._size == 1:
            started = time.monotonic()
            value = next(self._values)
            self.slow = time.monotonic() - started > LINGER
            return check_n(value)
        chunk = self._chunk()
        if not chunk:
            raise StopIteration
        return chunk

    def _chunk(self) -> list[int]:
        chunk: list[int] = []
        pending, self._carry = self._carry, []
        sized = self._size is not None
        budget = AUTO_BATCH_BYTES
        run = 1
        self.slow = False
        while True:
            took = 0.0
            if pending:  # what the last batch read and left: first in this one
                part, pending = pending, []
            else:
                if self._done or len(chunk) >= self._limit:
                    break
                started = time.monotonic()
                part = list(itertools.islice(self._values, min(run, self._limit - len(chunk))))
                took = time.monotonic() - started
                if not part:
                    self._done = True
                    break
                if set(map(type, part)) != _INT:
                    part = [check_n(n) for n in part]
            if not sized:
                fits, budget = _fitting(part, budget)
                if fits < len(part):
                    if not chunk and not fits:
                        fits = 1  # a value over the budget alone: a message of its own
                    chunk.extend(part[:fits])
                    self._carry = part[fits:]
                    break
            chunk.extend(part)
            if took > LINGER:
                self.slow = True  # the input pauses: send what has come
                break
            run *= 2
        return chunk


def _fitting(part: list[int], budget: int) -> tuple[int, int]:
    """How many values of ``part``, from its start, fit ``budget`` bytes of estimated
    reply, and the budget left."""
    if max(part) <= 93 and min(part) >= 0:  # the usual part: checked in C
        fits = min(len(part), budget // _SMALL_COST)
        return fits, budget - fits * _SMALL_COST
    fits = 0
    for n in part:
        cost = _reply_cost(n)
        if cost > budget:
            break
        budget -= cost
        fits += 1
    return fits, budget


def _reply_cost(n: int) -> int:
    """Estimated bytes of F(n) in a reply, for sizing batches."""
    return estimate_digits(n) if n > 93 else _SMALL_COST


def _show(value: object) -> str:
    """``repr(value)``, cut to 60 characters (an argument may be huge)."""
    if isinstance(value, int) and value.bit_length() >= 200:
        return f"an int of {value.bit_length():,} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: Seconds a run of input values may take before the batch being filled is sent as it is.
LINGER: Final = 0.02
_SMALL_COST: Final = 24
_INT: Final = {int}
#: The end of an iterable of n (None is a value there, refused as not an integer).
END: Final = object()
