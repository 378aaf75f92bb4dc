"""One worker process: consume ``rpc_queue``, compute, reply, then ack.

The consume loop only moves messages; ``fibrpc.handler`` decides what each one means.
A light request (almost all of them) is answered inside the pika callback. A heavy one
(large n, naive recursion) is computed on a single compute thread while the I/O loop
keeps turning, so heartbeats flow and the connection survives; its reply is handed back
to the I/O thread with ``add_callback_threadsafe``, the one pika method that is safe to
call from another thread.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pika

from fibrpc import amqp
from fibrpc.config import (
    DEFAULT_HEARTBEAT,
    DEFAULT_MEMO_BYTES,
    DEFAULT_PREFETCH,
    DEFAULT_QUEUE,
    DEFAULT_URL,
    Limits,
)
from fibrpc.handler import Handler, Reply

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to start: plain values, so they cross ``fork`` and ``spawn``."""

    url: str = DEFAULT_URL
    queue: str = DEFAULT_QUEUE
    queue_type: str = "classic"
    prefetch: int = DEFAULT_PREFETCH
    heartbeat: int = DEFAULT_HEARTBEAT
    memo_bytes: int = DEFAULT_MEMO_BYTES
    drain_timeout: float = 30.0
    limits: Limits = dataclasses.field(default_factory=Limits)


@dataclasses.dataclass(slots=True)
class WorkerStats:
    """Counters of one worker, reported to the supervisor and by ``fibrpc status``."""

    served: int = 0
    errors: int = 0
    dropped: int = 0  # no reply_to: nowhere to answer


class Worker:
    """Consumes requests on one connection until asked to stop, then drains."""

    def __init__(self, settings: WorkerSettings, handler: Handler | None = None) -> None:
        self.settings = settings
        self.handler = handler or Handler(settings.limits, settings.memo_bytes)
        self.stats = WorkerStats()
        self._stopping = False
        self._in_flight = 0
        self._compute = concurrent.futures.ThreadPoolExecutor(1, "fibrpc-compute")
        self._conn: Any = None
        self._channel: Any = None
        self._consumer_tag: str | None = None

    def request_stop(self) -> None:
        """Stop taking requests and drain (safe from a signal handler)."""
        self._stopping = True

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Connect, consume until ``request_stop``, answer what is held, close.

        Raises ``BrokerError`` (translated from pika) when the connection fails.
        """
        s = self.settings
        self._conn = amqp.connect(s.url, heartbeat=s.heartbeat, name=f"fibrpc-worker-{os.getpid()}")
        try:
            self._channel = self._conn.channel()
            amqp.declare_request_queue(self._channel, s.queue, queue_type=s.queue_type)
            self._channel.basic_qos(prefetch_count=s.prefetch)
            self._consumer_tag = self._channel.basic_consume(s.queue, self._on_request)
            log.info("consuming %r at %s", s.queue, amqp.redact(s.url))
            if on_ready is not None:
                on_ready()
            parent = os.getppid()
            while not self._stopping:
                self._conn.process_data_events(time_limit=0.25)
                if os.getppid() != parent:
                    log.warning("supervisor %d is gone; stopping", parent)
                    break
            self._drain()
        except amqp.ConnectionLost as exc:
            raise amqp.translate(exc, s.url) from None
        finally:
            self._compute.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(Exception):
                if self._conn.is_open:
                    self._conn.close()

    def _drain(self) -> None:
        """Cancel the consumer (pika requeues what it had not yet handed us), then
        wait for computations in flight to reply and ack, up to the drain timeout."""
        self._channel.basic_cancel(self._consumer_tag)
        deadline = time.monotonic() + self.settings.drain_timeout
        while self._in_flight and time.monotonic() < deadline:
            self._conn.process_data_events(time_limit=0.1)
        if self._in_flight:
            log.warning(
                "drain timed out with %d request(s) unanswered; they are requeued", self._in_flight
            )
        log.info("drained: served %d, errors %d", self.stats.served, self.stats.errors)

    def _on_request(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        if not props.reply_to:
            self.stats.dropped += 1
            log.warning(
                "dropped a message with no reply_to (correlation_id=%r)", props.correlation_id
            )
            channel.basic_ack(method.delivery_tag)
            return
        request = self.handler.decode(body, props.content_type, props.type)
        if isinstance(request, Reply):
            self._reply(channel, method.delivery_tag, props, request)
        elif self.handler.is_heavy(request):
            self._in_flight += 1
            future = self._compute.submit(self.handler.compute, request)
            tag = method.delivery_tag

            def done(f: concurrent.futures.Future[Reply]) -> None:
                if not f.cancelled():
                    self._conn.add_callback_threadsafe(
                        lambda: self._finish_heavy(channel, tag, props, f.result())
                    )

            future.add_done_callback(done)
        else:
            self._reply(channel, method.delivery_tag, props, self.handler.compute(request))

    def _finish_heavy(self, channel: Any, tag: int, props: Any, reply: Reply) -> None:
        self._in_flight -= 1
        if channel.is_open:
            self._reply(channel, tag, props, reply)

    def _reply(self, channel: Any, tag: int, props: Any, reply: Reply) -> None:
        """Publish the reply, then ack the request: a crash between the two costs a
        duplicate reply (which clients drop), never a lost one."""
        if reply.error is None:
            self.stats.served += 1
        else:
            self.stats.errors += 1
            log.info("refused %r: %s", props.correlation_id, reply.error)
        channel.basic_publish(
            "",
            props.reply_to,
            reply.body,
            pika.BasicProperties(
                correlation_id=props.correlation_id, content_type=reply.content_type
            ),
        )
        channel.basic_ack(tag)


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
