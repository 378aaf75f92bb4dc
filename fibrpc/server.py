"""One worker process: consume ``rpc_queue``, compute, reply, then ack.

Three layers, like the client's (``calls``, ``driver``, ``link``):

* ``fibrpc.deliveries`` decides each delivery's fate (drop, skip as expired, refuse,
  compute light or heavy, republish with its count, refuse as poison, drop as
  unreplyable): pure functions of the delivery and the worker's state, a test per rule;
* ``Worker`` (here) carries the decisions out and only moves messages: it drives the
  broker through the small ``fibrpc.workerlink.WorkerLink`` protocol, which tests
  implement without a broker (tests/test_worker.py);
* ``fibrpc.serverlink.AmqpWorkerLink`` is the real link, over ``fibrpc.amqp``: no
  module of the worker imports pika.

``Worker`` is this module's loop (the connection's life: connect, consume, reconnect,
drain, report) and the parts it is made of, a module each: ``fibrpc.requestpath`` (one
request's path and its reply), ``fibrpc.coalesced`` (coalesced calls),
``fibrpc.heavypath`` (the compute thread), ``fibrpc.manners`` (the control desk's hooks);
``fibrpc.workerstate`` holds ``WorkerSettings``, ``WorkerStats`` and what the parts share.

A light request (almost all of them) is answered inside the link's delivery callback. A
heavy one (large n, naive recursion) is computed on a single compute thread while the I/O
loop keeps turning, so heartbeats flow and the connection survives; its reply is handed
back to the I/O thread (``Worker._hand_back``, woken by ``WorkerLink.call_threadsafe``).

Faults a worker absorbs by itself, without dying:

* the broker goes away or closes the channel: it reconnects, with backoff
  (``fibrpc.backoff.Backoff``: exponential with jitter, from the first pause again once a
  connection stayed healthy a while), and consumes again;
* a request whose caller has given up (its deadline has passed): skipped, not computed;
* a request delivered more than ``max_deliveries`` times while a worker died computing it
  (it may be what killed the workers before): refused with an ``ErrorCode.POISON`` reply
  instead of computed again. Quorum queues count deliveries themselves
  (``x-delivery-count``), but count the requests merely prefetched too; so a charged
  request is re-published with its count in a header and the original acked;
* a request whose reply the broker refused: when the channel or connection closes after
  a reply and before its ack, the request is charged when it comes back, and dropped
  with one error line after ``max_deliveries`` (a reply would be refused the same way).

What a worker has done is counted in ``WorkerStats`` and, where the stats are counted, in
``fibrpc.metrics`` (which records nothing unless the server has a metrics port). Once a
second at most, from the consume loop (never per message), the worker hands its counters
to ``fibrpc.state`` for ``fibrpc status`` and its memo's new hits to the metrics.

Each request answered or skipped is recorded as a span when a tracer provider is set
(``fibrpc.tracing``: the one check per request is in ``_reply`` and ``_skipped``,
``fibrpc.requestpath``), and
logged at debug level by its correlation id: received, computed or refused, replied,
skipped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn

from fibrpc import (
    amqp,
    backoff,
    describe,
    desk,
    inflight,
    metrics,
    refusals,
    state,
)
from fibrpc.coalesced import CoalescedCalls
from fibrpc.config import REPORT_INTERVAL
from fibrpc.errors import AccessRefusedError, BrokerError, BrokerRefusedError
from fibrpc.handler import Handler
from fibrpc.heavypath import HeavyPath
from fibrpc.manners import Manners
from fibrpc.requestpath import RequestPath
from fibrpc.serverlink import AmqpWorkerLink, ChannelClosedError, LinkLostError
from fibrpc.workerlink import WorkerLink
from fibrpc.workerstate import Latest, Running, WorkerSettings, WorkerStats

__all__ = [
    "Running",
    "Worker",
    "WorkerLink",
    "WorkerSettings",
    "WorkerStats",
    "die_with_parent",
    "install_stop_handlers",
]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1


class Worker(RequestPath, CoalescedCalls, HeavyPath, Manners):
    """Consumes requests until asked to stop, reconnecting as needed, then drains."""

    def __init__(
        self,
        settings: WorkerSettings,
        handler: Handler | None = None,
        *,
        board: inflight.Board | None = None,
        index: int = 0,
        link: WorkerLink | None = None,
        retry: backoff.Backoff | None = None,
        exit: Callable[[int], NoReturn] = os._exit,
    ) -> None:
        """``board`` and ``index``: the supervisor's board of requests in flight and this
        worker's place on it (``fibrpc.inflight``); without one, every redelivery is
        charged as a delivery, since no crash's suspect can be told from the others.
        ``link``: the broker (by default an ``AmqpWorkerLink`` to ``settings.urls``,
        starting at node ``index``); ``retry``: the pauses between reconnects;
        ``exit``: how the process ends when it abandons a computation (``_abandon``)."""
        self.settings = settings
        self._board = board
        self._index = index
        self.link: WorkerLink = link or AmqpWorkerLink(
            settings.urls,
            settings.queue,
            queue_type=settings.queue_type,
            prefetch=settings.prefetch,
            heartbeat=settings.heartbeat,
            tls=settings.tls,
            name=f"fibrpc-worker-{os.getpid()}",
            node=index,
        )
        self._retry = retry or backoff.Backoff()
        self._slot = board.slot(index) if board is not None else None
        self.handler = handler or Handler(settings.limits, settings.memo_bytes, settings.memo_dir)
        self.stats = WorkerStats()
        self._stopping = False
        self._in_flight = 0
        self._generation = 0  # per connection and cancelled consumer: stale results dropped
        #: Generations whose consumer RabbitMQ cancelled (their queue was deleted): what
        #: they hold never comes back, so it is answered whatever happens to their channel
        #: or connection, and never acked (``_fate_of``); and how many are still held.
        self._orphans: set[int] = set()
        self._orphans_held = 0
        #: Orphans' results that came while the link had no open channel (``_fate_of``).
        self._deferred: list[Callable[[], None]] = []
        #: Results of the compute thread, waiting for the I/O thread (``_hand_back``).
        self._handed_back: collections.deque[Callable[[], None]] = collections.deque()
        self._resubscribe = backoff.Backoff()
        self._resubscribe_at: float | None = None  # when to consume again, after a 404
        self._compute = concurrent.futures.ThreadPoolExecutor(1, "fibrpc-compute")
        self._consumer_cancelled = False
        #: The properties of the latest replies (at most a prefetch of them can be
        #: unacked at the broker): remembered as unacked if the link fails.
        self._replied: collections.deque[Any] = collections.deque(maxlen=settings.prefetch + 1)
        #: Keys of the requests replied but perhaps unacked when the link last failed,
        #: with the broker's reason (``_charge_unacked``).
        self._unacked: dict[bytes, str] = {}
        self._outage_since: float | None = None
        self._logged_expired = 0
        self._metrics = metrics.current()
        self._report: state.WorkerReport | None = None
        if settings.state_dir is not None:
            self._report = state.WorkerReport(Path(settings.state_dir), os.getppid(), os.getpid())
        self._next_tick = 0.0
        self._memo_reported = (0, 0)  # the memo's hits and misses already in the metrics
        self._debug = log.isEnabledFor(logging.DEBUG)  # decided once: per request it costs
        self.desk = desk.Desk()
        self.tally = describe.Tally()
        self._exit = exit
        #: The request the compute thread is computing (set and cleared by that thread).
        self._running: Running | None = None
        #: The latest delivery of each heavy request being computed, by its key (a
        #: redelivery joins the computation: ``HeavyPath._offload``).
        self._computing: dict[bytes, Latest] = {}
        self._busy_until: float | None = None  # Unix time its computation should end by
        self._started = time.time()

    @property
    def url(self) -> str:
        """The node connected to (or tried last)."""
        return self.link.url

    def request_stop(self) -> None:
        """Stop taking requests and drain (safe from a signal handler)."""
        self._stopping = True

    # -- the connection's life ------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until ``request_stop``, answer what is held, close.

        Reconnects, with backoff, whenever the broker is unreachable or does not answer
        (a quorum queue without a majority never confirms a consume, say: an outage is
        never a crash, however long it lasts), drops the connection or closes the
        channel. Raises ``AccessRefusedError`` (and ``BrokerRefusedError``,
        ``ConfigError``) at once: retrying a refusal cannot help, and the supervisor must
        hear of it.
        """
        parent = os.getppid()
        try:
            while not self._stopping and os.getppid() == parent:
                try:
                    self._open()
                except (AccessRefusedError, BrokerRefusedError):
                    raise
                except BrokerError as exc:  # unreachable, or not answering: an outage
                    self._unreachable(exc)
                    continue
                if on_ready is not None:
                    self._metrics.worker_up()
                    self._tick(force=True)
                    on_ready()
                    on_ready = None
                if self._serve(parent):
                    break
                self._sleep(self._retry.failed())
        finally:
            self._compute.shutdown(wait=False, cancel_futures=True)
            self.link.close()
            self._tick(force=True)  # the last memo counts reach the metrics
            if self._report is not None:
                self._report.remove()
            log.info(
                "stopped: %s",
                ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.stats).items()),
            )

    def _open(self) -> None:
        """Connect and consume. Requests may arrive before ``open`` returns: they belong
        to this connection's generation. What the last connection held is the broker's
        to deliver again, except orphans (``_fate_of``): still held, and answered on this
        connection."""
        self._generation += 1
        self._in_flight = self._orphans_held
        self._consumer_cancelled = False
        self._resubscribe_at = None
        self.link.open(self._on_request, self._on_cancelled)
        self._retry.up()
        self._run_deferred()
        if self._outage_since is None:
            log.info("consuming %r at %s", self.settings.queue, amqp.redact(self.url))
            return
        log.info(
            "RabbitMQ answers again, after %.1f s: consuming %r at %s",
            time.monotonic() - self._outage_since,
            self.settings.queue,
            amqp.redact(self.url),
        )
        self._outage_since = None

    def _unreachable(self, exc: BrokerError) -> None:
        """No node answered: wait (backoff) and try again; one warning per outage (none
        when it began with a lost connection, which said so), the retries at debug."""
        delay = self._retry.failed()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("%s Retrying, with backoff, until it answers.", exc)
        else:
            log.debug("%s Retrying in %.2f s.", exc, delay)
        self._sleep(delay)

    def _serve(self, parent: int) -> bool:
        """Consume until asked to stop, then drain: True. False when the link failed
        (the worker reconnects)."""
        try:
            self._consume(parent)
            self._drain()
            return True
        except ChannelClosedError as exc:
            if self._stopping:
                return True
            self.stats.reconnects += 1
            largest = refusals.max_message_size(exc.reply_text)
            if largest is not None:
                self._limit_replies(largest)  # the reply over the limit is refused later
                return False
            hint = refusals.ack_timed_out(exc.reply_text)
            log.warning("%s; reconnecting%s", exc, f": {hint}" if hint else "")
            self._outage_since = time.monotonic()  # that line says it: no second one
            self._charge_unacked(f"{exc.reply_code} {exc.reply_text}")
        except LinkLostError as exc:
            if self._stopping:
                return True
            self.stats.reconnects += 1
            log.warning(
                "lost the connection to %s (%s); reconnecting%s",
                amqp.redact(self.url),
                exc,
                " to the next node" if len(self.settings.urls) > 1 else "",
            )
            self._outage_since = time.monotonic()  # that line says it: no second one
            self._charge_unacked(f"the connection was lost: {exc}")
        return False

    def _charge_unacked(self, reason: str) -> None:
        """The link failed: the requests replied to lately may be unacked at the broker.
        RabbitMQ handles a channel's frames in order and drops those after the one it
        chokes on: the first of them to come back is the culprit, charged as a delivery
        (``deliveries.decide``); those behind it are innocent (``_decide``)."""
        if self._replied:
            self._unacked = {
                inflight.key(props.reply_to, props.correlation_id): reason
                for props in self._replied
            }
            self._replied.clear()

    def _limit_replies(self, largest: int) -> None:
        """RabbitMQ closed the channel over a reply larger than its ``max_message_size``
        (``largest`` bytes): from now on a request whose reply would not fit is refused
        as ``reply_too_large`` before computing, naming the broker's limit, and so is the
        one that went over when it comes back (refusals are never charged as crashes)."""
        limits = self.handler.limits
        if largest >= limits.max_reply_bytes:
            return
        log.warning(
            "RabbitMQ refused a reply over its max_message_size of %d bytes; replies are "
            "limited to that from now on (--max-reply-bytes is %d); reconnecting",
            largest,
            limits.max_reply_bytes,
        )
        self.handler.limits = dataclasses.replace(
            limits,
            max_reply_bytes=largest,
            max_reply_source=f"RabbitMQ's max_message_size at {amqp.redact(self.url)}",
        )

    def _consume(self, parent: int) -> None:
        # The control path opens here, not in ``_open``: requests already arrive during
        # its round trips, and a connection lost meanwhile is handled as in a turn.
        self.desk.opened(self.link.open_control(self.settings.server_id, self.desk.heard))
        while not self._stopping:
            self.link.turn()  # returns within a quarter of a second
            if self._handed_back:  # a wake-up lost with the last connection
                self._run_handed_back()
            if self._running is not None or self.desk.busy():
                self._manners()
            if self._consumer_cancelled and time.monotonic() >= (self._resubscribe_at or 0.0):
                self._consume_again()
            self._log_expired()
            self._tick()
            if os.getppid() != parent:
                log.warning("supervisor %d is gone; stopping", parent)
                self._stopping = True

    def _on_cancelled(self) -> None:
        """RabbitMQ cancels a consumer whose queue is deleted (or, on a cluster, whose
        queue moved): consume again (``_consume_again``) rather than sit idle."""
        self._consumer_cancelled = True

    def _consume_again(self) -> None:
        """Declare the queue again and consume it. What the cancelled consumer delivered
        is still this worker's to answer (the callers' reply addresses do not depend on
        the queue), but not to ack: its queue is gone, and RabbitMQ 4 closes the channel
        (406, unknown delivery tag) at an ack of a deleted quorum queue's delivery. So the
        cancel starts a new generation, and the old one's results are replied unacked
        (``_fate_of``).

        A quorum queue still being deleted may answer the declare and be gone by the
        consume, which closes the channel (404): the link opens another, and the worker
        declares and consumes again after a pause (backoff)."""
        if self._resubscribe_at is None:  # just cancelled (not a retry after a 404)
            log.warning(
                "RabbitMQ cancelled the consumer of %r (the queue was deleted, or a "
                "delivery held past a quorum queue's consumer timeout); declaring it "
                "again, %d request(s) still held",
                self.settings.queue,
                self._in_flight,
            )
            self.stats.reconnects += 1
            self._orphans.add(self._generation)
            self._orphans_held = self._in_flight  # older orphans' included
            self._generation += 1
        consumed = self.link.consume_again()
        self._run_deferred()
        if consumed:
            self._consumer_cancelled = False
            self._resubscribe_at = None
            self._resubscribe.up()
            return
        delay = self._resubscribe.failed()
        self._resubscribe_at = time.monotonic() + delay
        log.info(
            "%r was gone again before the consume; declaring it again in %.2f s",
            self.settings.queue,
            delay,
        )

    def _hand_back(self, finish: Callable[[], None]) -> None:
        """From the compute thread: run ``finish`` (a result's reply) on the I/O thread.
        It waits here, not in the connection, whose callbacks go with it: an orphan's
        result that comes while the worker reconnects is still answered."""
        self._handed_back.append(finish)
        self.link.call_threadsafe(self._run_handed_back)

    def _run_handed_back(self) -> None:
        handed_back = self._handed_back
        while handed_back:
            handed_back.popleft()()

    def _fate_of(self, generation: int, finish: Callable[[], None]) -> bool | None:
        """What to do with a result computed for a request of ``generation``: True,
        reply and ack (its consumer is this one); False, reply only (an orphan: its
        consumer was cancelled with its queue, so nothing requeues it and nothing may ack
        it); None, drop it (its connection is gone and the broker requeued it). An
        orphan's result that comes while the link has no channel (between a 404 and the
        fresh channel, or while reconnecting: RabbitMQ 4.3 closes the connection, 541,
        at a consume racing a quorum queue's deletion) is kept, and ``finish`` run again
        once the link has one: None meanwhile."""
        if generation in self._orphans:
            if not self.link.is_open():
                self._deferred.append(finish)
                return None
            self._orphan_settled()
            return False
        if generation != self._generation or not self.link.is_open():
            return None
        return True

    def _orphan_settled(self) -> None:
        """One request held for a cancelled consumer is settled (answered, or joined by
        its redelivery): the last one ends the orphan generations."""
        self._orphans_held -= 1
        if not self._orphans_held:
            self._orphans.clear()

    def _run_deferred(self) -> None:
        """Answer the orphans' results that came while the link had no channel."""
        deferred, self._deferred = self._deferred, []
        for finish in deferred:
            finish()

    def _drain(self) -> None:
        """Cancel the consumer (what reaches us after that is rejected, to be requeued),
        then wait for computations in flight to reply and ack, up to the drain timeout."""
        deadline = time.monotonic() + self.settings.drain_timeout
        self.link.cancel(self.settings.drain_timeout)
        while self._in_flight and time.monotonic() < deadline:
            self.link.turn()
            self._run_handed_back()
        if self._in_flight:
            log.warning(
                "drain timed out with %d request(s) unanswered; the broker requeues them",
                self._in_flight,
            )
        self._log_expired()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(min(0.05, seconds))

    def _tick(self, *, force: bool = False) -> None:
        """At most once per ``REPORT_INTERVAL`` (or now, if ``force``): flush the
        metrics (with the memo's new hits and misses) and report to ``fibrpc status``."""
        now = time.monotonic()
        if not force and now < self._next_tick:
            return
        self._next_tick = now + REPORT_INTERVAL
        fast = self.handler.fast
        hits, misses = fast.hits, fast.misses
        if self._metrics.enabled:
            self._metrics.memo(hits - self._memo_reported[0], misses - self._memo_reported[1])
            self._metrics.flush()
        self._memo_reported = (hits, misses)
        if self._report is not None:
            self._report.write(self._report_data())

    def _report_data(self) -> dict[str, Any]:
        """What this worker reports to ``fibrpc status`` and describes (``fibrpc.state``):
        its counters, per algorithm too, what it computes, and a sign of life that
        changes every ``describe.ALIVE_EVERY`` seconds."""
        now = time.time()
        data: dict[str, Any] = dataclasses.asdict(self.stats)
        fast = self.handler.fast
        running, busy_until = self._running, self._busy_until
        data.update(
            memo_hits=fast.hits,
            memo_misses=fast.misses,
            algos=self.tally.as_dict(),
            alive=now - now % describe.ALIVE_EVERY,
            busy_since=None,
            busy_until=busy_until,
        )
        if running is not None:
            data["busy_since"] = now - (time.monotonic() - running.received)
        return data

    def _log_expired(self) -> None:
        if self.stats.expired > self._logged_expired:
            log.info(
                "skipped %d request(s) whose deadline had passed (%d in all)",
                self.stats.expired - self._logged_expired,
                self.stats.expired,
            )
            self._logged_expired = self.stats.expired


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, so no worker is orphaned."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def install_stop_handlers(worker: Worker) -> None:
    """SIGTERM drains the worker; SIGINT (a Ctrl-C sent to the whole process group) is
    left to the supervisor, which turns it into SIGTERM for each worker."""

    def on_term(signum: int, frame: Any) -> None:
        worker.request_stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
