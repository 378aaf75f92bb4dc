"""The heavy path: a request computed on the compute thread.

A heavy request (large n, naive recursion) is computed on a single compute thread while
the I/O loop keeps turning, so heartbeats flow and the connection survives; its reply is
handed back to the I/O thread (``Worker._hand_back``). One skipped while it
waited (its deadline passed, or its caller cancelled it) is not computed. A part of
``fibrpc.server.Worker`` (``fibrpc.workerstate.WorkerParts``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any, Final, cast

from fibrpc import describe, inflight
from fibrpc.handler import Reply
from fibrpc.workerstate import Latest, Running, WorkerParts, expired

log = logging.getLogger("fibrpc.server")


class HeavyPath(WorkerParts):
    """A request offloaded to the compute thread, and its reply back on the I/O thread."""

    def _offload(
        self,
        tag: int,
        props: Any,
        request: Any,
        headers: dict[str, Any] | None,
        budget: int | None,
        started: float,
    ) -> None:
        """Compute on the compute thread; the reply comes back to the I/O thread. A
        request delivered again while this worker still computes it (the broker closed
        the channel meanwhile: its consumer_timeout, say) joins that computation, whose
        result answers and acks the latest delivery: computed again, it would be
        dropped again at the next close, for ever."""
        received = time.monotonic()
        self._in_flight += 1
        generation = self._generation
        key = inflight.key(props.reply_to, props.correlation_id)
        computing = self._computing
        latest = computing.get(key)
        if latest is not None and latest.generation != generation:
            if latest.generation in self._orphans:
                # Its consumer was cancelled (RabbitMQ 4.3 cancels a quorum queue's
                # consumer past the timeout): answered with this delivery's ack now,
                # not as an orphan, and counted in flight once.
                self._in_flight -= 1
                self._orphan_settled()
            log.warning(
                "request %r came back while this worker still computes it (its channel "
                "was closed, or its consumer cancelled); the computation under way will "
                "answer it",
                props.correlation_id,
            )
            latest.generation, latest.tag = generation, tag
            return
        delivery = Latest(generation, tag)
        computing.setdefault(key, delivery)  # a duplicate of the same channel: its own
        running = Running(
            key, tag, props, request.algo, headers or {}, budget, received, generation
        )
        future = self._compute.submit(self._compute_unless_expired, request, running)

        def finish(reply: Reply | None) -> None:
            if computing.get(key) is delivery:
                del computing[key]
            self._finish_heavy(delivery.generation, delivery.tag, props, reply, request, started)

        def done(f: concurrent.futures.Future[Reply | None]) -> None:
            if f.cancelled():
                return
            reply = f.result()
            self._hand_back(lambda: finish(reply))

        future.add_done_callback(done)

    def _compute_unless_expired(self, request: Any, running: Running) -> Reply | None:
        """On the compute thread: skip a request whose deadline passed while it waited
        (or that was cancelled: ``_finish_heavy`` tells them apart); mark it on the board
        and as ``_running`` while it is computed."""
        headers, budget = running.headers, running.budget
        if (headers or budget is not None) and expired(headers, budget, running.received):
            return None
        if self.desk.cancelled(running.props.reply_to, running.props.correlation_id):
            return _CANCELLED
        slot = self._slot
        self._busy_until = time.time() + (
            budget / 1000.0 if budget is not None else describe.EXPECTED_WITHOUT_DEADLINE
        )
        self._running = running
        if slot is not None:
            slot.begin(inflight.HEAVY, running.key)
        try:
            return self.handler.compute(request)
        finally:
            self._running = None
            self._busy_until = None
            if slot is not None:
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
        fate = self._fate_of(
            generation,
            lambda: self._finish_heavy(generation, tag, props, reply, request, started),
        )
        if fate is None:
            return  # computed for a connection that is gone: the broker requeued it
        self._in_flight -= 1
        if reply is _CANCELLED:  # cancelled while it waited for the compute thread
            self._count_abandoned(request.algo, props)
            if fate:
                self.link.ack(tag)
        elif reply is None:
            self.stats.expired += 1
            self.tally.count(request.algo, "expired")
            self._metrics.discarded(request.algo, "expired")
            if fate:
                self.link.ack(tag)
            self._skipped(props, tag, started)
        else:
            self._reply(
                tag if fate else None,
                props,
                reply,
                request.algo,
                len(request.ns),
                started,
                request.batch,
            )


#: What the compute thread returns for a request cancelled before it started.
_CANCELLED: Final = cast(Reply, object())
