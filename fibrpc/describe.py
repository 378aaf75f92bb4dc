"""What a server says it is: its description, built by a worker, read by a client. Pure.

A describe (``fibrpc.control.DESCRIBE``) reaches one worker of every server on the
request queue; that worker answers for its whole server (``build``), from what the
server's state directory (``fibrpc.state``) holds: the supervisor's file (its workers,
their restarts, and the counters of workers that have died: ``retired``) and each
worker's report (its per-algorithm counters, a ``Tally``, and what it is computing). A
client turns each answer into a ``Description`` (``parse``): typed, checked, every
field named in docs/schema/description.json.

A worker is *stuck* (``Worker.stuck``) when it has held one request past the time it
expected it to take (its deadline, or ``EXPECTED_WITHOUT_DEADLINE``), or has stopped
answering: its report has not been refreshed for ``SILENT_AFTER`` seconds (a worker
rewrites it every ``ALIVE_EVERY`` seconds, busy or not, from its I/O loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, Final

from fibrpc import control, protocol
from fibrpc.config import Limits
from fibrpc.errors import UnreadableReplyError
from fibrpc.numbers import ALGORITHMS

#: The media type of a description (a reply to a describe).
DESCRIPTION: Final = "application/vnd.fibrpc.description+json"
#: Seconds between a worker's reports when nothing else changes (its sign of life).
ALIVE_EVERY: Final = 5.0
#: A worker whose report is older than this has stopped answering.
SILENT_AFTER: Final = 20.0
#: What a request with no deadline is expected to take at most, in seconds.
EXPECTED_WITHOUT_DEADLINE: Final = 60.0
#: Seconds of slack past a request's expected end before its worker counts as stuck.
STUCK_SLACK: Final = 5.0
#: What a request may carry, and what a reply may be (for the description's ``forms``).
REQUEST_TYPES: Final = ("text/plain", protocol.JSON, protocol.U64, protocol.CALLS)
REPLY_TYPES: Final = ("text/plain", protocol.JSON, protocol.U64, protocol.INTS, protocol.CALLS)
CONTROL_TYPES: Final = (control.CANCEL, control.DESCRIBE)


class Tally:
    """One worker's counters per algorithm: served, refused by code, abandoned, expired,
    poison, and compute time (count, total and largest seconds). ``as_dict`` is what its
    report carries; ``merge`` adds two of them (the supervisor keeps the sum of its dead
    workers')."""

    def __init__(self) -> None:
        self._algos: dict[str, dict[str, Any]] = {}

    def _algo(self, algo: str) -> dict[str, Any]:
        entry = self._algos.get(algo)
        if entry is None:
            entry = self._algos[algo] = _empty()
        return entry

    def answered(self, algo: str, error: str | None, seconds: float) -> None:
        """A reply: served (``error`` None, taking ``seconds``) or refused with code
        ``error``."""
        entry = self._algo(algo)
        if error is None:
            entry["served"] += 1
            compute = entry["compute"]
            compute[0] += 1
            compute[1] += seconds
            compute[2] = max(compute[2], seconds)
        else:
            refused = entry["refused"]
            refused[error] = refused.get(error, 0) + 1

    def count(self, algo: str, outcome: str) -> None:
        """A request not answered: ``abandoned``, ``expired`` or ``poison``."""
        self._algo(algo)[outcome] += 1

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """A fresh copy (a report compares it with the last one written)."""
        return json.loads(json.dumps(self._algos))  # type: ignore[no-any-return]


def _empty() -> dict[str, Any]:
    return {"served": 0, "refused": {}, "abandoned": 0, "expired": 0, "poison": 0,
            "compute": [0, 0.0, 0.0]}  # fmt: skip


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The sum of two ``Tally.as_dict`` (either may come from a file: what is not a
    counter is skipped)."""
    out: dict[str, Any] = json.loads(json.dumps(a)) if a else {}
    for algo, counts in b.items():
        if not isinstance(counts, Mapping):
            continue
        entry = out.setdefault(algo, _empty())
        for name in ("served", "abandoned", "expired", "poison"):
            entry[name] = _int(entry.get(name)) + _int(counts.get(name))
        refused = entry.setdefault("refused", {})
        for code, count in (counts.get("refused") or {}).items():
            refused[code] = _int(refused.get(code)) + _int(count)
        mine, theirs = entry.get("compute") or [0, 0.0, 0.0], counts.get("compute")
        if isinstance(theirs, list) and len(theirs) == 3:
            entry["compute"] = [
                _int(mine[0]) + _int(theirs[0]),
                float(mine[1]) + float(theirs[1]),
                max(float(mine[2]), float(theirs[2])),
            ]
    return out


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- a worker's side: the description of its server -------------------------------------


def build(
    *,
    server: Mapping[str, Any],
    reports: Mapping[int, Mapping[str, Any]],
    limits: Limits,
    broker_max_message: int | None,
    version: str,
    host: str,
    answered_by: int,
    now: float,
) -> dict[str, Any]:
    """The description a worker sends for its server (a JSON object, as in
    docs/schema/description.json).

    ``server``: the supervisor's state (``fibrpc.state``: ``id``, ``pid``, ``queue``,
    ``started``, ``workers``, ``retired``); ``reports``: each live worker's report by pid;
    ``limits`` the worker's; ``broker_max_message`` the broker's ``max_message_size``
    once a worker has met it (else None); ``now`` Unix seconds.
    """
    counts: dict[str, Any] = dict(server.get("retired") or {})
    workers = []
    for worker in server.get("workers") or []:
        pid = _int(worker.get("pid"))
        report = reports.get(pid, {})
        counts = merge(counts, report.get("algos") or {})
        busy_since = report.get("busy_since")
        busy_until = report.get("busy_until")
        alive = report.get("alive", report.get("updated"))
        workers.append(
            {
                "index": _int(worker.get("index")),
                "pid": pid,
                "ready": bool(worker.get("ready")),
                "restarts": _int(worker.get("restarts")),
                "started": float(worker.get("started") or 0.0),
                "busy_seconds": None if busy_since is None else max(0.0, now - busy_since),
                "late": busy_until is not None and now > float(busy_until) + STUCK_SLACK,
                "silent": alive is None or now - float(alive) > SILENT_AFTER,
            }
        )
    started = float(server.get("started") or now)
    return {
        "server": {
            "id": str(server.get("id") or ""),
            "version": version,
            "host": host,
            "pid": _int(server.get("pid")),
            "queue": str(server.get("queue") or ""),
            "started": started,
            "uptime": max(0.0, now - started),
            "answered_by": answered_by,
        },
        "algorithms": {algo: {"max_n": limits.max_n(algo)} for algo in ALGORITHMS},
        "limits": {
            "max_body_bytes": limits.max_body_bytes,
            "max_batch": limits.max_batch,
            "max_reply_bytes": limits.max_reply_bytes,
            "broker_max_message_bytes": broker_max_message,
        },
        "forms": {
            "requests": list(REQUEST_TYPES),
            "replies": list(REPLY_TYPES),
            "control": list(CONTROL_TYPES),
        },
        "counts": counts,
        "workers": workers,
    }


def encode(description: Mapping[str, Any]) -> bytes:
    return json.dumps(description, separators=(",", ":")).encode()


# -- a client's side: typed descriptions ------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class AlgorithmCounts:
    """What a server has done with one algorithm since it started (its dead workers'
    counts included). Compute times are seconds from taking a request to its reply."""

    served: int
    refused: dict[str, int]  #: by error code
    abandoned: int  #: cancelled or past their deadline while computed: not answered
    expired: int  #: skipped, not computed: their caller had given up
    poison: int
    computed: int  #: replies timed (``served``)
    compute_seconds: float  #: their total
    compute_max_seconds: float  #: the longest

    @property
    def compute_mean_seconds(self) -> float:
        return self.compute_seconds / self.computed if self.computed else math.nan


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerInfo:
    index: int
    pid: int
    ready: bool
    restarts: int
    started: float  #: Unix seconds
    busy_seconds: float | None  #: how long it has computed its current heavy request
    late: bool  #: held one request past its expected time
    silent: bool  #: stopped reporting: its I/O loop is stuck, or it is gone

    @property
    def stuck(self) -> bool:
        return self.late or self.silent


@dataclasses.dataclass(frozen=True, slots=True)
class Description:
    """One server, as it described itself (``Client.describe``)."""

    id: str
    version: str
    host: str
    pid: int  #: the supervisor's
    queue: str
    started: float  #: Unix seconds
    uptime: float  #: seconds
    answered_by: int  #: the pid of the worker that answered
    algorithms: dict[str, int]  #: the largest n of each algorithm
    max_body_bytes: int
    max_batch: int
    max_reply_bytes: int
    broker_max_message_bytes: int | None  #: once a worker has met the broker's limit
    request_types: tuple[str, ...]
    reply_types: tuple[str, ...]
    control_types: tuple[str, ...]
    counts: dict[str, AlgorithmCounts]
    workers: tuple[WorkerInfo, ...]

    @property
    def stuck(self) -> tuple[WorkerInfo, ...]:
        """Its workers that look stuck."""
        return tuple(w for w in self.workers if w.stuck)


def parse(body: bytes) -> Description:
    """A description from a server's answer. Raises ``UnreadableReplyError`` naming the
    field that does not fit."""
    try:
        data = json.loads(body)
        server, limits, forms = data["server"], data["limits"], data["forms"]
        return Description(
            id=_str(server["id"]),
            version=_str(server["version"]),
            host=_str(server["host"]),
            pid=_num(server["pid"], int),
            queue=_str(server["queue"]),
            started=_num(server["started"], float),
            uptime=_num(server["uptime"], float),
            answered_by=_num(server["answered_by"], int),
            algorithms={a: _num(v["max_n"], int) for a, v in data["algorithms"].items()},
            max_body_bytes=_num(limits["max_body_bytes"], int),
            max_batch=_num(limits["max_batch"], int),
            max_reply_bytes=_num(limits["max_reply_bytes"], int),
            broker_max_message_bytes=(
                None
                if limits["broker_max_message_bytes"] is None
                else _num(limits["broker_max_message_bytes"], int)
            ),
            request_types=tuple(_str(t) for t in forms["requests"]),
            reply_types=tuple(_str(t) for t in forms["replies"]),
            control_types=tuple(_str(t) for t in forms["control"]),
            counts={a: _counts(c) for a, c in data["counts"].items()},
            workers=tuple(_worker(w) for w in data["workers"]),
        )
    except UnreadableReplyError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UnreadableReplyError(
            f"A server's description could not be read ({type(exc).__name__}: {exc}): "
            f"{body[:120]!r}."
        ) from exc


def _counts(c: Mapping[str, Any]) -> AlgorithmCounts:
    compute = c["compute"]
    return AlgorithmCounts(
        served=_num(c["served"], int),
        refused={_str(k): _num(v, int) for k, v in c["refused"].items()},
        abandoned=_num(c["abandoned"], int),
        expired=_num(c["expired"], int),
        poison=_num(c["poison"], int),
        computed=_num(compute[0], int),
        compute_seconds=_num(compute[1], float),
        compute_max_seconds=_num(compute[2], float),
    )


def _worker(w: Mapping[str, Any]) -> WorkerInfo:
    busy = w["busy_seconds"]
    return WorkerInfo(
        index=_num(w["index"], int),
        pid=_num(w["pid"], int),
        ready=bool(w["ready"]),
        restarts=_num(w["restarts"], int),
        started=_num(w["started"], float),
        busy_seconds=None if busy is None else _num(busy, float),
        late=bool(w["late"]),
        silent=bool(w["silent"]),
    )


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise UnreadableReplyError(f"A description's field should be text; got {value!r}.")
    return value


def _num(value: object, kind: type[int] | type[float]) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnreadableReplyError(f"A description's field should be a number; got {value!r}.")
    if kind is int and not isinstance(value, int):
        raise UnreadableReplyError(f"A description's field should be an integer; got {value!r}.")
    return kind(value)
