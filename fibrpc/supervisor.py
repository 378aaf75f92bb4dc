"""The supervisor: one worker process per core, watched, restarted and drained.

Shaped after dramatiq's and rq's: the supervisor warms the kernels once, then forks the
workers with SIGTERM and SIGINT blocked (so no child dies before it has its own
handlers); each child reports "ready" over a pipe once it consumes. Dead children are
reaped and respawned in a small step of their own (``reap``), and a worker that dies
before it is ready, again and again, ends the supervisor with ``ExitCode.CRASH_LOOP``
instead of spinning.

Stopping is two-staged: the first SIGTERM or Ctrl-C asks every worker to drain (finish
and answer what it holds, requeue the rest); a second one kills them and exits with
``ExitCode.FORCED_STOP``.

The supervisor also says what it runs: it keeps a file in the state directory for
``fibrpc status`` (``fibrpc.state``), and, given a metrics port, serves the Prometheus
metrics of all its workers (``fibrpc.metrics``), setting that up before the first fork.
Both are removed when it stops.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

from fibrpc import (
    amqp,
    backoff,
    control,
    describe,
    inflight,
    kernels,
    memo,
    metrics,
    state,
    tracing,
)
from fibrpc.config import DEFAULT_METRICS_HOST, QUORUM_DELIVERY_LIMIT
from fibrpc.errors import (
    AccessRefusedError,
    BrokerError,
    BrokerRefusedError,
    BrokerUnreachableError,
    ConfigError,
)
from fibrpc.exitcodes import ExitCode
from fibrpc.server import Worker, die_with_parent, install_stop_handlers
from fibrpc.workerstate import WorkerSettings

log = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
#: Boot failures in a row (across all slots) before the supervisor gives up.
MAX_BOOT_FAILURES = 5
_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 5.0
#: Seconds between two looks at the recorded signals while waiting.
_SIGNAL_POLL = 0.1


#: cgroup v2's CPU quota of this process's group (in a container, its own).
CPU_MAX: Final = Path("/sys/fs/cgroup/cpu.max")


def cpu_count(cpu_max: Path = CPU_MAX) -> int:
    """The CPUs this process may use (``--workers auto``): those it may run on, and no
    more than its cgroup's CPU quota allows (``docker run --cpus 2`` on a 32-core host is
    2, not 32)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota = cpus_of_quota(cpu_max.read_text())
    except OSError:
        quota = None
    return min(cpus, quota) if quota else cpus


def cpus_of_quota(cpu_max: str) -> int | None:
    """The whole CPUs a cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"`` in microseconds, or
    ``"max PERIOD"``) allows, rounded up, at least 1; None when it sets no limit or
    cannot be read."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


@dataclasses.dataclass(slots=True)
class Slot:
    """One worker position: the process in it and how it has fared."""

    index: int
    process: Any = None
    ready_pipe: Any = None
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    not_before: float = 0.0  # backoff: do not respawn before this monotonic time
    spawned_at: float = 0.0  # time.time() of the last spawn, for `fibrpc status`


class Supervisor:
    """Spawns ``workers`` worker processes and keeps them running until stopped.

    ``metrics_port`` (0: none) and ``metrics_host`` say where to serve the metrics;
    ``settings.state_dir`` where to report to ``fibrpc status`` (None: nowhere).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        workers: int,
        *,
        metrics_port: int = 0,
        metrics_host: str = DEFAULT_METRICS_HOST,
    ) -> None:
        if settings.server_id is None:  # its describe queue (``fibrpc.control``)
            settings = dataclasses.replace(settings, server_id=uuid.uuid4().hex[:16])
        self.settings = settings
        self.slots = [Slot(i) for i in range(workers)]
        #: The per-algorithm counts of the workers that died (``describe.merge``).
        self.retired: dict[str, Any] = {}
        self.boot_failures = 0
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self._ctx = multiprocessing.get_context("fork")
        self._signals = 0  # how many stop signals arrived (``_on_signal``)
        self._signal: int = signal.SIGTERM
        self._all_ready_logged = False
        self._exporter: metrics.Exporter | None = None
        self._metrics: metrics.Metrics = metrics.Metrics()
        self._state_dir: Path | None = None
        self._started_at = time.time()
        #: What each worker computes, shared with them (made here, before any fork).
        self.board = inflight.Board(workers)
        #: The memo all the workers share (``fibrpc.memo``), made in ``run``.
        self.memo_dir: Path | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a signal; return the exit code.

        Raises ``AccessRefusedError``, ``BrokerRefusedError`` or ``ConfigError`` before
        forking anything when the broker refuses the login or the request queue (one in
        another form, say) or the URL cannot work. An unreachable broker is only a
        warning: the workers keep retrying until it answers.
        """
        started = time.monotonic()
        self._started_at = time.time()
        self._preflight()
        try:
            if self.metrics_port:
                # Before any fork: the workers inherit the multiprocess set-up.
                self._exporter = metrics.start_exporter(self.metrics_host, self.metrics_port)
                self._metrics = metrics.current()
            self._open_state()
            self._open_memo()
            kernels.warm()  # once, before forking: the workers share the compiled code
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            log.info(
                "starting %d worker(s) for %r at %s",
                len(self.slots),
                self.settings.queue,
                ", ".join(amqp.redact(url) for url in self.settings.urls),
            )
            for slot in self.slots:
                self._spawn(slot)
            code = ExitCode.OK
            while not self._signals:
                self._wait(_SIGNAL_POLL)
                self._collect_ready(started)
                failure = self.reap(respawn=True)
                if failure is not None:
                    code = failure
                    break
            code = self._stop(code)
            # Nothing is left for a signal to stop, and at exit Python puts back the
            # default action of the signals it handled: a signal then (a second SIGTERM
            # just after the first, on an idle server) would end it bare, exit 143.
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_IGN)
            return int(code)
        finally:
            self._close_state()
            self._close_memo()
            self._delete_describe_queue()
            if self._exporter is not None:
                self._exporter.close()

    # -- the memo -------------------------------------------------------------------------

    def _open_memo(self) -> None:
        """Make the server's memo before forking; without one (``--memo-bytes 0``, or no
        place to make it), workers keep a memo each."""
        if self.settings.memo_bytes <= 0:
            return
        self.memo_dir = memo.create(os.getpid())
        if self.memo_dir is not None:
            self.settings = dataclasses.replace(self.settings, memo_dir=str(self.memo_dir))
            log.debug(
                "the workers share a memo of %d bytes in %s",
                self.settings.memo_bytes,
                self.memo_dir,
            )

    def _close_memo(self) -> None:
        """Remove the memo (the workers have stopped)."""
        directory, self.memo_dir = self.memo_dir, None
        if directory is not None:
            memo.remove(directory)

    # -- what `fibrpc status` reads --------------------------------------------------------

    def _open_state(self) -> None:
        if self.settings.state_dir is None:
            return
        self._state_dir = state.prepare(Path(self.settings.state_dir))
        if self._state_dir is None:
            self.settings = dataclasses.replace(self.settings, state_dir=None)
        else:
            state.prune(self._state_dir)

    def _write_state(self) -> None:
        if self._state_dir is None:
            return
        data = {
            "id": self.settings.server_id,
            "pid": os.getpid(),
            "queue": self.settings.queue,
            "queue_type": self.settings.queue_type,
            "url": ", ".join(amqp.redact(url) for url in self.settings.urls),
            "started": self._started_at,
            "metrics": self._exporter.url if self._exporter is not None else None,
            "workers": [
                {
                    "index": slot.index,
                    "pid": slot.process.pid,
                    "started": slot.spawned_at,
                    "ready": slot.ready,
                    "restarts": slot.restarts,
                }
                for slot in self.slots
                if slot.process is not None
            ],
            "retired": self.retired,
        }
        try:
            state.write_json(state.server_path(self._state_dir, os.getpid()), data)
        except OSError as exc:
            log.warning("cannot write the state for `fibrpc status`: %s", exc)

    def _close_state(self) -> None:
        directory, self._state_dir = self._state_dir, None
        if directory is None:
            return
        supervisor = os.getpid()
        state.remove(state.server_path(directory, supervisor))
        for path in directory.glob(f"{supervisor}-*.json"):
            state.remove(path)  # workers killed before they could remove their own

    def _preflight(self) -> None:
        """Log in and declare the request queue once, so that a refusal ends ``serve``
        with its reason before any worker is forked."""
        s = self.settings
        try:
            connection, node = amqp.connect_any(s.urls, name="fibrpc-supervisor", tls=s.tls)
        except BrokerUnreachableError as exc:
            log.warning("%s The workers will keep trying.", exc)
            return
        try:
            with amqp.translating(s.urls[node]):
                amqp.declare_request_queue(connection.channel(), s.queue, queue_type=s.queue_type)
            if s.queue_type == "quorum" and s.max_deliveries >= QUORUM_DELIVERY_LIMIT:
                log.warning(
                    "RabbitMQ 4 drops a quorum queue's message after %d deliveries (its "
                    "default delivery-limit): with --max-deliveries %d a poison request may be "
                    "dropped rather than refused, and its caller times out",
                    QUORUM_DELIVERY_LIMIT,
                    s.max_deliveries,
                )
        except BrokerUnreachableError as exc:  # the connection dropped meanwhile
            log.warning("%s The workers will keep trying.", exc)
        finally:
            amqp.close_within(connection)

    def _delete_describe_queue(self) -> None:
        """Delete this server's describe queue (``fibrpc.control``) once its workers have
        stopped; best effort (RabbitMQ deletes it a minute later anyway)."""
        s = self.settings
        if s.server_id is None:
            return
        try:
            connection, _ = amqp.connect_any(
                s.urls, name="fibrpc-supervisor", tls=s.tls, connect_timeout=2.0
            )
        except BrokerError:
            return
        try:
            with amqp.translating(s.urls[0]):
                connection.channel().queue_delete(control.server_queue_name(s.queue, s.server_id))
        except BrokerError as exc:
            log.debug("could not delete the describe queue: %s", exc)
        finally:
            amqp.close_within(connection)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Only record the signal: logging, killing and exiting are the main loop's (a
        handler may interrupt any of them, and logging is not re-entrant)."""
        self._signals += 1
        self._signal = signum

    def _stop(self, code: ExitCode) -> ExitCode:
        """Drain every worker (SIGTERM), then kill any that outlive the drain timeout; a
        second signal meanwhile kills them at once (``ExitCode.FORCED_STOP``)."""
        if self._signals:
            log.info(
                "received %s: draining (send it again to stop at once)",
                signal.Signals(self._signal).name,
            )
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                os.kill(slot.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout + 5.0
        while (alive := self._alive()) and time.monotonic() < deadline:
            if self._signals > 1:
                log.warning(
                    "received %s again: killing the workers", signal.Signals(self._signal).name
                )
                self._kill_all()
                return ExitCode.FORCED_STOP
            multiprocessing.connection.wait([p.sentinel for p in alive], _SIGNAL_POLL)
        if self._kill_all():
            log.warning("some workers outlived the drain timeout and were killed")
        log.info("stopped")
        return code

    def _alive(self) -> list[Any]:
        return [s.process for s in self.slots if s.process is not None and s.process.is_alive()]

    def _kill_all(self) -> bool:
        killed = False
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.kill()
                slot.process.join(5)
                killed = True
        return killed

    # -- workers --------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_worker_main,
            args=(self.settings, send, self.board, slot.index),
            name=f"fibrpc-worker-{slot.index}",
            daemon=False,
        )
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        send.close()
        slot.process, slot.ready_pipe, slot.ready = process, receive, False
        slot.started_at = time.monotonic()
        slot.spawned_at = time.time()
        log.debug("spawned worker %d (pid %d)", slot.index, process.pid)
        self._write_state()

    def _wait(self, timeout: float) -> None:
        waitables: list[Any] = []
        for slot in self.slots:
            if slot.process is not None:
                waitables.append(slot.process.sentinel)
                if not slot.ready:
                    waitables.append(slot.ready_pipe)
        if waitables:
            multiprocessing.connection.wait(waitables, timeout)
        else:
            time.sleep(timeout)

    def _collect_ready(self, started: float) -> None:
        for slot in self.slots:
            if slot.process is None or slot.ready or not slot.ready_pipe.poll():
                continue
            try:
                slot.ready_pipe.recv_bytes()
            except (EOFError, OSError):
                continue  # died before ready: reap() sees it
            slot.ready = True
            self.boot_failures = 0
            log.debug("worker %d (pid %d) ready", slot.index, slot.process.pid)
            self._write_state()
        if not self._all_ready_logged and all(s.ready for s in self.slots):
            self._all_ready_logged = True
            log.info(
                "ready: %d worker(s) consuming %r in %.2f s (pids %s)",
                len(self.slots),
                self.settings.queue,
                time.monotonic() - started,
                " ".join(str(s.process.pid) for s in self.slots),
            )

    def reap(self, *, respawn: bool) -> ExitCode | None:
        """Collect dead workers and, if ``respawn``, start new ones after a backoff
        (rq's ``check_workers(respawn=...)``: ``reap_workers``, then ``respawn_due``).

        Returns the code to stop with when restarting cannot help: the broker refused a
        worker, or workers keep dying before they are ready (``ExitCode.CRASH_LOOP``).
        """
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is not None and not slot.process.is_alive():
                failure = self._reaped(slot, now)
                if failure is not None:
                    return failure
        if respawn:
            self.respawn_due(now)
        return None

    def respawn_due(self, now: float) -> None:
        """Start a worker in every empty slot whose backoff has passed."""
        for slot in self.slots:
            if slot.process is None and now >= slot.not_before:
                self._spawn(slot)

    def _reaped(self, slot: Slot, now: float) -> ExitCode | None:
        """Collect the dead worker of ``slot``: log how it died, convict what it was
        computing, and set when it may be replaced (``after_death``)."""
        process = slot.process
        process.join()
        code = process.exitcode
        slot.ready_pipe.close()
        slot.process = None
        self._forget(process.pid)
        if code == ExitCode.ABANDONED:
            # It stopped work its caller gave up on: not a crash, nothing is a suspect.
            self.board.release(slot.index)
            log.info(
                "worker %d (pid %d) abandoned a computation whose caller has gone; replacing it",
                slot.index,
                process.pid,
            )
        for key in self.board.convict(slot.index):
            reply_to, _, correlation_id = key.decode(errors="replace").partition("\0")
            log.warning(
                "worker %d (pid %d) died computing request %r (reply_to %r): if it comes "
                "back, it counts as a delivery",
                slot.index,
                process.pid,
                correlation_id,
                reply_to,
            )
        death = after_death(
            code, ready=slot.ready, boot_failures=self.boot_failures, draw=random.random()
        )
        how = _how(code)
        if death.refused:
            log.error(
                "worker %d (pid %d) was refused by RabbitMQ (its log line above says "
                "what); restarting cannot help, stopping",
                slot.index,
                process.pid,
            )
            return ExitCode(code)
        self.boot_failures = death.boot_failures
        if code == ExitCode.ABANDONED:
            pass
        elif slot.ready:
            log.warning("worker %d (pid %d) died (%s); restarting", slot.index, process.pid, how)
        else:
            log.error(
                "worker %d (pid %d) died while booting (%s); %d boot failure(s) in a row",
                slot.index,
                process.pid,
                how,
                self.boot_failures,
            )
            if death.give_up:
                log.error(
                    "workers died %d times in a row before serving (last: %s, %s); "
                    "giving up. The worker log above says why.",
                    self.boot_failures,
                    how,
                    _explain(code),
                )
                return ExitCode.CRASH_LOOP
        slot.restarts += 1
        self._metrics.worker_restarted()
        slot.not_before = now + death.delay
        return None

    def _forget(self, pid: int) -> None:
        """Drop what a dead worker left: its live gauges and its `fibrpc status` file."""
        if self._exporter is not None:
            self._exporter.mark_dead(pid)
        if self._state_dir is not None:
            path = state.worker_path(self._state_dir, os.getpid(), pid)
            report = state.read_report(path)
            if report is not None and isinstance(report.get("algos"), dict):
                self.retired = describe.merge(self.retired, report["algos"])
            state.remove(path)


@dataclasses.dataclass(frozen=True, slots=True)
class Death:
    """What the supervisor does after a worker died (``after_death``)."""

    refused: bool  #: the broker refused it: stop with its code, restarting cannot help
    give_up: bool  #: too many boot failures in a row: stop with ``CRASH_LOOP``
    boot_failures: int  #: boot failures in a row, this one counted
    delay: float  #: seconds before its slot gets a new worker


def after_death(
    code: int | None,
    *,
    ready: bool,
    boot_failures: int,
    max_boot_failures: int = MAX_BOOT_FAILURES,
    draw: float = 1.0,
) -> Death:
    """The policy for a worker that died with exit ``code`` (negative: a signal; None:
    unknown), ``ready`` if it had reported ready, after ``boot_failures`` boot failures in
    a row (pure). A worker that served, or that abandoned work its caller gave up on
    (``ExitCode.ABANDONED``), is replaced at once; one that died booting after a
    pause that grows with each boot failure in a row (``backoff.jittered``, ``draw`` its
    jitter, 0..1), until ``max_boot_failures`` of them end the server."""
    if code in (ExitCode.ACCESS_REFUSED, ExitCode.BROKER_REFUSED):
        return Death(refused=True, give_up=False, boot_failures=boot_failures, delay=0.0)
    if ready or code == ExitCode.ABANDONED:  # abandoned work: never a boot failure
        return Death(refused=False, give_up=False, boot_failures=boot_failures, delay=0.0)
    failures = boot_failures + 1
    delay = backoff.jittered(failures - 1, first=_BACKOFF_FIRST, cap=_BACKOFF_MAX, draw=draw)
    return Death(
        refused=False,
        give_up=failures >= max_boot_failures,
        boot_failures=failures,
        delay=delay,
    )


def _how(code: int | None) -> str:
    """How a worker ended, for the log: its exit code or the signal that killed it."""
    if code is None:
        return "exit code unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _explain(code: int | None) -> str:
    """What a worker's exit code means, for the crash-loop message."""
    try:
        return ExitCode(code).name if code is not None else "a crash"
    except ValueError:
        return "a crash"


def _worker_main(settings: WorkerSettings, ready: Any, board: inflight.Board, index: int) -> None:
    """The body of a worker process (forked: it inherits the warmed kernels and the
    board of requests in flight)."""
    die_with_parent()
    exporting = tracing.export_from_env()  # OTEL_TRACES_EXPORTER: spans of this process
    worker = Worker(settings, board=board, index=index)
    install_stop_handlers(worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def report_ready() -> None:
        ready.send_bytes(b"ready")
        ready.close()

    try:
        worker.run(on_ready=report_ready)
    except AccessRefusedError as exc:
        log.error("%s", exc)
        sys.exit(int(ExitCode.ACCESS_REFUSED))
    except BrokerRefusedError as exc:
        log.error("%s", exc)
        sys.exit(int(ExitCode.BROKER_REFUSED))
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(int(ExitCode.CONFIG))
    except BrokerError as exc:
        log.error("%s", exc)
        sys.exit(int(ExitCode.FAILURE))
    finally:
        tracing.stop_exporting(exporting)  # the spans still waiting in the batch
