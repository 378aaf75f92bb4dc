"""One worker process: consume ``rpc_queue``, compute, reply, then ack.

The consume loop only moves messages; ``fibrpc.handler`` decides what each one means.
A light request (almost all of them) is answered inside the pika callback. A heavy one
(large n, naive recursion) is computed on a single compute thread while the I/O loop
keeps turning, so heartbeats flow and the connection survives; its reply is handed back
to the I/O thread with ``amqp.call_threadsafe`` (pika's I/O loop's ``add_callback_
threadsafe``, the one pika method that is safe to call from another thread).

Faults a worker absorbs by itself, without dying:

* the broker goes away: it reconnects with backoff and consumes again;
* a request whose caller has given up (its deadline has passed): skipped, not computed;
* a request delivered more than ``max_deliveries`` times (it may be what killed the
  workers before): refused with an ``ErrorCode.POISON`` reply instead of computed again.
  Quorum queues count deliveries themselves (``x-delivery-count``); on a classic queue a
  redelivered request is re-published with its count in a header and the original acked.

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

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import pika
import pika.exceptions

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
from fibrpc.errors import BrokerUnreachableError, ErrorCode, RequestError
from fibrpc.handler import Handler, Reply, error_reply
from fibrpc.protocol import ACCEPT_HEADER, DEADLINE_HEADER, DELIVERIES_HEADER

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1
_QUORUM_DELIVERIES: Final = "x-delivery-count"
#: The longest the consume loop waits for I/O before it looks at its flags again.
_TURN: Final = 0.25
#: Seconds a closing worker gives the broker to acknowledge before dropping the socket.
_CLOSE_WITHIN: Final = 2.0


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
    dropped: int = 0  # no reply_to: nowhere to answer
    expired: int = 0  # deadline passed before it was computed: skipped
    poison: int = 0  # delivered too often: refused
    redelivered: int = 0  # came back after a worker died or a connection dropped
    reconnects: int = 0


class Worker:
    """Consumes requests until asked to stop, reconnecting as needed, then drains."""

    def __init__(
        self,
        settings: WorkerSettings,
        handler: Handler | None = None,
        *,
        board: inflight.Board | None = None,
        index: int = 0,
    ) -> None:
        """``board`` and ``index``: the supervisor's board of requests in flight and this
        worker's place on it (``fibrpc.inflight``); without one, every redelivery is
        charged as a delivery, since no crash's suspect can be told from the others."""
        self.settings = settings
        self._board = board
        self._index = index
        self._node = index % len(settings.urls)  # the node to try first: spread the load
        self.url = settings.urls[self._node]  # the node connected to (or tried last)
        self._slot = board.slot(index) if board is not None else None
        self.handler = handler or Handler(settings.limits, settings.memo_bytes, settings.memo_dir)
        self.stats = WorkerStats()
        self._stopping = False
        self._in_flight = 0
        self._generation = 0  # bumped per connection: stale compute results are dropped
        self._compute = concurrent.futures.ThreadPoolExecutor(1, "fibrpc-compute")
        self._conn: Any = None
        self._channel: Any = None
        self._consumer_tag: str | None = None
        self._consumer_cancelled = False
        self._logged_expired = 0
        self._metrics = metrics.current()
        self._report: state.WorkerReport | None = None
        if settings.state_dir is not None:
            self._report = state.WorkerReport(Path(settings.state_dir), os.getppid(), os.getpid())
        self._next_tick = 0.0
        self._memo_reported = (0, 0)  # the memo's hits and misses already in the metrics
        self._debug = log.isEnabledFor(logging.DEBUG)  # decided once: per request it costs

    def request_stop(self) -> None:
        """Stop taking requests and drain (safe from a signal handler)."""
        self._stopping = True

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until ``request_stop``, answer what is held, close.

        Reconnects (with backoff) whenever the broker is unreachable or drops the
        connection. Raises ``AccessRefusedError`` (and ``ConfigError``) at once: retrying
        a refused login cannot help, and the supervisor must hear of it.
        """
        parent = os.getppid()
        try:
            for attempt in itertools.count():
                if self._stopping or os.getppid() != parent:
                    break
                try:
                    self._connect()
                except BrokerUnreachableError as exc:
                    delay = backoff.reconnect_delay(attempt)
                    log.warning("%s Retrying in %.2f s.", exc, delay)
                    self._sleep(delay)
                    continue
                if on_ready is not None:
                    self._metrics.worker_up()
                    self._tick(force=True)
                    on_ready()
                    on_ready = None
                try:
                    self._consume(parent)
                    self._drain()
                    break
                except pika.exceptions.ChannelClosedByBroker as exc:
                    if exc.reply_code in refusals.ACCESS_REFUSED_CODES:  # fatal
                        raise amqp.translate(exc, self.url) from exc
                    self.stats.reconnects += 1
                    largest = refusals.max_message_size(exc.reply_text)
                    if largest is not None:
                        self._limit_replies(largest)
                    else:
                        log.warning("RabbitMQ closed the channel (%s); reconnecting", exc)
                except (pika.exceptions.ChannelClosed, pika.exceptions.ConsumerCancelled) as exc:
                    # The queue was deleted, say: reconnecting declares it again.
                    self.stats.reconnects += 1
                    log.warning("%s; reconnecting", exc)
                except amqp.ConnectionLost as exc:
                    if self._stopping:
                        break
                    self.stats.reconnects += 1
                    log.warning(
                        "lost the connection to %s (%s); reconnecting to the next node",
                        amqp.redact(self.url),
                        type(exc).__name__,
                    )
                    self._node += 1  # move on: the node may be the one that went away
        finally:
            self._compute.shutdown(wait=False, cancel_futures=True)
            self._close()
            self._tick(force=True)  # the last memo counts reach the metrics
            if self._report is not None:
                self._report.remove()
            log.info(
                "stopped: %s",
                ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self.stats).items()),
            )

    def _limit_replies(self, largest: int) -> None:
        """RabbitMQ closed the channel over a reply larger than its ``max_message_size``
        (``largest`` bytes): from now on a request whose reply would not fit is refused
        as ``reply_too_large`` before computing, naming the broker's limit, and so is the
        one that went over when it comes back (``_handle_request``: refusals are never
        charged as deliveries)."""
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

    def _connect(self) -> None:
        s = self.settings
        self._close()
        self._conn, node = amqp.connect_any(
            s.urls,
            start=self._node,
            heartbeat=s.heartbeat,
            name=f"fibrpc-worker-{os.getpid()}",
            tls=s.tls,
        )
        self._node = node
        self.url = s.urls[node]
        try:
            self._channel = self._conn.channel()
            amqp.declare_request_queue(self._channel, s.queue, queue_type=s.queue_type)
            self._channel.basic_qos(prefetch_count=s.prefetch)
            # Requests may arrive before consume_direct returns: they belong to this
            # connection's generation.
            self._generation += 1
            self._in_flight = 0
            self._subscribe()
            amqp.keep_ticking(self._conn, _TURN)
        except Exception as exc:
            self._close()
            raise amqp.translate(exc, self.url) from exc
        log.info("consuming %r at %s", s.queue, amqp.redact(self.url))

    def _consume(self, parent: int) -> None:
        while not self._stopping:
            amqp.run_io(self._conn)  # returns within _TURN (keep_ticking)
            if self._channel.is_closed:
                reason = amqp.closing_reason(self._channel)
                if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
                    raise reason
                raise pika.exceptions.ChannelClosed(0, f"The channel closed: {reason}")
            if self._consumer_cancelled:
                self._consume_again()
            self._log_expired()
            self._tick()
            if os.getppid() != parent:
                log.warning("supervisor %d is gone; stopping", parent)
                self._stopping = True

    def _on_cancelled_by_broker(self, frame: Any) -> None:
        """RabbitMQ cancels a consumer whose queue is deleted (or, on a cluster, whose
        queue moved): consume again (``_consume_again``) rather than sit idle."""
        self._consumer_cancelled = True

    def _consume_again(self) -> None:
        """Declare the queue again and consume it on the same channel. The requests this
        worker holds are still its own (their delivery tags live on the channel, not in
        the queue), so those being computed are answered and acked as usual: their
        callers' reply addresses do not depend on the queue."""
        s = self.settings
        log.warning(
            "RabbitMQ cancelled the consumer of %r (the queue was deleted?); declaring it "
            "again, %d request(s) still held",
            s.queue,
            self._in_flight,
        )
        amqp.declare_request_queue(self._channel, s.queue, queue_type=s.queue_type)
        self._subscribe()
        self.stats.reconnects += 1

    def _subscribe(self) -> None:
        """Consume the request queue on this worker's channel."""
        self._consumer_cancelled = False
        self._consumer_tag = amqp.consume_direct(
            self._conn,
            self._channel,
            self.settings.queue,
            self._on_request,
            auto_ack=False,
            on_cancel=self._on_cancelled_by_broker,
        )

    def _drain(self) -> None:
        """Cancel the consumer (what reaches us after that is rejected, to be requeued),
        then wait for computations in flight to reply and ack, up to the drain timeout."""
        deadline = time.monotonic() + self.settings.drain_timeout
        if self._consumer_tag is not None:
            amqp.cancel_direct(
                self._conn, self._channel, self._consumer_tag, self.settings.drain_timeout
            )
        while self._in_flight and time.monotonic() < deadline:
            amqp.run_io(self._conn)
        if self._in_flight:
            log.warning(
                "drain timed out with %d request(s) unanswered; the broker requeues them",
                self._in_flight,
            )
        self._log_expired()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            amqp.close_within(conn, _CLOSE_WITHIN)

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
        ``channel`` is pika's own channel (``consume_direct``); replies and acks go
        through ``self._channel``, the ``BlockingChannel`` around it."""
        channel = self._channel
        try:
            self._handle_request(channel, method, props, body)
        except (pika.exceptions.AMQPError, *amqp.ConnectionLost):
            raise
        except Exception:
            log.exception("failed on a request (correlation_id=%r); dropped", props.correlation_id)
            with contextlib.suppress(Exception):
                amqp.ack_soon(channel, method.delivery_tag)

    def _handle_request(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        started = time.perf_counter()
        received = time.monotonic()
        tag = method.delivery_tag
        if not amqp.valid_reply_to(props.reply_to):
            self.stats.dropped += 1
            self._metrics.discarded(metrics.UNKNOWN_ALGO, "dropped")
            log.warning(
                "dropped a message with no usable reply_to (reply_to=%r, correlation_id=%r)",
                props.reply_to,
                props.correlation_id,
            )
            amqp.ack_soon(channel, tag)
            return
        if self._debug:
            log.debug("received %r (%d bytes)", props.correlation_id, len(body))
        headers = props.headers if isinstance(props.headers, dict) else {}
        budget = _budget_ms(props.expiration)
        # Just taken in, a request cannot have been held past its TTL by this worker's
        # clock: only the wall-clock rule of deliveries.expired can hold, inlined here.
        deadline: Any = headers.get(DEADLINE_HEADER) if headers else None
        if _is_int(deadline) and time.time() * 1000 > deadline + (budget or 0):
            self.stats.expired += 1
            self._metrics.discarded(metrics.UNKNOWN_ALGO, "expired")
            amqp.ack_soon(channel, tag)
            self._skipped(props, tag, started)
            return
        if props.content_type is not None and (
            protocol.media_type(props.content_type) == coalesce.CALLS
        ):
            self._handle_calls(channel, method, props, headers, body, received, started)
            return
        accept = headers.get(ACCEPT_HEADER) if headers else None
        request = self.handler.decode(body, props.content_type, props.type, accept)
        if method.redelivered or _QUORUM_DELIVERIES in headers:
            self.stats.redelivered += 1
            self._metrics.redelivered()
            # A refusal computes nothing, so it cannot be what crashed a worker: it is
            # answered, never charged as a delivery.
            refused = isinstance(request, Reply)
            if not refused and self._held_back(channel, method, props, headers, body, started):
                return
        if isinstance(request, Reply):
            self._reply(channel, tag, props, request, metrics.UNKNOWN_ALGO, 0, started)
        elif self.handler.is_heavy(request):
            self._in_flight += 1
            conn, generation = self._conn, self._generation
            key = inflight.key(props.reply_to, props.correlation_id)
            future = self._compute.submit(
                self._compute_unless_expired, request, headers, budget, received, key
            )

            def done(f: concurrent.futures.Future[Reply | None]) -> None:
                if f.cancelled():
                    return
                reply = f.result()
                with contextlib.suppress(Exception):  # the connection may be gone
                    amqp.call_threadsafe(
                        conn,
                        lambda: self._finish_heavy(
                            generation, channel, tag, props, reply, request, started
                        ),
                    )

            future.add_done_callback(done)
        else:
            slot = self._slot
            if slot is not None:
                slot.begin(inflight.INLINE, inflight.key(props.reply_to, props.correlation_id))
            reply = self.handler.compute(request)
            if slot is not None:
                slot.end(inflight.INLINE)
            self._reply(
                channel, tag, props, reply, request.algo, len(request.ns), started, request.batch
            )

    # -- coalesced calls (fibrpc.coalesce) ------------------------------------------------

    def _handle_calls(
        self,
        channel: Any,
        method: Any,
        props: Any,
        headers: dict[str, Any],
        body: bytes,
        received: float,
        started: float,
    ) -> None:
        """A coalesced message: each call decoded, skipped, split out or computed alone
        (``coalesce.plan``); the light ones answered in one reply, then the message
        acked. A redelivered message that is a crash suspect is split into one message
        per call, carrying its count, so that only a call that kills again is charged."""
        tag = method.delivery_tag
        try:
            calls = coalesce.decode_calls(body, self.handler.limits)
        except RequestError as exc:  # the message itself is refused: every call with it
            self._reply(channel, tag, props, error_reply(exc), metrics.UNKNOWN_ALGO, 0, started)
            return
        counted = self._crash_count(method, props, headers)
        now_ms, now = time.time() * 1000, time.monotonic()

        def expired(call: coalesce.Incoming) -> bool:
            if call.deadline_ms is None and call.ttl_ms is None:
                return False
            return deliveries.expired(
                now_wall_ms=now_ms,
                now=now,
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
            self._publish_alone(
                channel, method.routing_key, props, headers, call, counted, received
            )
        if plan.expired:
            self.stats.expired += len(plan.expired)
            for call in plan.expired:
                self._metrics.discarded(call.algo, "expired")
                if self._debug:
                    log.debug("skipped call %r: its deadline had passed", call.id)
        if not plan.heavy_together:
            slot = self._slot
            if slot is not None:
                slot.begin(inflight.INLINE, inflight.key(props.reply_to, props.correlation_id))
            answers = self.handler.answer_calls(plan.light)
            if slot is not None:
                slot.end(inflight.INLINE)
            self._reply_calls(channel, tag, props, plan, answers, started)
            return
        self._answer_off_thread(channel, tag, props, plan, started)

    def _crash_count(self, method: Any, props: Any, headers: dict[str, Any]) -> int | None:
        """The deliveries counted against a coalesced message that was being computed
        when a worker died (``deliveries.judge``), or None if it is not a suspect."""
        if not (method.redelivered or _QUORUM_DELIVERIES in headers):
            return None
        self.stats.redelivered += 1
        self._metrics.redelivered()
        board = self._board
        suspect = board is None or board.is_suspect(
            inflight.key(props.reply_to, props.correlation_id), worker=self._index
        )
        prior = headers.get(DELIVERIES_HEADER)
        verdict = deliveries.judge(
            redelivered=True,
            suspect=suspect,
            counted=prior if _is_int(prior) else None,
            max_deliveries=self.settings.max_deliveries,
        )
        return None if verdict.action is deliveries.Action.COMPUTE else verdict.deliveries

    def _answer_off_thread(
        self, channel: Any, tag: int, props: Any, plan: coalesce.Plan, started: float
    ) -> None:
        """Light calls heavy together: computed as a whole on the compute thread (marked
        on the board under the message's key), answered back on the I/O thread."""
        self._in_flight += 1
        conn, generation = self._conn, self._generation
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

        def done(f: concurrent.futures.Future[list[coalesce.Answer]]) -> None:
            if f.cancelled():
                return
            answers = f.result()

            def finish() -> None:
                if generation != self._generation or not channel.is_open:
                    return  # the broker requeued it with the connection
                self._in_flight -= 1
                self._reply_calls(channel, tag, props, plan, answers, started)

            with contextlib.suppress(Exception):  # the connection may be gone
                amqp.call_threadsafe(conn, finish)

        self._compute.submit(compute).add_done_callback(done)

    def _reply_calls(
        self,
        channel: Any,
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
            amqp.publish_soon(
                channel,
                props.reply_to,
                coalesce.encode_answers(answers),
                correlation_id=props.correlation_id,
                content_type=coalesce.CALLS,
            )
        amqp.ack_soon(channel, tag)
        if self._debug:
            log.debug("answered %d call(s) of %r", len(answers), props.correlation_id)
        self._trace(props, tag, started, "ok", values=len(answers), batch=True)

    def _publish_alone(
        self,
        channel: Any,
        routing_key: str,
        props: Any,
        headers: dict[str, Any],
        call: coalesce.Incoming,
        counted: int | None,
        received: float,
    ) -> None:
        """Re-publish one call of a coalesced message as a single JSON request whose
        correlation id is the call's id (its own deadline and TTL; ``counted``: its
        deliveries so far, after a crash), to be answered alone."""
        copied = {
            k: v
            for k, v in headers.items()
            if k not in (_QUORUM_DELIVERIES, DELIVERIES_HEADER, DEADLINE_HEADER)
        }
        if call.deadline_ms is not None:
            copied[DEADLINE_HEADER] = call.deadline_ms
        if counted is not None:
            copied[DELIVERIES_HEADER] = counted
        expiration = None
        if call.ttl_ms is not None:
            left = call.ttl_ms - int((time.monotonic() - received) * 1000)
            expiration = str(max(1, left))
        properties = pika.BasicProperties(
            content_type=protocol.JSON,
            correlation_id=call.id,
            reply_to=props.reply_to,
            expiration=expiration,
            headers=copied or None,
        )
        amqp.publish_properties_soon(
            channel, routing_key, coalesce.single_request(call), properties
        )

    def _held_back(
        self,
        channel: Any,
        method: Any,
        props: Any,
        headers: dict[str, Any],
        body: bytes,
        started: float,
    ) -> bool:
        """Handle a request that has been delivered before. Returns True when it is taken
        care of here: refused as poison, or re-published with its count
        (``fibrpc.deliveries.judge``: only a suspect of a crash is charged)."""
        board = self._board
        suspect = board is None or board.is_suspect(
            inflight.key(props.reply_to, props.correlation_id), worker=self._index
        )
        counted = headers.get(DELIVERIES_HEADER)
        verdict = deliveries.judge(
            redelivered=True,
            suspect=suspect,
            counted=counted if _is_int(counted) else None,
            max_deliveries=self.settings.max_deliveries,
        )
        if verdict.action is deliveries.Action.COMPUTE:
            return False
        if verdict.action is deliveries.Action.REFUSE_POISON:
            self.stats.poison += 1
            log.error(
                "refusing %r: delivered %d times without an answer, computing when a worker "
                "died each time (limit %d)",
                props.correlation_id,
                verdict.deliveries,
                self.settings.max_deliveries,
            )
            error = RequestError(
                ErrorCode.POISON,
                f"This request was delivered {verdict.deliveries} times without being "
                f"answered (the limit is {self.settings.max_deliveries}); a worker died "
                "computing it each time, so it is not computed again.",
            )
            # Ack first: if replying is what breaks the connection (a reply_to the broker
            # chokes on), the request must not come back once more.
            amqp.ack_soon(channel, method.delivery_tag)
            self._reply(channel, None, props, error_reply(error), metrics.UNKNOWN_ALGO, 0, started)
            return True
        # The count must outlive this delivery: carry it in a copy (on quorum queues too,
        # whose own count also charges the requests that were only prefetched).
        log.warning(
            "request %r was being computed when a worker died; computing it again "
            "(delivery %d of at most %d)",
            props.correlation_id,
            verdict.deliveries,
            self.settings.max_deliveries,
        )
        amqp.publish_properties_soon(
            channel,
            method.routing_key,
            body,
            _copy_properties(props, _recount(headers, verdict.deliveries)),
        )
        amqp.ack_soon(channel, method.delivery_tag)
        return True

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
        channel: Any,
        tag: int,
        props: Any,
        reply: Reply | None,
        request: Any,
        started: float,
    ) -> None:
        if generation != self._generation or not channel.is_open:
            return  # computed for a connection that is gone: the broker requeued it
        self._in_flight -= 1
        if reply is None:
            self.stats.expired += 1
            self._metrics.discarded(request.algo, "expired")
            amqp.ack_soon(channel, tag)
            self._skipped(props, tag, started)
        else:
            self._reply(
                channel, tag, props, reply, request.algo, len(request.ns), started, request.batch
            )

    def _reply(
        self,
        channel: Any,
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
        amqp.publish_soon(
            channel,
            props.reply_to,
            reply.body,
            correlation_id=props.correlation_id,
            content_type=reply.content_type,
        )
        if tag is not None:
            amqp.ack_soon(channel, tag)
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
    # pika decodes 64-bit table integers as its own int subclass: no ``type() is int``.
    return deliveries.expired(
        now_wall_ms=time.time() * 1000,
        now=time.monotonic(),
        received=received,
        deadline_ms=deadline if _is_int(deadline) else None,
        budget_ms=budget,
    )


def _budget_ms(expiration: object) -> int | None:
    """A request's TTL in milliseconds (its ``expiration``), or None."""
    if not isinstance(expiration, str | bytes) or not expiration:
        return None
    try:
        return int(expiration)
    except ValueError:
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _recount(headers: dict[str, Any], deliveries: int) -> dict[str, Any]:
    """The headers of a re-published copy: its count, and not the broker's own count of
    the original (a copy is a new message, not a redelivery)."""
    copied = {k: v for k, v in headers.items() if k != _QUORUM_DELIVERIES}
    copied[DELIVERIES_HEADER] = deliveries
    return copied


def _copy_properties(props: Any, headers: dict[str, Any]) -> Any:
    return pika.BasicProperties(
        content_type=props.content_type,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        expiration=props.expiration,
        type=props.type,
        headers=headers,
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
