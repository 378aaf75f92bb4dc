"""What each server on this machine is doing, in small JSON files, for ``fibrpc status``.

A supervisor and its workers share a state directory (``--state-dir``, by default
``$XDG_RUNTIME_DIR/fibrpc``, else ``/tmp/fibrpc-<uid>``; private to the user)::

    <supervisor pid>.json               the server: its id, queue, URL (password
                                        redacted), start time, metrics URL, per worker its
                                        slot index, pid, start time and restarts, and the
                                        per-algorithm counts of its dead workers
                                        (``retired``); rewritten by the supervisor
                                        whenever a worker starts
    <supervisor pid>-<worker pid>.json  one worker's counters (served, errors..., and
                                        per algorithm: ``fibrpc.describe.Tally``) and what
                                        it computes, rewritten by the worker at most once a
                                        second, from its consume loop, when they changed
                                        (at least every few seconds: a sign of life)

Every write goes to a temporary file first and is renamed into place, so a reader never
sees half a file. A server removes its files when it stops; one that was killed leaves
them: readers skip the files of a supervisor that is no longer running, and the next
server to start in the directory removes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def default_dir() -> Path:
    """``$XDG_RUNTIME_DIR/fibrpc`` when that directory exists, else ``/tmp/fibrpc-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "fibrpc"
    return Path(tempfile.gettempdir()) / f"fibrpc-{os.getuid()}"


def prepare(directory: Path) -> Path | None:
    """Create ``directory`` (mode 0700) if needed and check that this user owns it.

    Returns None, with a warning logged, when it cannot be used: the server then runs
    without reporting to ``fibrpc status`` rather than not at all.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_uid != os.getuid():
            log.warning(
                "not reporting to `fibrpc status`: %s belongs to another user; set "
                "--state-dir (FIBRPC_STATE_DIR) to a directory of your own",
                directory,
            )
            return None
    except OSError as exc:
        log.warning("not reporting to `fibrpc status`: cannot use %s (%s)", directory, exc)
        return None
    return directory


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then a rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(temporary, path)


def remove(path: Path) -> None:
    """Remove ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def server_path(directory: Path, supervisor: int) -> Path:
    """The file of the server whose supervisor is ``supervisor``."""
    return directory / f"{supervisor}.json"


def worker_path(directory: Path, supervisor: int, worker: int) -> Path:
    """The file of worker ``worker`` of that server."""
    return directory / f"{supervisor}-{worker}.json"


class WorkerReport:
    """A worker's side: rewrites its counters when asked (the worker asks at most once
    per ``fibrpc.config.REPORT_INTERVAL``)."""

    def __init__(self, directory: Path, supervisor: int, pid: int) -> None:
        self.path = worker_path(directory, supervisor, pid)
        self.pid = pid
        self.started = time.time()
        self._last: dict[str, Any] | None = None

    def write(self, counters: Mapping[str, Any]) -> None:
        """Write ``counters`` if they changed since the last write (errors only logged:
        a full disk must not stop a worker)."""
        if counters == self._last:
            return
        self._last = dict(counters)
        data = {"pid": self.pid, "started": self.started, "updated": time.time(), **counters}
        try:
            write_json(self.path, data)
        except OSError as exc:
            log.warning("cannot write %s for `fibrpc status`: %s", self.path, exc)

    def remove(self) -> None:
        """Remove this worker's file (it is stopping)."""
        remove(self.path)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a running fibrpc process (its command line names fibrpc, where
    /proc says; so a reused pid is not taken for a server)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a server of ours
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: the pid is all we can check
    return b"fibrpc" in cmdline


def prune(directory: Path) -> None:
    """Remove the files that servers killed before they could clean up left behind."""
    for path in directory.glob("*.json"):
        supervisor = path.stem.split("-", 1)[0]
        if supervisor.isdigit() and not alive(int(supervisor)):
            remove(path)


def read_servers(directory: Path, queue: str | None = None) -> list[dict[str, Any]]:
    """The running servers recorded in ``directory`` (those on ``queue`` if given), oldest
    first, each with its workers' counters merged into ``workers``."""
    servers: list[dict[str, Any]] = []
    if not directory.is_dir():
        return servers
    for path in directory.glob("*.json"):
        if not path.stem.isdigit() or not alive(int(path.stem)):
            continue
        server = _read(path)
        if server is None or (queue is not None and server.get("queue") != queue):
            continue
        supervisor = int(path.stem)
        for worker in server.get("workers", []):
            report = _read(worker_path(directory, supervisor, int(worker.get("pid", 0))))
            if report is not None:
                worker.update({k: v for k, v in report.items() if k not in worker})
        servers.append(server)
    servers.sort(key=lambda s: float(s.get("started", 0.0)))
    return servers


def read_report(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (a server's or a worker's file), or None when it is
    gone or unreadable."""
    return _read(path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or (an older writer's) partial file: skip it
    return data if isinstance(data, dict) else None
