"""The worker's manners: the control desk's hooks (``fibrpc.control``, ``fibrpc.desk``).

A cancel or a describe taken from the request queue goes to the desk (``_take_control``);
after each turn of the loop the worker forwards what the desk holds, answers describes
for its whole server (``describe.build``), and abandons the computation whose caller has
gone (``control.abandon``): the process ends with ``ExitCode.ABANDONED`` and is replaced.
A part of ``fibrpc.server.Worker`` (``fibrpc.workerstate.WorkerParts``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, NoReturn

from fibrpc import control, describe, inflight, metrics, state
from fibrpc.exitcodes import ExitCode
from fibrpc.handler import error_reply
from fibrpc.workerstate import Running, WorkerParts, expired

log = logging.getLogger("fibrpc.server")  # the worker's one logger, as before the split


class Manners(WorkerParts):
    """The worker's control messages and abandoned work."""

    def _take_control(self, tag: int, props: Any, body: bytes, started: float) -> None:
        """A cancel or a describe taken from the request queue: the desk forwards it to
        every server (after this turn); acked here, answered only if malformed."""
        error = self.desk.take(props, body)
        if error is not None:
            self._reply(tag, props, error_reply(error), metrics.UNKNOWN_ALGO, 0, started)
        else:
            self.link.ack(tag)

    def _count_abandoned(self, algo: str, props: Any) -> None:
        self.stats.abandoned += 1
        self.tally.count(algo, "abandoned")
        self._metrics.discarded(algo, "abandoned")
        if self._debug:
            log.debug("dropped %r: its caller cancelled it", props.correlation_id)

    def _manners(self) -> None:
        """After a turn: forward control messages, answer describes, and abandon the
        computation whose caller has gone (``control.abandon``)."""
        if self.desk.busy():
            for message in self.desk.flush(self.link):
                self._describe(message)
        running = self._running
        if running is None or running.generation != self._generation:
            return
        why = control.abandon(
            cancelled=self.desk.cancelled(running.props.reply_to, running.props.correlation_id),
            expired=expired(running.headers, running.budget, running.received),
            stopping=self._stopping,
        )
        if why is not None:
            self._abandon(running, why)

    def _abandon(self, running: Running, why: control.Abandon) -> NoReturn:
        """Stop a computation whose caller has gone: numba and GMP cannot be interrupted,
        so the request is acked (not answered), what the worker did is reported, and the
        process ends with ``ExitCode.ABANDONED``, which its supervisor reads as abandoned
        work, not a crash: it replaces the worker at once and charges nothing (the board's
        slot is cleared first, so nothing is a suspect). The other requests this worker
        held are redelivered, uncharged."""
        log.warning(
            "abandoning request %r (%s): %s; this worker exits (code %d) to stop the "
            "computation and is replaced",
            running.props.correlation_id,
            running.algo,
            "its caller cancelled it"
            if why is control.Abandon.CANCELLED
            else "its deadline passed while it was computed",
            ExitCode.ABANDONED,
        )
        self._count_abandoned(running.algo, running.props)
        self.link.ack(running.tag)
        if self._slot is not None:
            self._slot.end(inflight.HEAVY)
        self._running = self._busy_until = None
        self._tick(force=True)
        self.link.close()  # the ack and the replies queued before it go out first
        self._exit(int(ExitCode.ABANDONED))

    def _describe(self, message: control.Forwarded) -> None:
        """Answer a describe for this worker's whole server (``describe.build``)."""
        self._tick(force=True)  # this worker's own report, fresh
        server, reports = self._server_state()
        limits = self.handler.limits
        broker = limits.max_reply_bytes if limits.max_reply_source.startswith("RabbitMQ") else None
        description = describe.build(
            server=server,
            reports=reports,
            limits=limits,
            broker_max_message=broker,
            version=_version(),
            host=socket.gethostname(),
            answered_by=os.getpid(),
            now=time.time(),
        )
        props = _Answer(message.reply_to, message.correlation_id)
        self.link.reply(props, describe.encode(description), describe.DESCRIPTION)

    def _server_state(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        """The supervisor's state and its workers' reports (``fibrpc.state``); without
        a state directory, this worker alone."""
        supervisor = os.getppid()
        if self.settings.state_dir is not None:
            directory = Path(self.settings.state_dir)
            server = state.read_report(state.server_path(directory, supervisor))
            if server is not None:
                reports = {}
                for worker in server.get("workers") or []:
                    pid = int(worker.get("pid") or 0)
                    report = state.read_report(state.worker_path(directory, supervisor, pid))
                    if report is not None:
                        reports[pid] = report
                return server, reports
        me = os.getpid()
        own = {
            "id": self.settings.server_id or f"worker-{me}",
            "pid": supervisor,
            "queue": self.settings.queue,
            "started": self._started,
            "workers": [{"index": self._index, "pid": me, "ready": True, "started": self._started}],
        }
        return own, {me: self._report_data()}


@dataclasses.dataclass(frozen=True, slots=True)
class _Answer:
    """The properties ``WorkerLink.reply`` reads, for a reply to a forwarded message."""

    reply_to: str
    correlation_id: str | None


def _version() -> str:
    from fibrpc import __version__  # noqa: PLC0415  # fibrpc/__init__ imports this module

    return __version__
