"""One request's path through the worker, and its reply.

``fibrpc.deliveries`` decides each delivery's fate (drop, skip as expired, refuse,
compute light or heavy, republish with its count, refuse as poison, drop as unreplyable);
``RequestPath`` carries the decision out: a light request is computed inline (on the I/O
thread) and answered; a heavy one goes to ``fibrpc.heavypath``, a coalesced message to
``fibrpc.coalesced``, a control message to ``fibrpc.manners``. Reply, then ack; each
request answered or skipped is traced (``_reply``, ``_skipped``) and logged at debug level
by its correlation id. A part of ``fibrpc.server.Worker`` (``fibrpc.workerstate.WorkerParts``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Final, cast

from fibrpc import amqp, coalesce, deliveries, desk, inflight, metrics, protocol, tracing
from fibrpc.deliveries import Decision, Fate
from fibrpc.errors import BrokerError, ErrorCode, RequestError
from fibrpc.handler import Reply, error_reply
from fibrpc.protocol import ACCEPT_HEADER, DELIVERIES_HEADER
from fibrpc.serverlink import ChannelClosedError, LinkLostError
from fibrpc.workerstate import WorkerParts

log = logging.getLogger("fibrpc.server")  # the worker's one logger, as before the split

#: What a request's callback lets through: the link failed, the worker reconnects.
_LINK_ERRORS: Final = (LinkLostError, ChannelClosedError, BrokerError)


class RequestPath(WorkerParts):
    """One delivery: decided, carried out, replied to and acked."""

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
        if desk.is_control(props.content_type):
            self._take_control(method.delivery_tag, props, body, started)
            return
        if self.desk.cancelled(props.reply_to, props.correlation_id):
            self._count_abandoned(metrics.UNKNOWN_ALGO, props)
            self.link.ack(method.delivery_tag)
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
            algo = getattr(request, "algo", metrics.UNKNOWN_ALGO)
            self._charge(decision, method, props, body, headers, started, algo)

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
        self.tally.count(metrics.UNKNOWN_ALGO, "expired")
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
        algo: str = metrics.UNKNOWN_ALGO,
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
        self.tally.count(algo, "poison")
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
        ``tag`` None: already acked (or its channel is gone with its queue)."""
        self.tally.answered(algo, reply.error, time.perf_counter() - started)
        if reply.error is None:
            self.stats.served += 1
            if self._debug:
                log.debug("computed %r: %d value(s) with %r", props.correlation_id, values, algo)
        else:
            self.stats.errors += 1
            log.info("refused %r: %s", props.correlation_id, reply.error)
        replied = time.perf_counter()
        if tag is not None:
            # Remembered before the writes: the broker's close may come during either
            # (pika's stock path writes and waits), and the request then comes back.
            self._replied.append(props)
        self.link.reply(props, reply.body, reply.content_type)
        if tag is not None:
            self.link.ack(tag)
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
            replied=replied,
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
