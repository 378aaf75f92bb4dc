"""The client's driver: who turns the connection, and how calls and replies are handed
between threads. No pika: the broker is behind a ``Link`` (``fibrpc.link.AmqpLink``;
tests use a fake one).

One thread at a time drives the link (has the *turn*): a caller waiting for its own reply
when it can, so the hot path has no thread switch, or the driver's I/O thread when nobody
else does (and to keep heartbeats flowing while the client is idle). Other callers hand
their calls over through a locked outbox and wake the driver (``Link.wake``). The I/O
thread also reconnects when the link is lost and re-sends every call in flight
(Fibonacci is pure, so a retry is safe), and asks the broker now and then whether anyone
consumes the queue, failing the calls with ``NoServerError`` after a short grace when
nobody does.

Every call keeps its deadline, connected or not: the driver expires calls at every turn
and while it reconnects (those handed over meanwhile too), and a waiting thread fails its
own call if the driver has not by shortly after its deadline (a link stuck in a round
trip, say). What a call past its deadline is told says why it got no reply
(``deadline_error``): the broker unreachable since the connection was lost, no server on
the queue, or no reply in time. A broker that refuses the client when it reconnects (its
login, its vhost deleted) fails every call at once. The registry (``fibrpc.calls``)
settles each call once.

A request never outlives the chance of its answer: one published while the queue has no
consumer carries a TTL of at most ``NO_SERVER_GRACE`` (the broker drops it if no server
comes by then), and a call fails with ``NoServerError`` before its deadline only once its
request is gone from the queue (``fibrpc.noserver``: the consumer probe and the requests
returned).

Light single calls taken from the outbox at the same turn share messages
(``fibrpc.coalescing``, in the form of ``fibrpc.coalesce``), with no waiting added: a
call alone goes out alone, as it always has. Cancels and control messages are gathered
from any thread and sent at the next turn (``fibrpc.controlbox``). Replies and the
channel's closes are taken in by ``fibrpc.inbound``. What a call that fails
without a server's answer is told is built by ``fibrpc.callerrors``; the ``Link`` the
driver turns is defined in ``fibrpc.linkapi``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from fibrpc import backoff, callerrors, refusals
from fibrpc.callerrors import too_large
from fibrpc.calls import Call, Registry
from fibrpc.controlbox import ControlBox
from fibrpc.errors import (
    AccessRefusedError,
    BrokerError,
    BrokerRefusedError,
    BrokerUnreachableError,
    CallTimeoutError,
    ClientClosedError,
    FibrpcError,
    NoServerError,
)
from fibrpc.inbound import Inbound
from fibrpc.linkapi import Link, LinkEvents, LinkLost
from fibrpc.noserver import RECONNECT_GRACE, ServerWatch

__all__ = [
    "RECONNECT_GRACE",
    "TICK",
    "Driver",
    "Link",
    "LinkEvents",
    "LinkLost",
    "Wakeup",
    "too_large",
]

log = logging.getLogger(__name__)

#: The longest a turn waits for I/O (the link's tick), and a waiting thread's poll.
TICK: Final = 0.05
#: Seconds the idle I/O thread sleeps between turns that keep heartbeats flowing.
_IDLE: Final = 1.0
#: The longest pause between reconnects (seconds, before jitter): a client retries a
#: little more eagerly than a worker, its callers are waiting.
_RECONNECT_CAP: Final = 2.0
#: Seconds past its deadline after which a waiting thread fails its call itself.
_LATE: Final = 0.25


class Wakeup:
    """The ``Waiter`` of a call whose thread waits while another drives the link: its
    settling wakes that one thread (a lock it releases), not every waiting thread, as
    notifying the driver's condition would (32 threads woken per turn cost a threaded
    client five times its CPU per call)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set_result(self, result: Any, /) -> None:
        self._lock.release()

    def set_exception(self, exception: BaseException, /) -> None:
        self._lock.release()

    def wait(self, timeout: float) -> None:
        """Return once the call settles, or after ``timeout`` seconds."""
        if self._lock.acquire(timeout=timeout):
            self._lock.release()  # settled: later waits return at once


class Driver:
    """Turns a ``Link`` for a client's calls (see the module docstring)."""

    def __init__(self, link: Link, registry: Registry) -> None:
        self.link = link
        self.registry = registry
        #: The consumer probe, the requests returned, and the TTL a request gets.
        self._watch = ServerWatch(link, registry, self._publish)
        self._outbox: collections.deque[Call] = collections.deque()
        self._lock = threading.Lock()  # guards the outbox
        # ``_turn`` is where threads wait, for their reply or for the turn; the driver
        # notifies it after every turn that settled calls.
        self._turn = threading.Condition()
        self._driving = False
        self._wanting = 0  # callers waiting for the turn: the I/O thread yields to them
        self._last_step = time.monotonic()
        self._broken = False  # the link was lost: the I/O thread reconnects
        self.closing = False
        #: Why the link is down, while it is: the last reconnect's error.
        self._down: BrokerError | None = None
        self._shut = False  # the link is closed for good: calls handed over fail at once
        self._blocked: str | None = None  # why RabbitMQ blocks publishing, while it does
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        #: Cancels of calls given up on and control messages, sent at the next turn
        #: (``fibrpc.controlbox``); guarded by ``_lock`` too.
        self._controls = ControlBox(self._lock)
        #: Replies and channel closes; the coalesced messages in flight.
        self._inbound = Inbound(
            link, registry, self._controls, publish=self._publish, expiry=self._watch.expiry
        )
        self._coalescer = self._inbound.coalescer
        #: When to try the broker again after losing it (a few times a second at most).
        self.retry = backoff.Backoff(cap=_RECONNECT_CAP)
        #: The thread inside a turn (``_step``), if any; and what to call after each turn
        #: (the client wakes its callback runner once per turn, not once per reply).
        self.stepping: int | None = None
        self.after_step: Callable[[], None] | None = None

    def start(self) -> None:
        """Open the link and start the I/O thread; raise what opening raised."""
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._io_main, args=(ready,), name="fibrpc-client-io", daemon=True
        )
        self._thread.start()
        ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def close(self, timeout: float = 10.0) -> None:
        """Fail the calls still in flight with ``ClientClosedError`` and close the link."""
        if self.closing:
            return
        self.closing = True
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def url(self) -> str:
        """The node connected to, its password hidden (for messages)."""
        return self.link.described

    @property
    def in_flight(self) -> int:
        """Calls sent (or about to be) and not yet settled."""
        return len(self.registry) + len(self._outbox)

    @property
    def prefix(self) -> str:
        """The client's correlation id prefix: tells duplicate replies from unknown ones."""
        return self._inbound.prefix

    @prefix.setter
    def prefix(self, prefix: str) -> None:
        self._inbound.prefix = prefix

    @property
    def dropped_unknown(self) -> int:
        """Replies dropped: their correlation id is not one of this client's."""
        return self._inbound.dropped_unknown

    @property
    def dropped_duplicates(self) -> int:
        """Replies dropped: to calls of this client's settled already."""
        return self._inbound.dropped_duplicates

    @property
    def max_message(self) -> int:
        """The broker's largest message (bytes), once it has named one; else 0."""
        return self._inbound.max_message

    @property
    def binary_requests(self) -> bool:
        """Whether batches go in the binary form: until a server refuses it (an older
        fibrpc, or another server on the queue), then as JSON for good."""
        return self._inbound.binary_requests

    @property
    def probe_refused(self) -> str | None:
        """Why the broker refused to count the queue's consumers, once it has: the driver
        asks no more, and cannot tell that no server runs."""
        return self._watch.probe_refused

    @property
    def coalescing(self) -> bool:
        """Whether light single calls share messages: until a server refuses the form."""
        return self._coalescer.coalescing

    @property
    def coalesced(self) -> int:
        """Coalesced messages sent (for tests and bench)."""
        return self._coalescer.coalesced

    @property
    def cancels_sent(self) -> int:
        """Cancel messages sent (for tests and the bench)."""
        return self._controls.cancels_sent

    # -- submitting and waiting (any thread) ---------------------------------------------

    def submit(self, call: Call, *, hold: bool = False) -> bool:
        """Publish ``call`` now if nobody drives the link, else hand it to the driver.
        The call's window slot is taken already. Returns whether this thread kept the
        turn (``hold``: to wait for the reply at once, see ``wait``)."""
        # ``_driving`` read without the lock is a hint: if it is stale, ``_kick`` or the
        # driver's ``_end_turn`` still gets the outbox flushed.
        if (
            not self._broken
            and not self.closing
            and not self._driving
            and not (hold and len(self.registry))
            and self._try_turn()
        ):
            held = False
            try:  # nobody is driving: publish now, from this thread
                self._send([call])
                held = hold
            except LinkLost:
                self._broken = True  # the call is pending: re-sent after the reconnect
            finally:
                if not held:
                    self._end_turn(wake_io=self._broken)
            return held
        if hold and call.future is None:
            call.future = Wakeup()  # wait() sleeps on it while another thread drives
        self.hand_over([call])
        return False

    def hand_over(self, calls: list[Call]) -> None:
        """Queue ``calls`` for whoever drives the link, waking it if it waits (the I/O
        thread if nobody drives); never touches the link from this thread, so it never
        blocks (``fibrpc.aio`` submits every call this way, from its event loop)."""
        with self._lock:
            shut = self._shut
            if not shut:
                first = not self._outbox
                self._outbox.extend(calls)
        if shut:  # closed: nobody will ever take them
            closed = ClientClosedError("The client is closed.")
            for call in calls:
                self.registry.settle(call, closed, ok=False)
            return
        if first:  # later ones ride on the first one's kick: the driver takes them all
            self._kick()

    def notify_io(self) -> None:
        """A call was handed over for the I/O thread to drive (``submit``'s future)."""
        if not self._driving:  # a driver, or _end_turn, sees the call anyway
            self._notify()

    def wait(self, call: Call, held: bool = False) -> Any:
        """The call's result, driving the link from this thread while it waits (unless
        another thread drives it already, or the I/O thread is reconnecting).
        ``held``: this thread has the turn already (see ``submit``)."""
        if held:
            self._drive_until(call)
        while not call.done:
            if time.monotonic() > call.deadline + _LATE:
                # Whoever drives the link should have expired it by now: it is stuck
                # (in a broker round trip, say). The deadline is kept all the same.
                self.abandon(call, self.deadline_error(call))
                break
            wakeup = call.future
            if type(wakeup) is Wakeup and not self._broken:
                # Handed over: another thread (the I/O thread, most often) drives and
                # publishes it. Sleep until the call settles, which wakes this thread
                # alone; only if a tick passes with nobody driving, take the turn.
                wakeup.wait(TICK)
                if call.done or self._driving:
                    continue
            with self._turn:
                if self._broken or self.closing:
                    self._turn.wait(TICK)  # the I/O thread reconnects (or shuts down)
                    continue
                if self._driving:
                    self._wanting += 1
                    self._kick()  # the I/O thread yields its turn to a caller
                    self._turn.wait(TICK)
                    self._wanting -= 1
                    continue
                self._driving = True
            self._drive_until(call)
        return call.result()

    def abandon(self, call: Call, error: BaseException) -> None:
        """Fail ``call`` with ``error`` from any thread, wherever it is (the outbox or
        the calls in flight): whoever settles it first wins, and its slot is freed once."""
        with self._lock:
            try:
                self._outbox.remove(call)
            except ValueError:
                queued = False
            else:
                queued = True
        if queued:
            self.registry.settle(call, error, ok=False)
        elif self.registry.fail(call.corr_id, error):
            self.cancel([call.corr_id])

    def cancel(self, corr_ids: list[str]) -> None:
        """Tell the servers that the calls ``corr_ids`` (sent, and settled here already)
        are given up on: sent at the next turn, with whatever else is cancelled by then
        (any thread)."""
        if self._controls.cancel(corr_ids):
            self._kick()

    def control(
        self,
        content_type: str,
        body: bytes,
        corr_id: str,
        ttl_ms: int,
        listener: Callable[[str | None, bytes], None] | None = None,
    ) -> None:
        """Send a control message at the next turn; ``listener(content_type, body)``
        hears every reply carrying ``corr_id`` (on the thread that drives the link)
        until ``unlisten`` (any thread)."""
        self._controls.control(content_type, body, corr_id, ttl_ms, listener)
        self._kick()

    def unlisten(self, corr_id: str) -> None:
        """Stop hearing the replies of ``corr_id``; later ones are dropped as unknown."""
        self._controls.unlisten(corr_id)

    def deadline_error(self, call: Call) -> FibrpcError:
        """What ``call``, past its deadline, is told: the broker unreachable (or refusing)
        if the connection is down, ``NoServerError`` if the queue had no consumer at the
        last look, else ``CallTimeoutError``."""
        down = self._down
        if self._broken and down is not None:
            return self._down_error(call, down)
        if self._watch.unserved and not self._broken:
            return self._no_server(missing=False)
        return self.timed_out(call)

    def _down_error(self, call: Call, down: BrokerError) -> BrokerError:
        """The error of ``call`` while the connection is down: ``down``'s kind, saying
        what happened to the call."""
        return callerrors.down_error(call, down, self.url, self.link.queue)

    def timed_out(self, call: Call) -> CallTimeoutError:
        """The error of ``call`` past its deadline, with a connection and a server."""
        return callerrors.timed_out(call, self.url, self.link.queue, self._blocked)

    # -- whose turn it is ----------------------------------------------------------------

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
            if self._wanting or (wake_io and (self._needs_io() or self.closing)):
                self._turn.notify_all()

    def _notify(self) -> None:
        with self._turn:
            self._turn.notify_all()

    def _kick(self) -> None:
        """Get the outbox flushed: wake the driver out of its wait, or the I/O thread."""
        if self._driving:
            try:
                self.link.wake()
            except Exception:  # reconnecting: the outbox is flushed once back
                log.debug("waking the link failed", exc_info=True)
        else:
            self._notify()

    def _drive_until(self, call: Call) -> None:
        """Turn the link (this thread has the turn) until ``call`` settles, the link is
        lost or the client closes; then give up the turn."""
        try:
            while not call.done and not self.closing and not self._broken:
                self._step(wait=True)
        except LinkLost:
            self._broken = True
        except Exception:
            log.exception("the client failed while waiting for a reply; closing it")
            self.closing = True
        finally:
            self._end_turn()

    def _my_turn(self) -> bool:
        """Whether the I/O thread should drive now: calls wait and no caller drives, or
        the link has been idle long enough to owe the broker a heartbeat."""
        if self._driving:
            return False
        if self._broken:
            return True  # only the I/O thread reconnects
        if self._wanting:
            return False
        return self._needs_io() or time.monotonic() - self._last_step >= _IDLE

    def _needs_io(self) -> bool:
        return bool(
            len(self.registry)
            or self._outbox
            or self._watch.returned
            or self._broken
            or self._controls.pending
        )

    # -- the I/O thread ------------------------------------------------------------------

    def _io_main(self, ready: threading.Event) -> None:
        """Open the link; then drive it whenever calls wait and no caller drives it,
        reconnect when it is lost, and keep heartbeats flowing while the client idles."""
        try:
            self._open()
            if not self._watch.first_probe():
                self._broken = True  # the I/O thread reconnects
        except BaseException as exc:
            self._start_error = exc
            self.link.close()
            ready.set()
            return
        ready.set()
        while not self.closing:
            with self._turn:
                while not self.closing and not self._my_turn():
                    self._turn.wait(_IDLE)
                if self.closing:
                    break
                self._driving = True
            try:
                if self._broken:
                    self._reconnect()
                    if self.closing:
                        continue  # the link is closed: the shutdown below fails the calls
                self._step(wait=False)
                while not self.closing and self._needs_io() and not self._wanting:
                    self._step(wait=True)
            except LinkLost as exc:
                if not self.closing:
                    log.warning("lost the connection to %s (%s); reconnecting", self.url, exc)
                    self._broken = True
            except Exception:
                # A bug must not leave callers waiting forever: fail them all, loudly.
                log.exception("the client's I/O thread failed; closing the client")
                self.closing = True
            finally:
                self._end_turn()
        with self._turn:
            while self._driving:
                self._turn.wait(TICK)
            self._driving = True
        self._shutdown()
        self._end_turn()

    def _open(self) -> None:
        self._blocked = None
        self.link.open(self)
        self.retry.up()

    def _reconnect(self) -> None:
        """Reconnect with backoff (``backoff.Backoff``: a pause before every try, doubling
        up to ``_RECONNECT_CAP`` with jitter, from the shortest again only after a
        connection that stayed up a while, so even a broker that drops every connection
        at once is tried a few times a second at most), expiring calls meanwhile (those
        handed over since the loss too); then re-send every call in flight (with the
        link's reply-to of the new connection). A broker that refuses the client
        (``AccessRefusedError``) fails every call at once: waiting cannot help them."""
        self.link.close()
        self._watch.lost()
        while not self.closing:
            self._adopt_outbox()
            self._expire(time.monotonic())
            delay = self.retry.failed()
            log.debug("reconnecting to %s in %.2f s", self.url, delay)
            self._pause(delay)
            if self.closing:
                return
            try:
                self._open()
            except FibrpcError as exc:
                self._went_down(exc)
                log.debug("reconnect failed (%s)", exc)
                continue
            self._adopt_outbox()
            log.info("reconnected; re-sending %d call(s)", len(self.registry))
            # Servers reconnect too (and redeclare the queue, which a broker restart may
            # have deleted): give them time before calling the queue unserved.
            self._watch.reconnected()
            self._broken = False
            self._down = None
            self._coalescer.clear()  # their replies went with the old connection
            for call in self.registry.calls():
                self._publish(call)  # each alone
            return

    def _went_down(self, exc: FibrpcError) -> None:
        """A reconnect failed with ``exc``: the reason calls are given from now on; a
        refusal fails every call in flight at once."""
        down = exc if isinstance(exc, BrokerError) else BrokerUnreachableError(str(exc))
        self._down = down
        if isinstance(down, AccessRefusedError | BrokerRefusedError):
            self._adopt_outbox()
            for call in self.registry.calls():
                self.registry.fail(call.corr_id, self._down_error(call, down))

    def _adopt_outbox(self) -> None:
        """Take the calls handed over while the link is down into the calls in flight:
        their deadlines are kept from now on, and they are sent after the reconnect (or
        failed at once, if the broker refuses the client)."""
        if not self._outbox:
            return
        with self._lock:
            calls = list(self._outbox)
            self._outbox.clear()
        down = self._down
        for call in calls:
            if isinstance(down, AccessRefusedError | BrokerRefusedError):
                self.registry.settle(call, self._down_error(call, down), ok=False)
            else:
                self.registry.track(call)

    def _pause(self, seconds: float) -> None:
        """Sleep while reconnecting, still expiring calls on time."""
        until = time.monotonic() + seconds
        while not self.closing and (now := time.monotonic()) < until:
            self._adopt_outbox()
            self._expire(now)
            with self._turn:  # close() notifies: it need not wait out the pause
                self._turn.wait(min(TICK, until - now))

    def _step(self, *, wait: bool) -> None:
        """One turn of the link (the caller has the turn): publish what waits in the
        outbox, take in replies, expire calls past their deadline."""
        if self._outbox:
            with self._lock:
                calls = list(self._outbox)
                self._outbox.clear()
            self._send(calls)
        if self._controls.due():
            self._controls.send(self.link)
        registry = self.registry
        settled = registry.settled
        self.stepping = threading.get_ident()
        try:
            self.link.turn(wait=wait)
        finally:
            self.stepping = None
            if self.after_step is not None:
                self.after_step()
        reason = self.link.channel_closed()
        if reason is not None:
            self._inbound.on_channel_closed(reason)
        self._last_step = now = time.monotonic()
        if registry.next_deadline() <= now:
            self._expire(now)
        self._watch.step(now)
        if registry.settled != settled and self._wanting:
            self._notify()  # some waiter's reply may be in

    def _publish(self, call: Call) -> None:
        """Publish ``call``'s request with the TTL that fits (``ServerWatch.expiry``)."""
        self._watch.expiry(call, time.monotonic())
        self.link.publish(call)

    def _send(self, calls: list[Call]) -> None:
        """Publish ``calls`` (the caller has the turn).

        Every call is tracked before any is published: if the link is lost midway, the
        unpublished ones are re-sent with the rest after the reconnect."""
        registry = self.registry
        for call in calls:
            registry.track(call)
        if self._coalescer.coalescing and len(calls) > 1:
            calls = self._coalescer.pack(calls)
        for call in calls:
            try:
                self._publish(call)
            except LinkLost:
                raise  # the call stays pending and is re-sent after the reconnect
            except Exception as exc:  # this call cannot be sent; the others can
                registry.fail(call.corr_id, ClientClosedError(f"The call could not be sent: {exc}"))

    # -- what the link reports (the thread that has the turn) ----------------------------

    def on_reply(self, corr_id: str | None, content_type: str | None, body: bytes) -> None:
        self._inbound.on_reply(corr_id, content_type, body)

    def on_return(self, corr_id: str | None) -> None:
        """The broker returned a request: no queue of that name exists. Just after a
        reconnect the servers may not have redeclared it yet, so it is sent again a
        little later; otherwise the call fails with ``NoServerError``
        (``ServerWatch.on_return``)."""
        if corr_id is None:
            return
        members = self._coalescer.pop(corr_id)
        if members is not None:  # a coalesced message: each call as if returned alone
            for call in members:
                self.on_return(call.corr_id)
            return
        self._watch.on_return(corr_id)

    def on_consumers(self, consumers: int | None) -> None:
        """Fail the calls whose request is gone from the queue (past its TTL) with
        ``NoServerError`` once the queue has had no consumer for ``NO_SERVER_GRACE``
        seconds; every call if the queue has not existed for that long (nothing was
        queued: the broker returned the requests). A call whose request is still queued
        waits for a server up to its deadline (then ``deadline_error`` says there was
        none). A queue deleted under calls already routed gets the same grace: its
        workers answer what they hold and declare it again (a quorum queue takes a
        moment). See ``ServerWatch.on_consumers``."""
        self._watch.on_consumers(consumers)

    def on_probe_refused(self, reply_code: int, reply_text: str) -> None:
        """The broker refused the question of ``on_consumers`` (a permission RabbitMQ
        4.2.6 and later want): said once, in a warning naming the permission to add;
        calls go on, but one to a queue without a consumer now waits for its timeout."""
        if self._watch.probe_refused is not None:
            return
        refused = refusals.probe_refused(self.link.queue, reply_code, reply_text)
        self._watch.probe_refused = refused
        log.warning(
            "%s Until then this client cannot tell that no server consumes the queue: "
            "calls go through, but one to a queue without a consumer waits for its timeout.",
            refused,
        )

    def on_blocked(self, reason: str | None) -> None:
        if reason is not None:
            log.warning(
                "RabbitMQ at %s blocks this client's publishing (%s): calls wait, up to "
                "their timeout",
                self.url,
                reason,
            )
        self._blocked = reason

    def _expire(self, now: float) -> None:
        due = self.registry.due(now)
        for call in due:
            self.registry.settle(call, self.deadline_error(call), ok=False)
        if due:
            self._controls.cancel(call.corr_id for call in due)

    def _no_server(self, *, missing: bool) -> NoServerError:
        return self._watch.no_server(missing=missing)

    def _shutdown(self) -> None:
        closed = ClientClosedError("The client was closed with this call in flight.")
        self.registry.close()  # a thread waiting for a slot of the window: closed too
        with self._lock:
            self._shut = True
            waiting = list(self._outbox)
            self._outbox.clear()
        for call in waiting:
            self.registry.settle(call, closed, ok=False)
        in_flight = self.registry.calls()
        for call in in_flight:
            self.registry.fail(call.corr_id, closed)
        if in_flight and not self._broken:
            # Tell the servers, as the last thing on this connection (best effort).
            self._controls.cancel(call.corr_id for call in in_flight)
            try:
                self._controls.send(self.link)
                self.link.turn(wait=False)
            except Exception:
                log.debug("the cancel of the calls in flight was not sent", exc_info=True)
        self.link.close()
