"""One worker process: consume ``rpc_queue``, compute, reply, then ack.

Three layers, like the client's (``calls``, ``driver``, ``link``):

* ``fibrpc.deliveries`` decides each delivery's fate (drop, skip as expired, refuse,
  compute light or heavy, republish with its count, refuse as poison, drop as
  unreplyable): pure functions of the delivery and the worker's state, a test per rule;
* ``Worker`` (here) carries the decisions out and only moves messages: it drives the
  broker through the small ``WorkerLink`` protocol, which tests implement without a
  broker (tests/test_worker.py);
* ``fibrpc.serverlink.AmqpWorkerLink`` is the real link, over ``fibrpc.amqp``: no
  module of the worker imports pika.

A light request (almost all of them) is answered inside the link's delivery callback. A
heavy one (large n, naive recursion) is computed on a single compute thread while the I/O
loop keeps turning, so heartbeats flow and the connection survives; its reply is handed
back to the I/O thread with ``WorkerLink.call_threadsafe``.

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
(``fibrpc.tracing``: the one check per request is in ``_reply`` and ``_skipped``), and
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Protocol, cast

from fibrpc import (
    amqp,
    backoff,
    coalesce,
    deliveries,
    inflight,
    metrics,
    protocol,
    refusals,
    state,
    tracing,
)
from fibrpc.config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MEMO_BYTES,
    DEFAULT_PREFETCH,
    DEFAULT_QUEUE,
    DEFAULT_URL,
    REPORT_INTERVAL,
    Limits,
)
from fibrpc.deliveries import Decision, Fate
from fibrpc.errors import (
    AccessRefusedError,
    BrokerError,
    BrokerRefusedError,
    ErrorCode,
    RequestError,
)
from fibrpc.handler import Handler, Reply, error_reply
from fibrpc.protocol import ACCEPT_HEADER, DEADLINE_HEADER, DELIVERIES_HEADER
from fibrpc.serverlink import AmqpWorkerLink, ChannelClosedError, LinkLostError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1
#: What a request's callback lets through: the link failed, the worker reconnects.
_LINK_ERRORS: Final = (LinkLostError, ChannelClosedError, BrokerError)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to start: plain values, so they cross ``fork`` and ``spawn``."""

    #: The broker's nodes (one URL, or several of one cluster): the worker connects to
    #: the first that answers, starting at its own index, and fails over round them.
    urls: tuple[str, ...] = (DEFAULT_URL,)
    queue: str = DEFAULT_QUEUE
    queue_type: str = "classic"
    prefetch: int = DEFAULT_PREFETCH
    heartbeat: int = DEFAULT_HEARTBEAT
    memo_bytes: int = DEFAULT_MEMO_BYTES
    #: The server's shared memo of large results (``fibrpc.memo``), made by the
    #: supervisor; None: each worker keeps a memo of its own.
    memo_dir: str | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    limits: Limits = dataclasses.field(default_factory=Limits)
    tls: amqp.TLSOptions | None = None
    #: Where to report to ``fibrpc status`` (``fibrpc.state``); None: nowhere.
    state_dir: str | None = None


@dataclasses.dataclass(slots=True)
class WorkerStats:
    """Counters of one worker, reported in its log and by ``fibrpc status``."""

    served: int = 0
    errors: int = 0
    dropped: int = 0  # no reply_to, or replies the broker kept refusing: nowhere to answer
    expired: int = 0  # deadline passed before it was computed: skipped
    poison: int = 0  # delivered too often: refused
    redelivered: int = 0  # came back after a worker died or a connection dropped
    reconnects: int = 0


class WorkerLink(Protocol):
    """The broker, as a worker sees it (``fibrpc.serverlink.AmqpWorkerLink`` is the real
    one). Every method but ``open`` raises ``LinkLostError`` when the connection is
    gone and ``ChannelClosedError`` when the broker closed the channel."""

    url: str  #: the node connected to (or tried last)

    def open(
        self,
        on_request: Callable[[Any, Any, Any, bytes], None],
        on_cancel: Callable[[], None],
    ) -> None:
        """Connect, declare the queue and consume it: each delivery reaches
        ``on_request(channel, method, properties, body)`` during ``turn``. Raises
        ``BrokerUnreachableError`` (retried) or another ``BrokerError``/``ConfigError``."""

    def turn(self) -> None:
        """Write what is queued, wait a little for I/O, run what arrived."""

    def is_open(self) -> bool:
        """Whether replies and acks can still go out."""

    def reply(self, props: Any, body: bytes, content_type: str) -> None:
        """Queue the reply to the request of ``props``."""

    def ack(self, tag: int) -> None:
        """Queue the ack of delivery ``tag``."""

    def republish(
        self, routing_key: str, body: bytes, props: Any, headers: Mapping[str, Any]
    ) -> None:
        """Queue a copy of a request with ``headers``."""

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` during a later ``turn`` (from any thread)."""

    def consume_again(self) -> None:
        """Declare the queue and consume again after the broker cancelled the consumer."""

    def cancel(self, timeout: float) -> None:
        """Stop consuming (waiting up to ``timeout`` seconds for the broker)."""

    def close(self) -> None:
        """Close within a couple of seconds, whatever the broker does."""


class Worker:
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
    ) -> None:
        """``board`` and ``index``: the supervisor's board of requests in flight and this
        worker's place on it (``fibrpc.inflight``); without one, every redelivery is
        charged as a delivery, since no crash's suspect can be told from the others.
        ``link``: the broker (by default an ``AmqpWorkerLink`` to ``settings.urls``,
        starting at node ``index``); ``retry``: the pauses between reconnects."""
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
        self._generation = 0  # bumped per connection: stale compute results are dropped
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
        to this connection's generation."""
        self._generation += 1
        self._in_flight = 0
        self._consumer_cancelled = False
        self.link.open(self._on_request, self._on_cancelled)
        self._retry.up()
        if self._outage_since is not None:
            log.info(
                "RabbitMQ answers again at %s, after %.1f s",
                amqp.redact(self.url),
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        log.info("consuming %r at %s", self.settings.queue, amqp.redact(self.url))

    def _unreachable(self, exc: BrokerError) -> None:
        """No node answered: wait (backoff) and try again; one warning per outage."""
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
            log.warning("%s; reconnecting", exc)
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
        while not self._stopping:
            self.link.turn()  # returns within a quarter of a second
            if self._consumer_cancelled:
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
        """Declare the queue again and consume it on the same channel. The requests this
        worker holds are still its own (their delivery tags live on the channel, not in
        the queue), so those being computed are answered and acked as usual: their
        callers' reply addresses do not depend on the queue."""
        log.warning(
            "RabbitMQ cancelled the consumer of %r (the queue was deleted?); declaring it "
            "again, %d request(s) still held",
            self.settings.queue,
            self._in_flight,
        )
        self._consumer_cancelled = False
        self.stats.reconnects += 1
        self.link.consume_again()

    def _drain(self) -> None:
        """Cancel the consumer (what reaches us after that is rejected, to be requeued),
        then wait for computations in flight to reply and ack, up to the drain timeout."""
        deadline = time.monotonic() + self.settings.drain_timeout
        self.link.cancel(self.settings.drain_timeout)
        while self._in_flight and time.monotonic() < deadline:
            self.link.turn()
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
            counters = dataclasses.asdict(self.stats)
            counters.update(memo_hits=hits, memo_misses=misses)
            self._report.write(counters)

    def _log_expired(self) -> None:
        if self.stats.expired > self._logged_expired:
            log.info(
                "skipped %d request(s) whose deadline had passed (%d in all)",
                self.stats.expired - self._logged_expired,
                self.stats.expired,
            )
            self._logged_expired = self.stats.expired

    # -- one request ----------------------------------------------------------------------

    def _on_request(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        """Handle one delivery; a bug costs that message (acked, logged), not the worker.
        ``channel`` is the link's (unused: replies and acks go through the link)."""
        try:
            self._handle_request(method, props, body)
        except _LINK_ERRORS:
            raise
        except Exception:
            log.exception("failed on a request (correlation_id=%r); dropped", props.correlation_id)
            with contextlib.suppress(Exception):
                self.link.ack(method.delivery_tag)

    def _handle_request(self, method: Any, props: Any, body: bytes) -> None:
        """Decide the delivery's fate (``fibrpc.deliveries``) and carry it out."""
        started = time.perf_counter()
        headers = props.headers if isinstance(props.headers, dict) else None
        budget = deliveries.budget_ms(props.expiration)
        early = deliveries.screen(
            reply_to_ok=amqp.valid_reply_to(props.reply_to),
            headers=headers,
            budget_ms=budget,
            now_wall_ms=time.time() * 1000,
        )
        if early is not None:
            self._discard(early, method.delivery_tag, props, started)
            return
        if self._debug:
            log.debug("received %r (%d bytes)", props.correlation_id, len(body))
        if props.content_type is not None and (
            protocol.media_type(props.content_type) == coalesce.CALLS
        ):
            self._handle_calls(method, props, headers, body, started)
            return
        accept = headers.get(ACCEPT_HEADER) if headers else None
        request = self.handler.decode(body, props.content_type, props.type, accept)
        decision = self._decide(method.redelivered, props, headers, request)
        fate = decision.fate
        if fate is Fate.LIGHT:
            self._compute_light(method.delivery_tag, props, request, started)
        elif fate is Fate.HEAVY:
            self._offload(method.delivery_tag, props, request, headers, budget, started)
        elif fate is Fate.REFUSE:
            reply = cast(Reply, request)
            self._reply(method.delivery_tag, props, reply, metrics.UNKNOWN_ALGO, 0, started)
        else:
            self._charge(decision, method, props, body, headers, started)

    def _decide(
        self,
        flag: bool,
        props: Any,
        headers: dict[str, Any] | None,
        request: protocol.Request | Reply,
    ) -> Decision:
        """The fate of a decoded request (``deliveries.decide``), with what this worker
        knows of it when it was delivered before (``flag``: pika's ``redelivered``)."""
        refused = isinstance(request, Reply)
        again = deliveries.redelivered(flag, headers)
        suspect, unacked = False, None
        if again:
            self.stats.redelivered += 1
            self._metrics.redelivered()
            key = inflight.key(props.reply_to, props.correlation_id)
            suspect = not refused and self._is_suspect(key)
            unacked = self._unacked.get(key)
            if unacked is not None:
                self._unacked = {}  # the first back is the culprit: the others are not
        return deliveries.decide(
            refused=refused,
            heavy=not isinstance(request, Reply) and self.handler.is_heavy(request),
            redelivered=again,
            suspect=suspect,
            unacked_reply=unacked,
            counted=headers.get(DELIVERIES_HEADER) if headers else None,
            max_deliveries=self.settings.max_deliveries,
        )

    # -- coalesced calls (fibrpc.coalesce) ------------------------------------------------

    def _handle_calls(
        self, method: Any, props: Any, headers: dict[str, Any] | None, body: bytes, started: float
    ) -> None:
        """A coalesced message: each call decoded, skipped, split out or computed alone
        (``coalesce.plan``); the light ones answered in one reply, then the message
        acked. A redelivered message charged for a crash (``_charged``) is split into one
        message per call, carrying its count, so that only a call that kills again is
        charged further."""
        tag = method.delivery_tag
        received = time.monotonic()
        try:
            calls = coalesce.decode_calls(body, self.handler.limits)
        except RequestError as exc:  # the message itself is refused: every call with it
            self._reply(tag, props, error_reply(exc), metrics.UNKNOWN_ALGO, 0, started)
            return
        counted = self._charged(method.redelivered, props, headers)
        now_ms = time.time() * 1000

        def expired(call: coalesce.Incoming) -> bool:
            return deliveries.expired(
                now_wall_ms=now_ms,
                now=received,
                received=received,
                deadline_ms=call.deadline_ms,
                budget_ms=call.ttl_ms,
            )

        plan = coalesce.plan(
            calls, expired=expired, is_heavy=self.handler.is_heavy, crashed=counted is not None
        )
        if counted is not None:
            log.warning(
                "coalesced message %r was being computed when a worker died; splitting its "
                "%d call(s) into a message each (delivery %d)",
                props.correlation_id,
                len(plan.split),
                counted,
            )
        for call in plan.split:
            alone = coalesce.alone(
                call, reply_to=props.reply_to, headers=headers or {}, counted=counted, elapsed_ms=0
            )
            self.link.republish(method.routing_key, *alone)
        if plan.expired:
            self.stats.expired += len(plan.expired)
            for call in plan.expired:
                self._metrics.discarded(call.algo, "expired")
        if plan.heavy_together:
            self._answer_off_thread(tag, props, plan, started)
            return
        slot = self._slot
        if slot is not None:
            slot.begin(inflight.INLINE, inflight.key(props.reply_to, props.correlation_id))
        answers = self.handler.answer_calls(plan.light)
        if slot is not None:
            slot.end(inflight.INLINE)
        self._reply_calls(tag, props, plan, answers, started)

    def _charged(self, flag: bool, props: Any, headers: dict[str, Any] | None) -> int | None:
        """The deliveries counted against a redelivered coalesced message charged as a
        whole (``deliveries.decide``: it was being computed when a worker died, or its
        reply went unacked), or None if it is not charged."""
        if not deliveries.redelivered(flag, headers):
            return None
        self.stats.redelivered += 1
        self._metrics.redelivered()
        key = inflight.key(props.reply_to, props.correlation_id)
        unacked = self._unacked.get(key)
        if unacked is not None:
            self._unacked = {}  # the first back is the culprit: the others are not
        decision = deliveries.decide(
            refused=False,
            heavy=False,
            redelivered=True,
            suspect=self._is_suspect(key),
            unacked_reply=unacked,
            counted=headers.get(DELIVERIES_HEADER) if headers else None,
            max_deliveries=self.settings.max_deliveries,
        )
        if decision.fate is Fate.LIGHT:
            return None
        if self._board is not None:
            self._board.acquit(key)
        return decision.deliveries

    def _answer_off_thread(self, tag: int, props: Any, plan: coalesce.Plan, started: float) -> None:
        """Light calls heavy together: computed as a whole on the compute thread (marked
        on the board under the message's key), answered back on the I/O thread."""
        self._in_flight += 1
        generation = self._generation
        key = inflight.key(props.reply_to, props.correlation_id)

        def compute() -> list[coalesce.Answer]:
            slot = self._slot
            if slot is not None:
                slot.begin(inflight.HEAVY, key)
            try:
                return self.handler.answer_calls(plan.light)
            finally:
                if slot is not None:
                    slot.end(inflight.HEAVY)

        def finish(answers: list[coalesce.Answer]) -> None:
            if generation != self._generation or not self.link.is_open():
                return  # the broker requeued it with the connection
            self._in_flight -= 1
            self._reply_calls(tag, props, plan, answers, started)

        def done(f: concurrent.futures.Future[list[coalesce.Answer]]) -> None:
            if not f.cancelled():
                answers = f.result()
                self.link.call_threadsafe(lambda: finish(answers))

        self._compute.submit(compute).add_done_callback(done)

    def _reply_calls(
        self,
        tag: int,
        props: Any,
        plan: coalesce.Plan,
        answers: list[coalesce.Answer],
        started: float,
    ) -> None:
        """Publish the answers of a coalesced message (the refused calls' and the
        computed ones', in request order; none: no reply), then ack it. Counted per call."""
        seconds = time.perf_counter() - started
        metrics_ = self._metrics
        for call in plan.refused:
            assert call.error is not None
            self.stats.errors += 1
            metrics_.answered(metrics.UNKNOWN_ALGO, call.error.code, seconds, 0)
        for call, answer in zip(plan.light, answers, strict=True):
            if answer.error is None:
                self.stats.served += 1
                metrics_.answered(call.algo, "ok", seconds, 1)
            else:
                self.stats.errors += 1
                metrics_.answered(call.algo, answer.error.code, seconds, 1)
        if plan.refused:
            answers = answers + [coalesce.Answer(c.id, error=c.error) for c in plan.refused]
            order = {call.id: call.index for call in (*plan.light, *plan.refused)}
            answers.sort(key=lambda answer: order[answer.id])
        if answers:
            self.link.reply(props, coalesce.encode_answers(answers), coalesce.CALLS)
        self.link.ack(tag)
        self._replied.append(props)
        if self._debug:
            log.debug("answered %d call(s) of %r", len(answers), props.correlation_id)
        self._trace(props, tag, started, "ok", values=len(answers), batch=True)

    def _is_suspect(self, key: bytes) -> bool:
        board = self._board
        return board is None or board.is_suspect(key, worker=self._index)

    def _discard(self, decision: Decision, tag: int, props: Any, started: float) -> None:
        """Ack a delivery that is not computed: no usable reply_to, or its caller gone."""
        if decision.fate is Fate.DROP:
            self.stats.dropped += 1
            self._metrics.discarded(metrics.UNKNOWN_ALGO, "dropped")
            log.warning(
                "dropped a message with no usable reply_to (reply_to=%r, correlation_id=%r)",
                props.reply_to,
                props.correlation_id,
            )
            self.link.ack(tag)
            return
        self.stats.expired += 1
        self._metrics.discarded(metrics.UNKNOWN_ALGO, "expired")
        self.link.ack(tag)
        self._skipped(props, tag, started)

    def _charge(
        self,
        decision: Decision,
        method: Any,
        props: Any,
        body: bytes,
        headers: dict[str, Any] | None,
        started: float,
    ) -> None:
        """A redelivered request charged as a delivery: republished with its count, or
        past the limit refused as poison or dropped."""
        max_deliveries = self.settings.max_deliveries
        key = inflight.key(props.reply_to, props.correlation_id)
        if self._board is not None:
            self._board.acquit(key)  # and once per crash it is suspected of
        if decision.fate is Fate.REPUBLISH:
            if decision.reason is not None:
                log.warning(
                    "request %r came back: RabbitMQ closed the channel or connection after "
                    "its reply and before its ack (%s); computing it again (delivery %d of "
                    "at most %d)",
                    props.correlation_id,
                    decision.reason,
                    decision.deliveries,
                    max_deliveries,
                )
            else:
                log.warning(
                    "request %r was being computed when a worker died; computing it again "
                    "(delivery %d of at most %d)",
                    props.correlation_id,
                    decision.deliveries,
                    max_deliveries,
                )
            # The count must outlive this delivery: carry it in a copy (on quorum queues
            # too, whose own count also charges the requests that were only prefetched).
            copied = deliveries.recount(headers or {}, decision.deliveries)
            self.link.republish(method.routing_key, body, props, copied)
            self.link.ack(method.delivery_tag)
            return
        if decision.fate is Fate.UNREPLYABLE:
            self.stats.dropped += 1
            self._metrics.discarded(metrics.UNKNOWN_ALGO, "dropped")
            log.error(
                "dropped request %r: delivered %d times (the limit is %d), and each time "
                "RabbitMQ closed the channel or connection after its reply to %r and before "
                "its ack (last: %s); no reply is sent, since it would be refused the same way",
                props.correlation_id,
                decision.deliveries,
                max_deliveries,
                props.reply_to,
                decision.reason,
            )
            self.link.ack(method.delivery_tag)
            return
        self.stats.poison += 1
        log.error(
            "refusing %r: delivered %d times without an answer, computing when a worker "
            "died each time (limit %d)",
            props.correlation_id,
            decision.deliveries,
            max_deliveries,
        )
        error = RequestError(
            ErrorCode.POISON,
            f"This request was delivered {decision.deliveries} times without being "
            f"answered (the limit is {max_deliveries}); a worker died computing it each "
            "time, so it is not computed again.",
        )
        # Ack first: if replying is what breaks the connection (a reply_to the broker
        # chokes on), the request must not come back once more.
        self.link.ack(method.delivery_tag)
        self._reply(None, props, error_reply(error), metrics.UNKNOWN_ALGO, 0, started)

    def _compute_light(self, tag: int, props: Any, request: Any, started: float) -> None:
        """Compute inline (on the I/O thread), marked on the board meanwhile; reply."""
        slot = self._slot
        if slot is not None:
            slot.begin(inflight.INLINE, inflight.key(props.reply_to, props.correlation_id))
        reply = self.handler.compute(request)
        if slot is not None:
            slot.end(inflight.INLINE)
        self._reply(tag, props, reply, request.algo, len(request.ns), started, request.batch)

    def _offload(
        self,
        tag: int,
        props: Any,
        request: Any,
        headers: dict[str, Any] | None,
        budget: int | None,
        started: float,
    ) -> None:
        """Compute on the compute thread; the reply comes back to the I/O thread."""
        received = time.monotonic()
        self._in_flight += 1
        generation = self._generation
        key = inflight.key(props.reply_to, props.correlation_id)
        future = self._compute.submit(
            self._compute_unless_expired, request, headers or {}, budget, received, key
        )

        def done(f: concurrent.futures.Future[Reply | None]) -> None:
            if f.cancelled():
                return
            reply = f.result()
            self.link.call_threadsafe(
                lambda: self._finish_heavy(generation, tag, props, reply, request, started)
            )

        future.add_done_callback(done)

    def _compute_unless_expired(
        self,
        request: Any,
        headers: dict[str, Any],
        budget: int | None,
        received: float,
        key: bytes,
    ) -> Reply | None:
        """On the compute thread: skip a request whose deadline passed while it waited;
        mark it on the board while it is computed."""
        if (headers or budget is not None) and _expired(headers, budget, received):
            return None
        slot = self._slot
        if slot is None:
            return self.handler.compute(request)
        slot.begin(inflight.HEAVY, key)
        try:
            return self.handler.compute(request)
        finally:
            slot.end(inflight.HEAVY)

    def _finish_heavy(
        self,
        generation: int,
        tag: int,
        props: Any,
        reply: Reply | None,
        request: Any,
        started: float,
    ) -> None:
        if generation != self._generation or not self.link.is_open():
            return  # computed for a connection that is gone: the broker requeued it
        self._in_flight -= 1
        if reply is None:
            self.stats.expired += 1
            self._metrics.discarded(request.algo, "expired")
            self.link.ack(tag)
            self._skipped(props, tag, started)
        else:
            self._reply(tag, props, reply, request.algo, len(request.ns), started, request.batch)

    def _reply(
        self,
        tag: int | None,
        props: Any,
        reply: Reply,
        algo: str,
        values: int,
        started: float,
        batch: bool = False,
    ) -> None:
        """Publish the reply, then ack the request: a crash between the two costs a
        duplicate reply (which clients drop), never a lost one. ``algo``, ``values`` (the
        number of n asked for, 0 if not decoded), ``started`` (``perf_counter`` when the
        request was taken) and ``batch`` (a list of n) are for the metrics and the trace.
        ``tag`` None: already acked."""
        if reply.error is None:
            self.stats.served += 1
            if self._debug:
                log.debug("computed %r: %d value(s) with %r", props.correlation_id, values, algo)
        else:
            self.stats.errors += 1
            log.info("refused %r: %s", props.correlation_id, reply.error)
        self.link.reply(props, reply.body, reply.content_type)
        if tag is not None:
            self.link.ack(tag)
            self._replied.append(props)
        self._metrics.answered(algo, reply.error or "ok", time.perf_counter() - started, values)
        if self._debug:
            log.debug("replied %r to %r", props.correlation_id, props.reply_to)
        self._trace(
            props,
            tag,
            started,
            reply.error or "ok",
            values=values,
            batch=batch,
            algo=None if algo == metrics.UNKNOWN_ALGO else algo,
            error=reply.body if reply.error else None,
        )

    def _skipped(self, props: Any, tag: int, started: float) -> None:
        """Log and trace a request skipped because its caller had given up (acked)."""
        if self._debug:
            log.debug("skipped %r: its deadline had passed", props.correlation_id)
        self._trace(props, tag, started, "expired")

    def _trace(
        self, props: Any, tag: int | None, started: float, outcome: str, **details: Any
    ) -> None:
        """Record the request's span if a tracer provider is set: the one check per
        request (``fibrpc.tracing.record_request`` says what ``details`` are)."""
        tracer = tracing.tracer()
        if tracer is not None:
            tracing.record_request(
                tracer,
                queue=self.settings.queue,
                url=self.url,
                props=props,
                tag=tag,
                started=started,
                outcome=outcome,
                **details,
            )


def _expired(headers: dict[str, Any], budget: int | None, received: float) -> bool:
    deadline = headers.get(DEADLINE_HEADER)
    return deliveries.expired(
        now_wall_ms=time.time() * 1000,
        now=time.monotonic(),
        received=received,
        deadline_ms=deadline if deliveries.is_int(deadline) else None,
        budget_ms=budget,
    )


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
