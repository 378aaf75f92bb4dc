"""Prometheus metrics of one server, summed over its worker processes.

Off unless ``fibrpc serve --metrics-port P`` asks for them: a worker then records through
``Metrics``, whose methods do nothing, so an unmeasured server pays one empty method call
per message and never imports ``prometheus_client``.

On, the supervisor calls ``start_exporter`` before it forks anything. That makes a private
directory, names it in ``PROMETHEUS_MULTIPROC_DIR`` and only then imports
``prometheus_client``, which picks its multiprocess value class at import time. Every
process (the supervisor, and each worker it forks afterwards) then writes its counters to
memory-mapped files of its own in that directory, and the supervisor's ``/metrics``
endpoint (a thread started by ``prometheus_client.start_http_server``) adds them up at
each scrape. The counters of a worker that died stay in the sum; its ``fibrpc_workers``
gauge goes (``Exporter.mark_dead``). The directory is removed when the server stops.

A write to a multiprocess metric takes a lock and updates a memory-mapped file, about
1 us; a message touches five (a counter, two histograms of two values each), which
would add 5 us or more to the ~80 us of CPU a worker spends on a small request. So a
worker counts per message in plain dicts and lists (under 1 us) and flushes them to
the files from its consume loop once a second: a scrape lags the work by up to a second,
and a worker killed with SIGKILL takes its last second of counts with it.

The metrics (``algo`` is ``unknown`` for a message refused or skipped before decoding
read its algorithm: dropped, expired in the queue, poison, malformed, out of range...)::

    fibrpc_requests_total{algo,outcome}   messages handled; outcome: ok, an error code
                                          (out_of_range, malformed, poison...), expired
                                          (deadline passed: skipped), abandoned (its caller
                                          cancelled it, or its deadline passed while it was
                                          computed) or dropped (no reply_to)
    fibrpc_request_seconds{algo}          histogram: decode, compute and reply, per message
    fibrpc_batch_size                     histogram: values of n per decoded request
    fibrpc_memo_hits_total                large fast results answered from the server's memo
    fibrpc_memo_misses_total              large fast results computed (memo-eligible)
    fibrpc_deadline_skips_total           requests skipped because their caller gave up
    fibrpc_redeliveries_total             requests that came back after a worker died or a
                                          connection dropped
    fibrpc_worker_restarts_total          workers the supervisor restarted
    fibrpc_workers                        workers consuming now (live processes only)
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any, Final

from fibrpc.errors import ConfigError

log = logging.getLogger(__name__)

#: The variable that switches ``prometheus_client`` to multiprocess mode when it is imported.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Label value of ``algo`` for a message that was not decoded (dropped, expired, poison,
#: malformed).
UNKNOWN_ALGO: Final = "unknown"

#: Upper bounds (seconds) of ``fibrpc_request_seconds``: from a table lookup (~50 us) to
#: naive recursion at its bound (~1 s) and F(10^7) (seconds).
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

#: Upper bounds of ``fibrpc_batch_size``: 1 is a single call, up to the default --max-batch.
BATCH_BUCKETS: Final = (1, 2, 5, 10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000)


class Metrics:
    """What a worker and the supervisor record. This base class records nothing: it is
    what every process uses unless ``start_exporter`` installed ``PrometheusMetrics``."""

    enabled = False

    def answered(self, algo: str, outcome: str, seconds: float, values: int) -> None:
        """A request was answered: ``outcome`` is ``ok`` or the error code replied;
        ``values`` is the number of n it asked for (0 when it was not decoded)."""

    def discarded(self, algo: str, outcome: str) -> None:
        """A request was acked without a reply: ``expired`` or ``dropped``."""

    def redelivered(self) -> None:
        """A request came back: a worker died holding it, or a connection dropped."""

    def memo(self, hits: int, misses: int) -> None:
        """``hits`` and ``misses`` more lookups of the fast memo (deltas, not totals)."""

    def worker_up(self) -> None:
        """This worker process consumes (counted in ``fibrpc_workers`` while it lives)."""

    def worker_restarted(self) -> None:
        """The supervisor restarted a worker."""

    def flush(self) -> None:
        """Write what was counted since the last flush where the exporter reads it."""


class _Pending:
    """Observations of one histogram not yet flushed: a count per bucket, and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        # Bucket i counts values <= bounds[i]: the first bound not below the value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush_into(self, histogram: Any) -> None:
        """Add these observations to a ``prometheus_client`` histogram (child), whose
        buckets are these bounds and +Inf, and start again from nothing."""
        if not any(self.counts):
            return
        # prometheus_client has no public "observe N values at once"; its buckets and sum
        # are values with inc(). tests/test_metrics.py checks the sums this produces.
        for bucket, count in zip(histogram._buckets, self.counts, strict=True):
            if count:
                bucket.inc(count)
        histogram._sum.inc(self.total)
        self.counts = [0] * len(self.counts)
        self.total = 0.0


class PrometheusMetrics(Metrics):
    """Records into ``prometheus_client`` metrics (in multiprocess mode: see the module)."""

    enabled = True

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415 - see module

        # registry=None: in multiprocess mode the files are the registry, and a process
        # must hold exactly one object per metric (two would overwrite each other's value).
        self._requests = Counter(
            "fibrpc_requests",
            "Request messages handled, by algorithm and outcome (ok, an error code, "
            "expired, abandoned or dropped).",
            ["algo", "outcome"],
            registry=None,
        )
        self._seconds = Histogram(
            "fibrpc_request_seconds",
            "Seconds from taking a request to publishing its reply (decode, compute, reply).",
            ["algo"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self._batch = Histogram(
            "fibrpc_batch_size",
            "Values of n per decoded request (1 for a single call).",
            buckets=BATCH_BUCKETS,
            registry=None,
        )
        self._memo_hits = Counter(
            "fibrpc_memo_hits", "Large fast results answered from the server's memo.", registry=None
        )
        self._memo_misses = Counter(
            "fibrpc_memo_misses", "Large fast results computed and memoised.", registry=None
        )
        self._deadline_skips = Counter(
            "fibrpc_deadline_skips",
            "Requests skipped because their deadline had passed.",
            registry=None,
        )
        self._redeliveries = Counter(
            "fibrpc_redeliveries",
            "Requests delivered again after a worker died or a connection dropped.",
            registry=None,
        )
        self._restarts = Counter(
            "fibrpc_worker_restarts", "Worker processes the supervisor restarted.", registry=None
        )
        self._workers = Gauge(
            "fibrpc_workers",
            "Worker processes consuming the queue.",
            multiprocess_mode="livesum",
            registry=None,
        )
        # Counted since the last flush (see the module docstring).
        self._requests_pending: dict[tuple[str, str], int] = {}
        self._seconds_pending: dict[str, _Pending] = {}
        self._batch_pending = _Pending(BATCH_BUCKETS)
        self._deadline_skips_pending = 0

    def answered(self, algo: str, outcome: str, seconds: float, values: int) -> None:
        key = (algo, outcome)
        self._requests_pending[key] = self._requests_pending.get(key, 0) + 1
        pending = self._seconds_pending.get(algo)
        if pending is None:
            pending = self._seconds_pending[algo] = _Pending(LATENCY_BUCKETS)
        pending.add(seconds)
        if values:
            self._batch_pending.add(values)

    def discarded(self, algo: str, outcome: str) -> None:
        key = (algo, outcome)
        self._requests_pending[key] = self._requests_pending.get(key, 0) + 1
        if outcome == "expired":
            self._deadline_skips_pending += 1

    def flush(self) -> None:
        requests, self._requests_pending = self._requests_pending, {}
        for (algo, outcome), count in requests.items():
            self._requests.labels(algo, outcome).inc(count)
        for algo, pending in self._seconds_pending.items():
            pending.flush_into(self._seconds.labels(algo))
        self._batch_pending.flush_into(self._batch)
        if self._deadline_skips_pending:
            self._deadline_skips.inc(self._deadline_skips_pending)
            self._deadline_skips_pending = 0

    def redelivered(self) -> None:
        self._redeliveries.inc()

    def memo(self, hits: int, misses: int) -> None:
        if hits:
            self._memo_hits.inc(hits)
        if misses:
            self._memo_misses.inc(misses)

    def worker_up(self) -> None:
        self._workers.set(1)

    def worker_restarted(self) -> None:
        self._restarts.inc()


_current: Metrics = Metrics()


def current() -> Metrics:
    """This process's metrics: ``PrometheusMetrics`` in a server started with a metrics
    port (and in the workers it forks), else the ``Metrics`` that records nothing."""
    return _current


@dataclasses.dataclass(slots=True)
class Exporter:
    """The ``/metrics`` endpoint of one server, and the directory its processes write."""

    directory: str
    url: str
    _server: Any

    def mark_dead(self, pid: int) -> None:
        """Forget the live gauges of a worker that died (its counters stay in the sums)."""
        from prometheus_client import multiprocess  # noqa: PLC0415 - see module

        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Stop serving and remove the directory."""
        global _current
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)
        _current = Metrics()


def start_exporter(host: str, port: int) -> Exporter:
    """Switch this process to multiprocess metrics and serve them on ``host:port``.

    Call it in the supervisor before forking the workers (they inherit the directory and
    ``current()``) and before anything imports ``prometheus_client``. Raises
    ``ConfigError`` when the port cannot be bound, and ``RuntimeError`` when
    ``prometheus_client`` was imported earlier in single-process mode.
    """
    global _current
    directory = tempfile.mkdtemp(prefix="fibrpc-metrics-")
    os.environ[MULTIPROC_ENV] = directory
    try:
        from prometheus_client import (  # noqa: PLC0415 - only now, with the variable set
            CollectorRegistry,
            multiprocess,
            start_http_server,
            values,
        )

        if not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(
                "prometheus_client was imported before the metrics directory was set, so it "
                "cannot sum the workers' metrics; start the exporter first."
            )
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"Cannot serve metrics on {host}:{port}: {exc.strerror or exc}. Choose "
                "another --metrics-port, or 0 for none."
            ) from None
        # Workers are forked from the supervisor: they must not keep its listening socket
        # open (a worker outliving it would hold the port).
        os.register_at_fork(after_in_child=server.socket.close)
        _current = PrometheusMetrics()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        del os.environ[MULTIPROC_ENV]
        raise
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/metrics"
    log.info("serving metrics at %s (workers' files in %s)", url, directory)
    return Exporter(directory, url, server)
