"""Every default of fibrpc in one place, each with the environment variable that sets it.

The CLI reads these through click's ``envvar=``; the library takes them as arguments with
these defaults. docs/configuration.md's table is written from this module.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Final

#: Broker URL (``FIBRPC_URL``): the local broker as guest, like the tutorial.
DEFAULT_URL: Final = "amqp://guest:guest@127.0.0.1:5672/%2F"

#: Request queue (``FIBRPC_QUEUE``): the tutorial's name, so its client works unchanged.
DEFAULT_QUEUE: Final = "rpc_queue"

#: Unacked messages one worker may hold (``FIBRPC_PREFETCH``). High enough to keep a
#: worker busy while replies travel, low enough that a slow request does not strand many
#: others behind it on one worker.
DEFAULT_PREFETCH: Final = 64

#: Largest n per algorithm (``FIBRPC_NAIVE_MAX_N``, ``FIBRPC_FAST_MAX_N``). ``naive`` is
#: exponential: n=35 is about a second of pure Python. ``iter`` is fixed by uint64.
DEFAULT_NAIVE_MAX_N: Final = 35
ITER_MAX_N: Final = 93
DEFAULT_FAST_MAX_N: Final = 10_000_000

#: Largest request body in bytes (``FIBRPC_MAX_BODY_BYTES``).
DEFAULT_MAX_BODY_BYTES: Final = 1 << 20

#: Most values of n in one batch request (``FIBRPC_MAX_BATCH``).
DEFAULT_MAX_BATCH: Final = 100_000

#: Largest reply body in bytes (``FIBRPC_MAX_REPLY_BYTES``); estimated before computing,
#: so a request for a reply too large costs nothing. F(10^7) is about 2.1 MB of digits.
#: RabbitMQ 4 refuses messages over its ``max_message_size`` (16 MiB by default): 15 MiB
#: leaves room for the properties and frames around the body.
DEFAULT_MAX_REPLY_BYTES: Final = 15 << 20

#: RabbitMQ 4's default ``max_message_size`` in bytes: a client checks its requests
#: against it before sending (and against a lower limit once the broker has named one).
BROKER_MAX_MESSAGE_BYTES: Final = 16 << 20

#: Bytes of recent large results ``fast`` keeps (``FIBRPC_MEMO_BYTES``).
DEFAULT_MEMO_BYTES: Final = 64 << 20

#: Deliveries of one request before it is refused as poison (``FIBRPC_MAX_DELIVERIES``):
#: a request that crashed the worker computing it this many times is not tried again.
DEFAULT_MAX_DELIVERIES: Final = 3

#: RabbitMQ 4's default ``delivery-limit`` of quorum queues: after this many deliveries
#: it drops a message (or dead-letters it, if the queue has a dead-letter exchange).
#: ``DEFAULT_MAX_DELIVERIES`` stays under it, so fibrpc answers ``poison`` first.
QUORUM_DELIVERY_LIMIT: Final = 20

#: Seconds a worker may take to answer what it holds on SIGTERM (``FIBRPC_DRAIN_TIMEOUT``).
DEFAULT_DRAIN_TIMEOUT: Final = 30.0

#: Seconds a call waits for its reply (``FIBRPC_TIMEOUT``).
DEFAULT_TIMEOUT: Final = 30.0

#: Seconds without a consumer on the queue before calls fail with ``NoServerError``.
NO_SERVER_GRACE: Final = 1.0

#: AMQP heartbeat in seconds (``FIBRPC_HEARTBEAT``).
DEFAULT_HEARTBEAT: Final = 30

#: Where a client takes its replies (``FIBRPC_REPLY_QUEUE``): ``direct``, RabbitMQ's
#: direct reply-to (``amq.rabbitmq.reply-to``: no queue, the fastest); ``exclusive``, a
#: server-named exclusive queue the client declares on its connection (``amq.gen-...``),
#: for clusters of RabbitMQ 3.10 and requesters taking many replies a second
#: (docs/client.md#where-replies-go).
REPLY_QUEUES: Final = ("direct", "exclusive")
DEFAULT_REPLY_QUEUE: Final = "direct"

#: Calls or batches one client keeps in flight (``FIBRPC_WINDOW``).
DEFAULT_WINDOW: Final = 256

#: Port of a server's Prometheus endpoint (``FIBRPC_METRICS_PORT``): 0, none. Metrics
#: are opt-in: a server without them never loads prometheus-client.
DEFAULT_METRICS_PORT: Final = 0

#: Address the metrics endpoint listens on (``FIBRPC_METRICS_HOST``): loopback, so that
#: turning metrics on does not also publish them to the network.
DEFAULT_METRICS_HOST: Final = "127.0.0.1"

#: Log level of ``serve`` (``FIBRPC_LOG_LEVEL``): one line per lifecycle event and per
#: refused request. ``call`` and ``status`` log only warnings by default: their output is
#: the answer.
DEFAULT_LOG_LEVEL: Final = "info"
DEFAULT_CLIENT_LOG_LEVEL: Final = "warning"

#: Log format (``FIBRPC_LOG_FORMAT``): ``text`` for people, ``json`` for collectors.
DEFAULT_LOG_FORMAT: Final = "text"

#: Port of RabbitMQ's management API on the broker's host, where ``fibrpc status`` looks
#: for message rates unless ``FIBRPC_MANAGEMENT_URL`` says otherwise.
MANAGEMENT_PORT: Final = 15672

#: Seconds ``fibrpc status`` waits for the management API before it reports it missing.
MANAGEMENT_TIMEOUT: Final = 2.0

#: Seconds between two reports of a worker's counters to ``fibrpc status`` and to the
#: metrics endpoint (at most): a status or a scrape lags the work by up to this.
REPORT_INTERVAL: Final = 1.0

# -- fibrpc bench ---------------------------------------------------------------------

BENCH_SCENARIOS: Final = ("sequential", "pipelined", "batched")
"""The scenarios a run takes by default, in this order."""

BENCH_ALL_SCENARIOS: Final = (*BENCH_SCENARIOS, "asyncio", "tasks", "threads")
"""Every scenario ``--scenario`` may name: ``asyncio`` is ``pipelined`` through
``fibrpc.aio.AsyncClient``; ``tasks`` and ``threads`` are independent callers
(``BENCH_TASKS`` asyncio tasks, ``BENCH_THREADS`` threads) each awaiting one single call at
a time, whose calls the client coalesces."""

BENCH_CALLS: Final = {
    "sequential": 3_000,
    "pipelined": 20_000,
    "batched": 2_000_000,
    "asyncio": 20_000,
    "tasks": 100_000,
    "threads": 50_000,
}
"""Calls per scenario when ``--calls`` is not given: a few seconds each on a 2-core
machine, and the counts bench/compare.py runs the baselines of ``../shared/baselines``
with."""

BENCH_MAX_N: Final = 90
"""n is drawn uniformly from 0..max_n; 90 is the baselines' workload."""

BENCH_SEED: Final = 1

BENCH_WINDOW: Final = 128
"""Calls in flight in ``pipelined``: raw_pipeline.py's window in the baseline figures."""

BENCH_BATCH_WINDOW: Final = 8
"""Batch messages in flight in ``batched``: raw_batched.py's window."""

BENCH_BATCH_SIZE: Final = 10_000
"""Values of n per batch message: the client's own automatic batch size."""

BENCH_TASKS: Final = 2_000
"""Tasks of one event loop in ``tasks``, each awaiting ``AsyncClient.call`` in a loop (the
client's window is as large, so every task has its call in flight)."""

BENCH_THREADS: Final = 32
"""Threads in ``threads``, each calling ``Client.call`` in a loop on one shared client."""

ENV_PREFIX: Final = "FIBRPC_"


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one request may ask of a worker; every bound is configurable."""

    naive_max_n: int = DEFAULT_NAIVE_MAX_N
    fast_max_n: int = DEFAULT_FAST_MAX_N
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    #: What sets ``max_reply_bytes``, named in a ``reply_too_large`` refusal: the option,
    #: or the broker's own limit once a worker has run into it.
    max_reply_source: str = "the server's --max-reply-bytes"

    def max_n(self, algo: str) -> int:
        """The largest n ``algo`` accepts."""
        if algo == "naive":
            return self.naive_max_n
        if algo == "iter":
            return ITER_MAX_N
        return self.fast_max_n


def env(name: str, default: str) -> str:
    """The value of ``FIBRPC_<name>``, or ``default``."""
    return os.environ.get(ENV_PREFIX + name, default)
