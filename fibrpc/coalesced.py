"""Coalesced calls (``fibrpc.coalesce``) in the worker: one message, many calls.

Each call is decoded, skipped, split out or computed alone (``coalesce.plan``); the light
ones are answered in one reply, then the message acked. A redelivered message charged
for a crash is split into one message per call, carrying its count, so that only a call
that kills again is charged further. A part of ``fibrpc.server.Worker``
(``fibrpc.workerstate.WorkerParts``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

from fibrpc import coalesce, deliveries, inflight, metrics
from fibrpc.deliveries import Fate
from fibrpc.errors import RequestError
from fibrpc.handler import error_reply
from fibrpc.protocol import DELIVERIES_HEADER
from fibrpc.workerstate import WorkerParts

log = logging.getLogger("fibrpc.server")  # the worker's one logger, as before the split


class CoalescedCalls(WorkerParts):
    """A coalesced message's calls: planned, answered together, acked."""

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
            fate = self._fate_of(generation, lambda: finish(answers))
            if fate is None:
                return  # the broker requeued it with the connection
            self._in_flight -= 1
            self._reply_calls(tag if fate else None, props, plan, answers, started)

        def done(f: concurrent.futures.Future[list[coalesce.Answer]]) -> None:
            if not f.cancelled():
                answers = f.result()
                self._hand_back(lambda: finish(answers))

        self._compute.submit(compute).add_done_callback(done)

    def _reply_calls(
        self,
        tag: int | None,
        props: Any,
        plan: coalesce.Plan,
        answers: list[coalesce.Answer],
        started: float,
    ) -> None:
        """Publish the answers of a coalesced message (the refused calls' and the
        computed ones', in request order; none: no reply), then ack it (``tag`` None:
        not, its channel is gone). Counted per call."""
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
        replied = time.perf_counter()
        if tag is not None:
            self._replied.append(props)  # before the writes, as ``_reply`` does
        if answers:
            self.link.reply(props, coalesce.encode_answers(answers), coalesce.CALLS)
        if tag is not None:
            self.link.ack(tag)
        if self._debug:
            log.debug("answered %d call(s) of %r", len(answers), props.correlation_id)
        self._trace(props, tag, started, "ok", values=len(answers), batch=True, replied=replied)
