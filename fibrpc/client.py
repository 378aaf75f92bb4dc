"""The client: many correlated calls in flight on one connection, singly or in batches.

Design (after aio-pika's RPC pattern): a map from ``correlation_id`` to the call waiting
for it. pika is not thread-safe, so one thread at a time drives the connection: a caller
waiting for its own reply when it can (no thread switch on the hot path), else the
client's I/O thread; other callers hand their calls over through a locked outbox and wake
the driver (``amqp.wake``). Replies come back through RabbitMQ's direct reply-to, so there
is no reply queue to declare, and a reply never outlives its client.

A bounded window of calls in flight gives backpressure: ``submit`` blocks while the window
is full. Every call has a deadline; calls past it fail with ``CallTimeoutError``. While
calls wait, the I/O thread checks that some server consumes the queue, and fails them with
``NoServerError`` after a short grace when none does. Unknown and duplicate replies are
dropped and counted, never delivered.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any, Final

import gmpy2

from fibrpc import amqp, protocol, refusals
from fibrpc.config import (
    BROKER_MAX_MESSAGE_BYTES,
    DEFAULT_HEARTBEAT,
    DEFAULT_QUEUE,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    DEFAULT_WINDOW,
    NO_SERVER_GRACE,
)
from fibrpc.errors import (
    AccessRefusedError,
    BrokerRefusedError,
    CallTimeoutError,
    ClientClosedError,
    ConfigError,
    ErrorCode,
    FibrpcError,
    NoServerError,
    RequestError,
)
from fibrpc.kernels import DEFAULT_ALGORITHM, estimate_digits

log = logging.getLogger(__name__)

#: What a reply is turned into for the caller.
_AS_INT: Final = 0
_AS_TEXT: Final = 1
_AS_INTS: Final = 2

#: Automatic batches stop at this many values, or at this many estimated reply bytes.
AUTO_BATCH_VALUES: Final = 1000
AUTO_BATCH_BYTES: Final = 1 << 20
_PROBE_INTERVAL: Final = 0.5
#: After a reconnect, seconds before an empty queue counts as "no server": the servers
#: are reconnecting to the same broker at the same time.
RECONNECT_GRACE: Final = 10.0
_RETURN_RETRY: Final = 0.2
_TICK: Final = 0.05
#: Seconds the idle I/O thread sleeps between turns that keep heartbeats flowing.
_IDLE: Final = 1.0
_RECONNECT_BACKOFF: Final = (0.1, 0.25, 0.5, 1.0, 2.0)
#: Seconds past its deadline after which a waiting thread fails its call itself.
_LATE: Final = 0.25
#: Seconds ``close`` gives the broker to acknowledge, before the socket is dropped.
_CLOSE_WITHIN: Final = 1.0
#: RabbitMQ's largest per-message TTL in milliseconds (ten years): a longer one closes
#: the channel the message was published on, failing every call on it.
MAX_TTL_MS: Final = 315_360_000_000
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


def _wait_limit(timeout: float, block: bool) -> float | None:
    """A timeout for ``threading`` waits: None (no limit) for an infinite or too long one."""
    if not block or timeout >= threading.TIMEOUT_MAX:
        return None
    return timeout


class _Future(concurrent.futures.Future[Any]):
    """A future whose done-callbacks run on the client's callback thread, never on the
    thread that drives the connection (where a slow one would stall every call)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    def add_done_callback(self, fn: Any) -> None:
        client = self._client
        super().add_done_callback(lambda future: client._run_callback(fn, future))


def to_int(text: str) -> int:
    """An int from decimal text; GMP for long texts (``int()`` is quadratic past ~4,300)."""
    return int(text) if len(text) < 4000 else int(gmpy2.mpz(text))


def to_ints(texts: list[str]) -> list[int]:
    """``to_int`` of each text, with ``int`` mapped straight over the usual batch (every
    text under Python's 4,300-digit limit): a third cheaper than a call per value, on the
    client's largest cost per batch (bench/bench_protocol.py)."""
    try:
        return list(map(int, texts))
    except ValueError:  # a text past the limit: GMP where it is long
        return [to_int(text) for text in texts]


class _Call:
    """One request in flight: its message, its deadline and, once settled, its outcome.

    Only ``submit`` hands out a ``Future`` (``future``); ``call`` and ``imap`` read the
    outcome from the call itself, which costs no lock (a future takes one on every
    ``done()``, and a round trip asked it several times).
    """

    __slots__ = (
        "algo",
        "as_",
        "body",
        "content_type",
        "corr_id",
        "deadline",
        "done",
        "future",
        "msg_type",
        "n",
        "ok",
        "outcome",
        "timeout",
    )

    def __init__(
        self,
        corr_id: str,
        n: int | list[int],
        algo: str,
        as_: int,
        timeout: float,
        future: concurrent.futures.Future[Any] | None,
    ) -> None:
        self.corr_id = corr_id
        self.n = n
        self.algo = algo
        self.as_ = as_
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.body, self.content_type, self.msg_type = protocol.encode_request(n, algo)
        self.future = future
        self.done = False
        self.ok = False
        self.outcome: Any = None

    def settle(self, outcome: Any, *, ok: bool) -> None:
        """Record the result (``ok``) or the exception, once; resolve the future if any
        (unless its caller cancelled it). ``done`` is set last: a waiting thread that
        sees it set finds the outcome in place."""
        if self.done:
            return
        self.ok = ok
        self.outcome = outcome
        self.done = True
        if self.future is not None:
            try:
                if ok:
                    self.future.set_result(outcome)
                else:
                    self.future.set_exception(outcome)
            except concurrent.futures.InvalidStateError:
                pass

    def result(self) -> Any:
        if self.ok:
            return self.outcome
        raise self.outcome

    def describe(self) -> str:
        if isinstance(self.n, list):
            return f"a batch of {len(self.n)} value(s) with {self.algo!r}"
        return f"fib({self.n}) with {self.algo!r}"


class Client:
    """A thread-safe RPC client for fibrpc servers (a context manager).

    ``call`` blocks for one result; ``submit`` returns a future; ``map`` and ``imap``
    batch and pipeline many values of n. Raises ``BrokerError`` from the constructor when
    the broker cannot be reached.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        queue: str = DEFAULT_QUEUE,
        timeout: float = DEFAULT_TIMEOUT,
        window: int = DEFAULT_WINDOW,
        heartbeat: int = DEFAULT_HEARTBEAT,
        tls: amqp.TLSOptions | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be a whole number of 1 or more; got {window!r}.")
        self.url = url
        self.queue = queue
        self.window = window
        self._heartbeat = heartbeat
        self._tls = tls
        self._start()

    def _start(self) -> None:
        """Everything but the settings: the calls in flight, the connection and its I/O
        thread. Done again, from scratch, in a forked child (``_after_fork``)."""
        self._pid = os.getpid()
        self.dropped_unknown = 0
        self.dropped_duplicates = 0
        self._prefix = uuid.uuid4().hex[:12] + "."
        self._ids = itertools.count()
        self._pending: dict[str, _Call] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._outbox: collections.deque[_Call] = collections.deque()
        self._lock = threading.Lock()  # guards the outbox
        # One thread at a time drives the connection (``_driving``): a caller waiting for
        # its own reply, so the hot path has no thread switch, or the I/O thread when
        # nobody else does. ``_turn`` is where the others wait, for their reply or for
        # the turn; the driver notifies it after every turn that settled calls.
        self._turn = threading.Condition()
        self._driving = False
        self._wanting = 0  # callers waiting for the turn: the I/O thread yields to them
        self._settled = 0  # calls settled so far: tells a driver whom to wake
        self._last_step = time.monotonic()
        self._broken = False  # the connection dropped: the I/O thread reconnects
        self._slots = threading.BoundedSemaphore(self.window)
        self._closing = False
        self._conn: Any = None
        self._channel: Any = None
        self._probe: Any = None
        self._next_probe = 0.0
        self._no_consumer_since: float | None = None
        self._grace_until = 0.0
        self._returned: collections.deque[tuple[float, str]] = collections.deque()
        self._start_error: BaseException | None = None
        #: The broker's largest message: RabbitMQ 4's default until the broker says less.
        self._max_message = BROKER_MAX_MESSAGE_BYTES
        self._blocked: str | None = None  # why RabbitMQ blocks publishing, while it does
        self._callbacks: concurrent.futures.ThreadPoolExecutor | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._io_main, args=(ready,), name="fibrpc-client-io", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    # -- public API -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None) -> int:
        """F(n) computed by a server with ``algo``.

        Raises ``RequestError`` if the server refuses n, ``CallTimeoutError`` after
        ``timeout`` seconds, ``NoServerError`` when no server consumes the queue.
        """
        result: int = self._wait(*self._submit(n, algo, timeout, _AS_INT, block=True, hold=True))
        return result

    def call_text(self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None) -> str:
        """F(n) as decimal text, exactly as the server sent it (no int conversion)."""
        text: str = self._wait(*self._submit(n, algo, timeout, _AS_TEXT, block=True, hold=True))
        return text

    def submit(
        self, n: int, algo: str = DEFAULT_ALGORITHM, timeout: float | None = None
    ) -> concurrent.futures.Future[int]:
        """Send one call now and return its future; blocks while the window is full.

        The I/O thread drives the connection until the future resolves. Callbacks added
        with ``add_done_callback`` run on a thread of the client's own, never on the one
        that drives the connection: a slow callback, or one that calls the client,
        holds up nobody else's calls.
        """
        future: concurrent.futures.Future[int] = _Future(self)
        self._submit(n, algo, timeout, _AS_INT, block=True, future=future)
        if not self._driving:  # a driver, or _end_turn, sees the call anyway
            self._notify()
        return future

    def map(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> list[int]:
        """F(n) for every n, in order, batched and pipelined (see ``imap``)."""
        return list(self.imap(ns, algo, batch_size=batch_size, timeout=timeout))

    def imap(
        self,
        ns: Iterable[int],
        algo: str = DEFAULT_ALGORITHM,
        *,
        batch_size: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[int]:
        """Stream F(n) for every n of a (possibly endless) iterable, in order.

        Values are packed ``batch_size`` to a message (by default up to 1,000, or fewer
        when their results would pass about 1 MB), and up to ``window`` messages are in
        flight at once. ``batch_size=1`` sends one message per call. The first refused
        batch raises its ``RequestError``.
        """
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be 1 or more; got {batch_size}.")
        if batch_size == 1:
            chunks: Iterator[int | list[int]] = iter(ns)
        else:
            chunks = _batches(ns, batch_size, algo)
        as_ = _AS_INT if batch_size == 1 else _AS_INTS
        in_flight: collections.deque[_Call] = collections.deque()
        chunk = next(chunks, None)
        while chunk is not None or in_flight:
            while chunk is not None:
                call, _ = self._submit(chunk, algo, timeout, as_, block=not in_flight)
                if call is None:
                    break
                in_flight.append(call)
                chunk = next(chunks, None)
            result = self._wait(in_flight.popleft())
            if as_ == _AS_INT:
                yield result
            else:
                yield from result

    def close(self) -> None:
        """Fail the calls still in flight with ``ClientClosedError`` and disconnect."""
        if self._closing:
            return
        self._closing = True
        self._notify()
        self._thread.join(10)

    @property
    def in_flight(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending) + len(self._outbox)

    # -- submitting (any thread) ----------------------------------------------------------

    def _submit(
        self,
        n: int | list[int],
        algo: str,
        timeout: float | None,
        as_: int,
        *,
        block: bool,
        future: concurrent.futures.Future[Any] | None = None,
        hold: bool = False,
    ) -> tuple[Any, bool]:
        """Queue or publish one call; return it (None if ``block`` is false and the
        window is full) and whether this thread still has the turn: with ``hold``, a
        caller that published its call itself keeps the turn to wait for the reply,
        rather than giving it up and taking it back (``_wait(call, held)``)."""
        if self._pid != os.getpid():
            self._after_fork()
        if self._closing:
            raise ClientClosedError("The client is closed.")
        timeout = self.timeout if timeout is None else check_timeout(timeout)
        if not self._slots.acquire(blocking=block, timeout=_wait_limit(timeout, block)):
            if not block:
                return None, False
            raise CallTimeoutError(
                f"The client's window of {self.window} calls stayed full for {timeout} s."
            )
        try:
            call = _Call(f"{self._prefix}{next(self._ids)}", n, algo, as_, timeout, future)
            if len(call.body) > self._max_message:
                raise _too_large(len(call.body), self._max_message)
        except BaseException:
            self._slots.release()  # a call that cannot be sent holds no slot
            raise
        # ``_driving`` read without the lock is a hint: if it is stale, ``_kick`` or the
        # driver's ``_end_turn`` still gets the outbox flushed.
        if not self._broken and not self._driving and self._try_turn():
            held = False
            try:  # nobody is driving: publish now, from this thread
                self._send([call])
                held = hold
            except amqp.ConnectionLost:
                self._broken = True  # the call is pending: re-sent after the reconnect
            finally:
                if not held:
                    self._end_turn(wake_io=self._broken)
            return call, held
        with self._lock:
            first = not self._outbox
            self._outbox.append(call)
        if first:  # later ones ride on the first one's kick: the driver takes them all
            self._kick()
        return call, False

    # -- whose turn it is to drive the connection -----------------------------------------

    def _try_turn(self) -> bool:
        with self._turn:
            if self._driving:
                return False
            self._driving = True
            return True

    def _end_turn(self, *, wake_io: bool = True) -> None:
        """Give up the turn. Others are woken only if they have something to do: waking
        the idle I/O thread after every call would cost a thread switch on the hot path,
        and a caller that has just published its call (``wake_io=False``) is about to
        take the turn again to wait for the reply."""
        with self._turn:
            self._driving = False
            if self._wanting or (wake_io and (self._needs_io() or self._closing)):
                self._turn.notify_all()

    def _notify(self) -> None:
        """Wake the threads waiting on ``_turn`` (the I/O thread among them)."""
        with self._turn:
            self._turn.notify_all()

    def _kick(self) -> None:
        """Get the outbox flushed: wake the driver out of its select, or the I/O thread."""
        if self._driving:
            conn = self._conn
            # While reconnecting this fails; the outbox is flushed once back.
            with contextlib.suppress(Exception):
                amqp.wake(conn)
        else:
            self._notify()

    def _wait(self, call: _Call, held: bool = False) -> Any:
        """The call's result, driving the connection from this thread while it waits
        (unless another thread drives it already, or the I/O thread is reconnecting).
        ``held``: this thread has the turn already (see ``_submit``)."""
        if held:
            self._drive_until(call)
        while not call.done:
            if time.monotonic() > call.deadline + _LATE:
                # Whoever drives the connection should have expired it by now: it is
                # stuck (in a broker round trip, say). The deadline is kept all the same.
                self._abandon(call)
                break
            with self._turn:
                if self._broken or self._closing:
                    self._turn.wait(_TICK)  # the I/O thread reconnects (or shuts down)
                    continue
                if self._driving:
                    self._wanting += 1
                    self._kick()  # the I/O thread yields its turn to a caller
                    self._turn.wait(_TICK)
                    self._wanting -= 1
                    continue
                self._driving = True
            self._drive_until(call)
        return call.result()

    def _drive_until(self, call: _Call) -> None:
        """Drive the connection (this thread has the turn) until ``call`` settles, the
        connection drops or the client closes; then give up the turn."""
        try:
            while not call.done and not self._closing and not self._broken:
                self._step(wait=True)
        except amqp.ConnectionLost:
            self._broken = True
        except Exception:
            log.exception("the client failed while waiting for a reply; closing it")
            self._closing = True
        finally:
            self._end_turn()

    def _my_turn(self) -> bool:
        """Whether the I/O thread should drive now: calls wait and no caller drives, or
        the connection has been idle long enough to owe the broker a heartbeat."""
        if self._driving:
            return False
        if self._broken:
            return True  # only the I/O thread reconnects
        if self._wanting:
            return False
        return self._needs_io() or time.monotonic() - self._last_step >= _IDLE

    def _needs_io(self) -> bool:
        return bool(self._pending or self._outbox or self._returned or self._broken)

    # -- the I/O thread -------------------------------------------------------------------

    def _io_main(self, ready: threading.Event) -> None:
        """Connect; then drive the connection whenever calls wait and no caller drives it,
        reconnect when it drops, and keep heartbeats flowing while the client is idle."""
        try:
            self._connect()
        except BaseException as exc:
            self._start_error = exc
            ready.set()
            return
        ready.set()
        while not self._closing:
            with self._turn:
                while not self._closing and not self._my_turn():
                    self._turn.wait(_IDLE)
                if self._closing:
                    break
                self._driving = True
            try:
                if self._broken:
                    self._reconnect()
                self._step(wait=False)
                while not self._closing and self._needs_io() and not self._wanting:
                    self._step(wait=True)
            except amqp.ConnectionLost as exc:
                if not self._closing:
                    log.warning(
                        "lost the connection to %s (%s); reconnecting",
                        amqp.redact(self.url),
                        type(exc).__name__,
                    )
                    self._broken = True
            except Exception:
                # A bug must not leave callers waiting forever: fail them all, loudly.
                log.exception("the client's I/O thread failed; closing the client")
                self._closing = True
            finally:
                self._end_turn()
        with self._turn:
            while self._driving:
                self._turn.wait(_TICK)
            self._driving = True
        self._shutdown()
        self._end_turn()

    def _connect(self) -> None:
        self._conn = amqp.connect(
            self.url,
            heartbeat=self._heartbeat,
            name="fibrpc-client",
            tls=self._tls,
            connect_timeout=self.timeout,
        )
        self._blocked = None
        amqp.on_blocked(self._conn, self._on_blocked)
        amqp.keep_ticking(self._conn, _TICK)  # once per connection, not per channel
        self._open_channel()
        self._probe = None

    def _open_channel(self) -> None:
        self._channel = self._conn.channel()
        amqp.consume_direct(
            self._conn, self._channel, amqp.DIRECT_REPLY_TO, self._on_reply, auto_ack=True
        )
        amqp.on_return(self._channel, self._on_return)

    def _reconnect(self) -> None:
        """Reconnect with backoff, expiring calls meanwhile; then re-send every call in
        flight (Fibonacci is pure, so a retry is safe)."""
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None
        for attempt in itertools.count():
            if self._closing:
                return
            self._expire(time.monotonic())
            try:
                self._connect()
            except FibrpcError as exc:
                delay = _RECONNECT_BACKOFF[min(attempt, len(_RECONNECT_BACKOFF) - 1)]
                log.info("reconnect failed (%s); retrying in %.2f s", exc, delay)
                self._pause(delay)
                continue
            log.info("reconnected; re-sending %d call(s)", len(self._pending))
            # Servers reconnect too (and redeclare the queue, which a broker restart may
            # have deleted): give them time before calling the queue unserved.
            self._grace_until = time.monotonic() + RECONNECT_GRACE
            self._next_probe = self._grace_until
            self._no_consumer_since = None
            self._broken = False
            for call in list(self._pending.values()):
                self._publish(call)
            return

    def _pause(self, seconds: float) -> None:
        """Sleep while reconnecting, still expiring calls on time."""
        until = time.monotonic() + seconds
        while not self._closing and (now := time.monotonic()) < until:
            self._expire(now)
            time.sleep(min(_TICK, until - now))

    def _step(self, *, wait: bool) -> None:
        """One turn of the connection (the caller has the turn): publish what
        waits in the outbox, take in replies, expire calls past their deadline."""
        if self._outbox:
            with self._lock:
                calls = list(self._outbox)
                self._outbox.clear()
            self._send(calls)
        settled = self._settled
        if wait:
            amqp.run_io(self._conn)  # returns within _TICK (keep_ticking)
        else:
            self._conn.process_data_events(time_limit=0)
        if self._channel.is_closed:
            self._on_channel_closed()
        self._last_step = now = time.monotonic()
        if self._returned and now >= self._returned[0][0]:
            self._resend_returned(now)
        if self._deadlines and self._deadlines[0][0] <= now:
            self._expire(now)
        if self._pending and now >= self._next_probe:
            self._next_probe = now + _PROBE_INTERVAL
            self._check_consumers(now)
        if self._settled != settled and self._wanting:
            self._notify()  # some waiter's reply may be in

    def _on_channel_closed(self) -> None:
        """The broker closed our channel (a refused permission, most likely): fail every
        call in flight with the broker's reason, then open a fresh channel so that the
        client stays usable.

        A request over the broker's ``max_message_size`` closes the channel too: then
        only the calls too large for the broker fail (``body_too_large``, naming its
        limit, which later calls are checked against before sending), and the others are
        sent again on the new channel, since their replies were bound to the old one."""
        reason = amqp.closing_reason(self._channel)
        largest = refusals.max_message_size(str(getattr(reason, "reply_text", "")))
        if largest is not None:
            self._max_message = min(self._max_message, largest)
            self._open_channel()
            for call in list(self._pending.values()):
                if len(call.body) > largest:
                    self._fail(call.corr_id, _too_large(len(call.body), largest))
                else:
                    self._publish(call)
            return
        error: FibrpcError = ClientClosedError(f"RabbitMQ closed the client's channel: {reason}")
        if isinstance(reason, BaseException):
            translated = amqp.translate(reason, self.url)
            if isinstance(translated, AccessRefusedError | BrokerRefusedError):
                error = translated
        log.warning("%s", error)
        for corr_id in list(self._pending):
            self._fail(corr_id, error)
        self._open_channel()

    def _send(self, calls: list[_Call]) -> None:
        """Publish ``calls`` (the caller has the turn).

        Every call is pending before any is published: if the connection drops midway,
        the unpublished ones are re-sent with the rest after the reconnect."""
        for call in calls:
            self._pending[call.corr_id] = call
            heapq.heappush(self._deadlines, (call.deadline, call.corr_id))
        for call in calls:
            try:
                self._publish(call)
            except amqp.ConnectionLost:
                raise  # the call stays pending and is re-sent after the reconnect
            except Exception as exc:  # this call cannot be sent; the others can
                self._fail(call.corr_id, ClientClosedError(f"The call could not be sent: {exc}"))

    def _publish(self, call: _Call) -> None:
        """Publish ``call`` with what is left of its time as the message's TTL (at most
        the broker's largest) and a deadline header; with no deadline, neither."""
        left = call.deadline - time.monotonic()
        if left == math.inf:
            amqp.publish_soon(
                self._channel,
                self.queue,
                call.body,
                mandatory=True,
                reply_to=amqp.DIRECT_REPLY_TO,
                correlation_id=call.corr_id,
                content_type=call.content_type,
                message_type=call.msg_type,
            )
            return
        remaining_ms = max(1, min(MAX_TTL_MS, int(left * 1000)))
        amqp.publish_soon(
            self._channel,
            self.queue,
            call.body,
            mandatory=True,
            reply_to=amqp.DIRECT_REPLY_TO,
            correlation_id=call.corr_id,
            content_type=call.content_type,
            message_type=call.msg_type,
            expiration=str(remaining_ms),
            headers={protocol.DEADLINE_HEADER: int(time.time() * 1000) + remaining_ms},
        )

    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        call = self._pending.pop(props.correlation_id, None)
        if call is None:
            self._count_stray(props.correlation_id)
            return
        try:
            value = protocol.decode_reply(body, props.content_type)
            if call.as_ == _AS_INT:
                result: Any = to_int(value)  # type: ignore[arg-type]
            elif call.as_ == _AS_INTS:
                if not isinstance(value, list):
                    raise ValueError("a reply to a batch must be a list of results")
                result = to_ints(value)
            else:
                result = value
        except RequestError as exc:
            self._settle(call, exc, ok=False)
        except Exception as exc:
            error = RequestError("malformed", f"Bad reply from the server: {exc}")
            self._settle(call, error, ok=False)
        else:
            self._settle(call, result, ok=True)

    def _count_stray(self, corr_id: str | None) -> None:
        """A reply to nothing waiting: a duplicate (one of ours, already settled) or an
        unknown id. Dropped, counted, logged at debug."""
        mine = corr_id is not None and corr_id.startswith(self._prefix)
        if mine:
            self.dropped_duplicates += 1
        else:
            self.dropped_unknown += 1
        log.debug("dropped a %s reply %r", "duplicate" if mine else "unknown", corr_id)

    def _on_return(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        """The broker returned a request: no queue of that name exists. Just after a
        reconnect the servers may not have redeclared it yet, so it is sent again a
        little later; otherwise the call fails with ``NoServerError``."""
        now = time.monotonic()
        if now < self._grace_until and props.correlation_id in self._pending:
            self._returned.append((now + _RETURN_RETRY, props.correlation_id))
            return
        self._fail(props.correlation_id, NoServerError(self._no_server_message(missing=True)))

    def _resend_returned(self, now: float) -> None:
        while self._returned and now >= self._returned[0][0]:
            _, corr_id = self._returned.popleft()
            call = self._pending.get(corr_id)
            if call is not None:
                self._publish(call)

    def _fail(self, corr_id: str, error: BaseException) -> None:
        call = self._pending.pop(corr_id, None)
        if call is not None:
            self._settle(call, error, ok=False)

    def _settle(self, call: _Call, outcome: Any, *, ok: bool) -> None:
        """Settle a call taken out of ``_pending``: free its window slot, count it (the
        driver wakes waiters by that count), resolve it."""
        self._slots.release()
        self._settled += 1
        call.settle(outcome, ok=ok)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, corr_id = heapq.heappop(self._deadlines)
            call = self._pending.get(corr_id)
            if call is not None:
                self._fail(corr_id, self._timed_out(call))

    def _timed_out(self, call: _Call) -> CallTimeoutError:
        blocked = self._blocked
        why = f" RabbitMQ blocks this client's publishing ({blocked})." if blocked else ""
        return CallTimeoutError(
            f"No reply to {call.describe()} within {call.timeout} s from queue "
            f"{self.queue!r} at {amqp.redact(self.url)}.{why}"
        )

    def _abandon(self, call: _Call) -> None:
        """Fail ``call`` with its timeout from the thread waiting for it, wherever it is
        (the outbox or the calls in flight); whoever settles it first wins."""
        with self._lock:
            try:
                self._outbox.remove(call)
            except ValueError:
                queued = False
            else:
                queued = True
        if queued:
            self._slots.release()
            call.settle(self._timed_out(call), ok=False)
        else:
            self._fail(call.corr_id, self._timed_out(call))

    def _check_consumers(self, now: float) -> None:
        """Ask the broker how many consumers the queue has; the answer comes on a later
        turn (``_on_consumers``), never holding this one up."""
        if self._probe is None:
            self._probe = amqp.QueueProbe(self._conn, self.queue, self._on_consumers)
        self._probe.ask()

    def _run_callback(self, fn: Any, future: concurrent.futures.Future[Any]) -> None:
        """Run a future's done-callback on the client's callback thread (made on first
        use); where that is shut down (the client closed), in this thread."""
        with self._lock:
            if self._callbacks is None:
                self._callbacks = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="fibrpc-callbacks"
                )
            callbacks = self._callbacks
        try:
            callbacks.submit(_call_back, fn, future)
        except RuntimeError:  # shut down
            _call_back(fn, future)

    def _on_blocked(self, reason: str | None) -> None:
        if reason is not None:
            log.warning(
                "RabbitMQ at %s blocks this client's publishing (%s): calls wait, up to "
                "their timeout",
                amqp.redact(self.url),
                reason,
            )
        self._blocked = reason

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

    def _on_consumers(self, consumers: int | None) -> None:
        """Fail every waiting call with ``NoServerError`` once the queue has had no
        consumer for ``NO_SERVER_GRACE`` seconds (or does not exist at all)."""
        now = time.monotonic()
        if now < self._grace_until:
            return
        if consumers:
            self._no_consumer_since = None
            return
        if consumers is not None:
            if self._no_consumer_since is None:
                self._no_consumer_since = now
                return
            if now - self._no_consumer_since < NO_SERVER_GRACE:
                return
        message = self._no_server_message(missing=consumers is None)
        for corr_id in list(self._pending):
            self._fail(corr_id, NoServerError(message))

    def _no_server_message(self, *, missing: bool) -> str:
        state = "does not exist" if missing else "has no consumer"
        return (
            f"No fibrpc server is serving queue {self.queue!r} at {amqp.redact(self.url)} "
            f"(the queue {state}). Start one with: fibrpc serve --url URL --queue "
            f"{self.queue}"
        )

    def _shutdown(self) -> None:
        closed = ClientClosedError("The client was closed with this call in flight.")
        with self._lock:
            waiting = list(self._outbox)
            self._outbox.clear()
        for call in waiting:
            self._slots.release()
            call.settle(closed, ok=False)
        for corr_id in list(self._pending):
            self._fail(corr_id, closed)
        conn, self._conn = self._conn, None
        if conn is not None:
            amqp.close_within(conn, _CLOSE_WITHIN)
        if self._callbacks is not None:
            self._callbacks.shutdown(wait=False)


def _call_back(fn: Any, future: concurrent.futures.Future[Any]) -> None:
    try:
        fn(future)
    except Exception:
        log.exception("a done-callback of a fibrpc future raised")


def _too_large(size: int, largest: int) -> RequestError:
    return RequestError(
        ErrorCode.BODY_TOO_LARGE,
        f"The request body has {size:,} bytes; the broker accepts messages of at most "
        f"{largest:,} bytes (RabbitMQ's max_message_size). Send fewer values of n per "
        "call (map's batch_size).",
    )


def _batches(ns: Iterable[int], size: int | None, algo: str) -> Iterator[list[int]]:
    """Chunks of ``ns``: ``size`` values each, or sized automatically by reply bytes."""
    it = iter(ns)
    if size is not None:
        while chunk := list(itertools.islice(it, size)):
            yield chunk
        return
    limit = 1 if algo == "naive" else AUTO_BATCH_VALUES
    chunk, budget = [], AUTO_BATCH_BYTES
    for n in it:
        cost = estimate_digits(n) if type(n) is int and n > 93 else 24
        if chunk and (len(chunk) >= limit or cost > budget):
            yield chunk
            chunk, budget = [], AUTO_BATCH_BYTES
        chunk.append(n)
        budget -= cost
    if chunk:
        yield chunk
