"""The load generator behind ``fibrpc bench``: how fast is fibrpc, end to end, here?

Six scenarios, each the way a real caller would use ``fibrpc.Client``'s public API:

``sequential``
    One ``client.call`` at a time: the RabbitMQ tutorial's pattern. Latency is per call.
``pipelined``
    One message per call, up to ``window`` in flight (``client.submit``). Latency runs
    from the call to ``submit`` (a wait for a free slot in the window included) to the
    moment the future is resolved, stamped by a done callback on the client's I/O thread.
``asyncio``
    ``pipelined`` through ``fibrpc.aio.AsyncClient``: ``window`` tasks of one event loop,
    each awaiting ``client.call`` for the next n. Latency is per call.
``tasks``
    Independent callers: ``config.BENCH_TASKS`` (2,000) tasks of one event loop, each
    awaiting ``AsyncClient.call`` for the next n, the client's window as large. The calls
    waiting at one turn share messages (``fibrpc.coalesce``). Latency is per call.
``threads``
    Independent callers: ``config.BENCH_THREADS`` (32) threads, each calling
    ``Client.call`` for the next n on one shared client. Latency is per call.
``batched``
    ``batch_size`` values of n per message, ``batch_window`` messages in flight
    (``client.imap``). Latency is per batch message, and is what an ``imap`` consumer
    sees: from the moment ``imap`` draws the batch's first n from its input (just after
    it sent the previous batch) to the moment it yields the batch's first result, in
    order.

What is timed is only the calls: the values of n are drawn before the clock starts, and
every result is checked against an oracle after it stops (``FAST_TABLE`` for n <= 93,
``gmpy2.fib`` beyond). A refused call or a timeout is counted in ``errors`` and the run
goes on; so is a result that differs from the oracle, and a call the client never
resolves (not even by its timeout: a client bug, which must not hang the run). Losing the
server or the broker ends the run with the client's own error.

``--spawn N`` starts ``fibrpc serve --workers N`` on a queue of the run's own, waits for
its ``ready:`` line, and stops it (SIGTERM, then SIGKILL to its process group) however
the run ends; the queue is deleted afterwards. ``SpawnError``, a ``FibrpcError``, says
why a spawned server did not come up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

import gmpy2
import numpy as np

from fibrpc import amqp, config, serving
from fibrpc.client import Client
from fibrpc.config import DEFAULT_QUEUE, DEFAULT_TIMEOUT, DEFAULT_URL
from fibrpc.errors import CallTimeoutError, RequestError, SpawnError
from fibrpc.numbers import DEFAULT_ALGORITHM, FAST_TABLE, ITER_MAX_N
from fibrpc.tls import TLSOptions
from fibrpc.urls import redact, split_urls

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_WINDOW",
    "DEFAULT_CALLS",
    "DEFAULT_MAX_N",
    "DEFAULT_SEED",
    "DEFAULT_WINDOW",
    "SCENARIOS",
    "BenchSettings",
    "Progress",
    "Report",
    "ScenarioResult",
    "SpawnError",
    "SpawnedServer",
    "count_mismatches",
    "draw_ns",
    "expected",
    "percentile_ms",
    "run",
    "spawned_server",
]

log = logging.getLogger(__name__)

#: The bench command's defaults, documented in fibrpc.config (the CLI reads them there).
SCENARIOS: Final = config.BENCH_SCENARIOS
DEFAULT_CALLS: Final = config.BENCH_CALLS
DEFAULT_MAX_N: Final = config.BENCH_MAX_N
DEFAULT_SEED: Final = config.BENCH_SEED
DEFAULT_WINDOW: Final = config.BENCH_WINDOW
DEFAULT_BATCH_WINDOW: Final = config.BENCH_BATCH_WINDOW
DEFAULT_BATCH_SIZE: Final = config.BENCH_BATCH_SIZE

SPAWN_READY_TIMEOUT: Final = 60.0
"""Seconds a spawned server may take to log ``ready:``."""

SPAWN_STOP_TIMEOUT: Final = 30.0
"""Seconds a spawned server may take to drain after SIGTERM before its group is killed."""

#: Failures of one call, counted in ``errors``; any other error ends the run.
_CALL_ERRORS: Final = (RequestError, CallTimeoutError)

#: Seconds past a call's timeout after which a still-pending future counts as an error.
_RESOLVE_MARGIN: Final = 30.0

#: Calls answered before the clock starts, so that no scenario pays for a cold start.
_WARM_CALLS: Final = 64


@dataclasses.dataclass(frozen=True, slots=True)
class BenchSettings:
    """What one run measures, and where; every field is a ``fibrpc bench`` option."""

    urls: tuple[str, ...] = (DEFAULT_URL,)
    queue: str = DEFAULT_QUEUE
    scenarios: tuple[str, ...] = SCENARIOS
    calls: int | None = None  # None: DEFAULT_CALLS, per scenario
    algo: str = DEFAULT_ALGORITHM
    max_n: int = DEFAULT_MAX_N
    seed: int = DEFAULT_SEED
    window: int = DEFAULT_WINDOW
    batch_window: int = DEFAULT_BATCH_WINDOW
    batch_size: int = DEFAULT_BATCH_SIZE
    timeout: float = DEFAULT_TIMEOUT
    tls: TLSOptions | None = None
    reply_queue: str = config.DEFAULT_REPLY_QUEUE

    def calls_for(self, scenario: str) -> int:
        """How many calls ``scenario`` makes."""
        return DEFAULT_CALLS[scenario] if self.calls is None else self.calls


@dataclasses.dataclass(frozen=True, slots=True)
class ScenarioResult:
    """The figures of one scenario; ``as_dict`` is its JSON form, key for key."""

    name: str
    calls: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    #: Why calls failed: the first message of each kind of failure (a refusal's code, or
    #: the error's class), e.g. ``{"out_of_range": "n = 36 is above ..."}``.
    failures: dict[str, str] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The result as the JSON object ``--json`` prints for a scenario."""
        return dataclasses.asdict(self)


class Failures:
    """The calls of one scenario that failed (``_CALL_ERRORS``): how many, and the first
    message of each kind, so that a failed run says why. Failures are rare and may come
    from several threads at once (``threads``): a lock, off the timed path."""

    __slots__ = ("_lock", "count", "first")

    def __init__(self) -> None:
        self.count = 0
        self.first: dict[str, str] = {}
        self._lock = threading.Lock()

    def note(self, exc: BaseException, calls: int = 1) -> None:
        """``calls`` calls failed with ``exc`` (a refused batch fails all its values)."""
        kind = str(exc.code) if isinstance(exc, RequestError) else type(exc).__name__
        with self._lock:
            self.count += calls
            self.first.setdefault(kind, str(exc))


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """A whole run: its settings, the server it spawned (if any) and every scenario."""

    settings: BenchSettings
    results: list[ScenarioResult]
    spawn: int | None = None

    @property
    def errors(self) -> int:
        """Failed or wrong calls over every scenario; the command fails when non-zero."""
        return sum(r.errors for r in self.results)

    def why(self) -> dict[str, str]:
        """The first message of each kind of failure, over every scenario."""
        found: dict[str, str] = {}
        for result in self.results:
            for kind, message in result.failures.items():
                found.setdefault(kind, message)
        return found

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` document: the scenarios first, then what they ran with."""
        s = self.settings
        return {
            "scenarios": [r.as_dict() for r in self.results],
            "algo": s.algo,
            "max_n": s.max_n,
            "seed": s.seed,
            "window": s.window,
            "batch_window": s.batch_window,
            "batch_size": s.batch_size,
            "timeout": s.timeout,
            "spawn": self.spawn,
            "url": ", ".join(redact(url) for url in s.urls),
            "queue": s.queue,
            "reply_queue": s.reply_queue,
        }

    def table(self) -> str:
        """The results as an aligned text table, one line per scenario."""
        header = ("scenario", "calls", "seconds", "calls/s", "p50 ms", "p99 ms", "errors")
        rows = [
            (
                r.name,
                f"{r.calls:,}",
                f"{r.seconds:.2f}",
                f"{r.calls_per_s:,.0f}",
                f"{r.p50_ms:.3f}",
                f"{r.p99_ms:.3f}",
                f"{r.errors:,}",
            )
            for r in self.results
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = []
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells))
        return "\n".join(lines)


# -- the oracle and the statistics ---------------------------------------------------------


def draw_ns(count: int, max_n: int, seed: int) -> list[int]:
    """``count`` values of n uniform in 0..max_n, as Python ints, reproducible by seed.

    numpy draws them in one C loop: a Python loop would cost seconds for the batched
    scenario's two million values, before the clock even starts.
    """
    drawn: list[int] = np.random.default_rng(seed).integers(0, max_n + 1, count).tolist()
    return drawn


def expected(n: int) -> int:
    """F(n) by the oracle: the 64-bit table, or GMP beyond it (independent of the server's
    code path, which for ``fast`` also uses GMP, but through decimal text and back)."""
    return FAST_TABLE[n] if 0 <= n <= ITER_MAX_N else int(gmpy2.fib(n))


def count_mismatches(ns: Sequence[int], results: Sequence[int | None]) -> int:
    """How many results differ from F(n); a None (a call that failed, already counted as
    an error) is skipped. Raises ``ValueError`` if the two lengths differ."""
    table = FAST_TABLE
    if len(ns) != len(results):
        raise ValueError(f"{len(ns)} values of n but {len(results)} results")
    # The usual run, compared in C, a list with a list (a tenth of a loop's cost):
    small = bool(ns) and min(ns) >= 0 and max(ns) <= ITER_MAX_N
    if small and list(map(table.__getitem__, ns)) == list(results):
        return 0
    bad = 0
    for n, result in zip(ns, results, strict=True):
        if result is None:
            continue
        if 0 <= n <= ITER_MAX_N:
            bad += table[n] != result
        else:
            bad += gmpy2.fib(n) != result
    return bad


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1, nearest rank) of latencies, in milliseconds."""
    if not seconds:
        return 0.0
    ordered = sorted(seconds)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return round(ordered[rank - 1] * 1000.0, 4)


def _result(
    name: str,
    ns: list[int],
    results: list[int | None],
    seconds: float,
    latencies: list[float],
    failures: Failures,
) -> ScenarioResult:
    """The figures of scenario ``name``: its calls of ``ns``, ``results`` checked against
    the oracle (a call that failed or gave a wrong result is an error; ``failures`` says
    why the failed ones did)."""
    calls = len(ns)
    return ScenarioResult(
        name=name,
        calls=calls,
        seconds=round(seconds, 6),
        calls_per_s=round(calls / seconds, 1) if seconds > 0 else 0.0,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        errors=failures.count + count_mismatches(ns, results),
        failures=dict(failures.first),
    )


# -- progress ----------------------------------------------------------------------------


class Progress:
    """A one-line ``\\r`` counter on a stream, redrawn at most every 0.2 s.

    Callers call ``update`` only every few hundred calls, so the cost inside a timed loop
    is one clock read then; disabled, it costs a method call that returns at once.
    """

    def __init__(self, name: str, total: int, stream: TextIO | None) -> None:
        self.name = name
        self.total = total
        self.stream = stream
        self._next_draw = 0.0

    def update(self, done: int) -> None:
        """Redraw the line with ``done`` calls finished, if it is time to."""
        if self.stream is None:
            return
        now = time.perf_counter()
        if now >= self._next_draw:
            self._next_draw = now + 0.2
            self.stream.write(f"\r{self.name:<10} {done:>12,} / {self.total:,}")
            self.stream.flush()

    def close(self) -> None:
        """Erase the line, so the table starts on a clean one."""
        if self.stream is not None:
            self.stream.write("\r" + " " * (len(self.name) + 30) + "\r")
            self.stream.flush()


# -- the scenarios -----------------------------------------------------------------------


def run_sequential(client: Client, ns: list[int], algo: str, progress: Progress) -> ScenarioResult:
    """One call at a time; each call's latency is its own wall time."""
    count = len(ns)
    results: list[int | None] = [None] * count
    latencies = [0.0] * count
    failures = Failures()
    clock = time.perf_counter
    started = clock()
    for i, n in enumerate(ns):
        t0 = clock()
        try:
            results[i] = client.call(n, algo)
        except _CALL_ERRORS as exc:
            failures.note(exc)
        latencies[i] = clock() - t0
        if not i & 63:
            progress.update(i)
    seconds = clock() - started
    progress.close()
    return _result("sequential", ns, results, seconds, latencies, failures)


def run_pipelined(client: Client, ns: list[int], algo: str, progress: Progress) -> ScenarioResult:
    """One message per call, as many in flight as the client's window allows.

    The done callback runs on the client's callback thread, woken once for all the
    futures a turn of the connection resolved: the stamp is within microseconds of when
    the result existed, not when this thread got round to looking at it.
    """
    count = len(ns)
    sent = [0.0] * count
    done = [0.0] * count
    clock = time.perf_counter

    def stamp(i: int, _future: object) -> None:
        done[i] = clock()

    futures: list[concurrent.futures.Future[int]] = []
    append = futures.append
    started = clock()
    for i, n in enumerate(ns):
        sent[i] = clock()
        future = client.submit(n, algo)
        future.add_done_callback(functools.partial(stamp, i))
        append(future)
        if not i & 255:
            progress.update(i)
    # Every call has a deadline the client enforces; a future still pending well past it
    # is a client bug, counted as an error rather than left to hang the run.
    _, stuck = concurrent.futures.wait(futures, timeout=client.timeout + _RESOLVE_MARGIN)
    gave_up = clock()
    progress.close()
    results: list[int | None] = [None] * count
    failures = Failures()
    if stuck:
        failures.note(CallTimeoutError("never resolved, not even by its timeout"), len(stuck))
        log.warning("%d call(s) were never resolved, not even by their timeout", len(stuck))
    for i, future in enumerate(futures):
        if future in stuck:
            done[i] = gave_up
            continue
        exc = future.exception()
        if exc is None:
            results[i] = future.result()
        elif isinstance(exc, _CALL_ERRORS):
            failures.note(exc)
        else:
            raise exc
    seconds = max(done) - started
    latencies = [d - s for d, s in zip(done, sent, strict=True)]
    return _result("pipelined", ns, results, seconds, latencies, failures)


def run_batched(
    client: Client, ns: list[int], algo: str, batch_size: int, progress: Progress
) -> ScenarioResult:
    """``batch_size`` values per message through ``client.imap``; latency per message.

    The input is handed to ``imap`` as a chain of ready-made batches, through a generator
    that stamps each batch as ``imap`` draws it: Python code runs once per batch, not once
    per value, on the input side. A refused batch ends an ``imap``; its values are counted
    as errors and a new ``imap`` takes up the next batch.
    """
    batches = [ns[i : i + batch_size] for i in range(0, len(ns), batch_size)]
    drawn = [0.0] * len(batches)
    answered = [0.0] * len(batches)
    results: list[int | None] = []
    failures = Failures()
    clock = time.perf_counter

    def stamped(first: int) -> Iterator[list[int]]:
        for k in range(first, len(batches)):
            drawn[k] = clock()
            yield batches[k]

    k = 0
    started = clock()
    while k < len(batches):
        values = client.imap(itertools.chain.from_iterable(stamped(k)), algo, batch_size=batch_size)
        try:
            while k < len(batches):
                head = next(values)
                answered[k] = clock()
                results.append(head)
                results.extend(itertools.islice(values, len(batches[k]) - 1))
                k += 1
                progress.update(len(results))
        except _CALL_ERRORS as exc:
            answered[k] = clock()
            results.extend([None] * len(batches[k]))
            failures.note(exc, len(batches[k]))
            k += 1
    seconds = clock() - started
    progress.close()
    latencies = [a - d for a, d in zip(answered, drawn, strict=True)]
    return _result("batched", ns, results, seconds, latencies, failures)


def run_asyncio(settings: BenchSettings, ns: list[int], progress: Progress) -> ScenarioResult:
    """``window`` tasks of one event loop, each awaiting ``AsyncClient.call`` for the
    next n: as many calls in flight as ``pipelined`` keeps, through the asyncio client."""
    import asyncio  # noqa: PLC0415 - only this scenario needs them

    from fibrpc.aio import AsyncClient  # noqa: PLC0415

    count = len(ns)
    results: list[int | None] = [None] * count
    latencies = [0.0] * count
    failures = Failures()
    clock = time.perf_counter
    todo = iter(range(count))

    async def caller(client: AsyncClient) -> None:
        for i in todo:
            t0 = clock()
            try:
                results[i] = await client.call(ns[i], settings.algo)
            except _CALL_ERRORS as exc:
                failures.note(exc)
            latencies[i] = clock() - t0
            if not i & 255:
                progress.update(i)

    async def main() -> float:
        async with AsyncClient(
            settings.urls,
            queue=settings.queue,
            timeout=settings.timeout,
            window=settings.window,
            tls=settings.tls,
            reply_queue=settings.reply_queue,
        ) as client:
            await client.map(ns[:_WARM_CALLS], settings.algo, batch_size=1)
            started = clock()
            await asyncio.gather(*(caller(client) for _ in range(settings.window)))
            return clock() - started

    seconds = asyncio.run(main())
    progress.close()
    return _result("asyncio", ns, results, seconds, latencies, failures)


def run_tasks(settings: BenchSettings, ns: list[int], progress: Progress) -> ScenarioResult:
    """``config.BENCH_TASKS`` tasks, each awaiting one ``AsyncClient.call`` at a time."""
    import asyncio  # noqa: PLC0415 - only this scenario needs them

    from fibrpc.aio import AsyncClient  # noqa: PLC0415

    count = len(ns)
    results: list[int | None] = [None] * count
    latencies = [0.0] * count
    failures = Failures()
    clock = time.perf_counter
    todo = iter(range(count))
    tasks = config.BENCH_TASKS

    async def caller(client: AsyncClient) -> None:
        for i in todo:
            t0 = clock()
            try:
                results[i] = await client.call(ns[i], settings.algo)
            except _CALL_ERRORS as exc:
                failures.note(exc)
            latencies[i] = clock() - t0
            if not i & 1023:
                progress.update(i)

    async def main() -> float:
        async with AsyncClient(
            settings.urls,
            queue=settings.queue,
            timeout=settings.timeout,
            window=tasks,
            tls=settings.tls,
        ) as client:
            await asyncio.gather(*(client.call(n, settings.algo) for n in ns[:_WARM_CALLS]))
            started = clock()
            await asyncio.gather(*(caller(client) for _ in range(tasks)))
            return clock() - started

    seconds = asyncio.run(main())
    progress.close()
    return _result("tasks", ns, results, seconds, latencies, failures)


def run_threads(client: Client, ns: list[int], algo: str, progress: Progress) -> ScenarioResult:
    """``config.BENCH_THREADS`` threads sharing ``client``, each calling ``call`` for
    the next n until none is left."""
    count = len(ns)
    results: list[int | None] = [None] * count
    latencies = [0.0] * count
    failures = Failures()
    crashed: list[BaseException] = []
    clock = time.perf_counter
    todo = iter(range(count))
    lock = threading.Lock()

    def caller() -> None:
        while True:
            with lock:  # next() of one iterator from many threads
                i = next(todo, -1)
            if i < 0:
                return
            t0 = clock()
            try:
                results[i] = client.call(ns[i], algo)
            except _CALL_ERRORS as exc:
                failures.note(exc)
            except BaseException as exc:  # the run ends with it, below
                crashed.append(exc)
                return
            latencies[i] = clock() - t0
            if not i & 1023:
                progress.update(i)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(config.BENCH_THREADS)]
    started = clock()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = clock() - started
    progress.close()
    if crashed:
        raise crashed[0]
    return _result("threads", ns, results, seconds, latencies, failures)


def _warm(client: Client, ns: list[int], algo: str, batch_size: int | None) -> None:
    """Answer a few calls before the clock starts (connection, server caches, the
    client's first-call costs); refusals are ignored here, the timed run counts them.
    The first call goes alone: with no server on the queue (``NoServerError``) or no
    broker, the bench says so at once, not once per warm-up call through a window of
    one (15 s for ``sequential``)."""
    with contextlib.suppress(*_CALL_ERRORS):
        client.call(ns[0], algo)
    futures = [client.submit(n, algo) for n in ns[1:_WARM_CALLS]]
    _, stuck = concurrent.futures.wait(futures, timeout=client.timeout + _RESOLVE_MARGIN)
    if stuck:
        raise CallTimeoutError(f"{len(stuck)} warm-up call(s) were never answered.")
    for future in futures:
        exc = future.exception()
        if exc is not None and not isinstance(exc, _CALL_ERRORS):
            raise exc
    if batch_size is not None:
        with contextlib.suppress(*_CALL_ERRORS):
            client.map(ns[: 2 * batch_size], algo, batch_size=batch_size)


def run_scenario(settings: BenchSettings, name: str, stream: TextIO | None) -> ScenarioResult:
    """Run one scenario on a client of its own (its window is the scenario's)."""
    ns = draw_ns(settings.calls_for(name), settings.max_n, settings.seed)
    window = {
        "pipelined": settings.window,
        "batched": settings.batch_window,
        "threads": config.BENCH_THREADS,
    }.get(name, 1)
    progress = Progress(name, len(ns), stream)
    if name == "asyncio":
        return run_asyncio(settings, ns, progress)
    if name == "tasks":
        return run_tasks(settings, ns, progress)
    with Client(
        settings.urls,
        queue=settings.queue,
        timeout=settings.timeout,
        window=window,
        tls=settings.tls,
        reply_queue=settings.reply_queue,
    ) as client:
        batch_size = settings.batch_size if name == "batched" else None
        _warm(client, ns, settings.algo, batch_size)
        if name == "sequential":
            return run_sequential(client, ns, settings.algo, progress)
        if name == "pipelined":
            return run_pipelined(client, ns, settings.algo, progress)
        if name == "batched":
            return run_batched(client, ns, settings.algo, settings.batch_size, progress)
        if name == "threads":
            return run_threads(client, ns, settings.algo, progress)
    raise ValueError(
        f"Unknown scenario {name!r}; choose from {', '.join(config.BENCH_ALL_SCENARIOS)}."
    )


def run(settings: BenchSettings, *, spawn: int | None = None, progress: bool = False) -> Report:
    """Run every scenario of ``settings`` and return the report.

    With ``spawn``, first start a server of that many workers on a queue of its own
    (``settings.queue`` is then ignored) and stop it afterwards, whatever happens; the
    broker is checked first (``BrokerError`` at once when it does not answer).
    ``progress`` draws a counter on stderr. Raises the client's ``FibrpcError`` when the
    broker or the server is lost, ``SpawnError`` when a spawned server does not start.
    """
    stream = sys.stderr if progress else None
    with contextlib.ExitStack() as stack:
        if spawn is not None:
            _check_broker(settings)  # a server would wait for it in silence, forever
            options = _tls_options(settings.tls)
            server = stack.enter_context(spawned_server(settings.urls, spawn, options=options))
            settings = dataclasses.replace(settings, queue=server.queue)
        results = [run_scenario(settings, name, stream) for name in settings.scenarios]
    return Report(settings, results, spawn)


# -- --spawn -----------------------------------------------------------------------------


def _check_broker(settings: BenchSettings) -> None:
    """Connect once, as the client will: ``BrokerError`` now (within the calls' timeout,
    at most 15 s) when the broker cannot be reached or refuses, rather than a spawned
    server waiting out its start-up in silence for a broker that is not there."""
    connection, _ = amqp.connect_any(
        settings.urls,
        name="fibrpc-bench",
        tls=settings.tls,
        connect_timeout=min(settings.timeout, amqp.CONNECT_TIMEOUT),
    )
    amqp.close_within(connection, 1.0)


#: A ``fibrpc serve`` started by ``spawned_server``: ``.queue``, ``.pid``,
#: ``.worker_pids()`` (``fibrpc.serving.ServerProcess``).
SpawnedServer = serving.ServerProcess


@contextlib.contextmanager
def spawned_server(
    url: str | Sequence[str],
    workers: int,
    *,
    ready_timeout: float = SPAWN_READY_TIMEOUT,
    stop_timeout: float = SPAWN_STOP_TIMEOUT,
    options: Sequence[str] = (),
) -> Iterator[SpawnedServer]:
    """Start ``fibrpc serve`` on a fresh queue (with ``options`` added to its command
    line); yield it once it is ready (``fibrpc.serving``).

    The server runs in a session (and process group) of its own, so a Ctrl-C at the
    terminal reaches only this process, which then stops the server in order. SIGTERM and
    SIGHUP to this process are turned into ``SystemExit`` meanwhile, so they too stop it.
    Linux's parent-death signal covers the one case no handler can: this process killed
    with SIGKILL. Raises ``SpawnError`` if the server exits or is not ready in time.
    """
    queue = serving.private_queue("fibrpc-bench")
    urls = split_urls(url)
    with (
        signals_as_exit(),
        tempfile.TemporaryDirectory(prefix="fibrpc-bench-") as tmp,
    ):
        # preexec_fn is safe here: no Client (and so no thread) exists yet.
        server = serving.start(
            urls,
            queue,
            *options,
            log=Path(tmp) / "serve.log",
            workers=workers,
            preexec_fn=_die_with_parent,
        )
        try:
            server.wait_ready(ready_timeout)
            log.info("spawned server pid %d on queue %r", server.pid, queue)
            yield server
        finally:
            try:
                if server.proc.poll() is None:
                    log.info("stopping the spawned server (pid %d)", server.pid)
                code = server.stop(stop_timeout)
                if code == -signal.SIGKILL:
                    log.warning("the spawned server did not stop within %s s", stop_timeout)
            finally:
                serving.delete_queue(urls, queue)


@contextlib.contextmanager
def signals_as_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into ``SystemExit(128 + signum)`` while the block runs, so
    ``finally`` clauses (stopping a spawned server) run; a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _die_with_parent() -> None:
    from fibrpc.server import die_with_parent  # noqa: PLC0415 - only a spawn needs it

    die_with_parent()


def _tls_options(tls: TLSOptions | None) -> list[str]:
    """The ``fibrpc serve`` options that give a spawned server the same TLS settings."""
    if tls is None:
        return []
    options = []
    for flag, value in [
        ("--tls-ca-file", tls.ca_file),
        ("--tls-cert-file", tls.cert_file),
        ("--tls-key-file", tls.key_file),
    ]:
        if value:
            options += [flag, value]
    if not tls.verify:
        options.append("--tls-no-verify")
    return options
