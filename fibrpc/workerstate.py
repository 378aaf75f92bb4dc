"""What a worker is given, what it counts, and what its parts share.

``WorkerSettings`` (plain values, to cross ``fork`` and ``spawn``) and ``WorkerStats`` (its
counters); ``Running``, the request on the compute thread; ``expired``, whether a request's
caller has given up; and ``WorkerParts``, the state and steps that the modules of the
worker (``fibrpc.server``'s loop, ``fibrpc.requestpath``, ``fibrpc.coalesced``,
``fibrpc.heavypath``, ``fibrpc.manners``) share: each of those is a part of
``fibrpc.server.Worker``, and this protocol is what one part may use of the others.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from fibrpc import amqp, deliveries, describe, desk, inflight, metrics, state
from fibrpc.config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEARTBEAT,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MEMO_BYTES,
    DEFAULT_PREFETCH,
    DEFAULT_QUEUE,
    DEFAULT_URL,
    Limits,
)
from fibrpc.handler import Handler, Reply
from fibrpc.protocol import DEADLINE_HEADER
from fibrpc.workerlink import WorkerLink


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to start: plain values, so they cross ``fork`` and ``spawn``."""

    #: The broker's nodes (one URL, or several of one cluster): the worker connects to
    #: the first that answers, starting at its own index, and fails over round them.
    urls: tuple[str, ...] = (DEFAULT_URL,)
    queue: str = DEFAULT_QUEUE
    queue_type: str = "classic"
    prefetch: int = DEFAULT_PREFETCH
    heartbeat: int = DEFAULT_HEARTBEAT
    memo_bytes: int = DEFAULT_MEMO_BYTES
    #: The server's shared memo of large results (``fibrpc.memo``), made by the
    #: supervisor; None: each worker keeps a memo of its own.
    memo_dir: str | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    limits: Limits = dataclasses.field(default_factory=Limits)
    tls: amqp.TLSOptions | None = None
    #: Where to report to ``fibrpc status`` (``fibrpc.state``); None: nowhere.
    state_dir: str | None = None
    #: The server's id (its describe queue's name: ``fibrpc.control``), set by the
    #: supervisor; None: describes are answered by whichever worker takes them.
    server_id: str | None = None


@dataclasses.dataclass(slots=True)
class WorkerStats:
    """Counters of one worker, reported in its log and by ``fibrpc status``."""

    served: int = 0
    errors: int = 0
    dropped: int = 0  # no reply_to, or replies the broker kept refusing: nowhere to answer
    expired: int = 0  # deadline passed before it was computed: skipped
    poison: int = 0  # delivered too often: refused
    redelivered: int = 0  # came back after a worker died or a connection dropped
    reconnects: int = 0
    abandoned: int = 0  # cancelled by its caller, or past its deadline: not computed


@dataclasses.dataclass(frozen=True, slots=True)
class Running:
    """The request on the compute thread: what the I/O loop needs to abandon it."""

    key: bytes
    tag: int
    props: Any
    algo: str
    headers: dict[str, Any]
    budget: int | None
    received: float  #: monotonic, when the worker took it
    generation: int


def expired(headers: dict[str, Any], budget: int | None, received: float) -> bool:
    """Whether the caller of a request taken at ``received`` (monotonic) has given up:
    its deadline (``headers``) or its budget (``budget`` ms) has passed."""
    deadline = headers.get(DEADLINE_HEADER)
    return deliveries.expired(
        now_wall_ms=time.time() * 1000,
        now=time.monotonic(),
        received=received,
        deadline_ms=deadline if deliveries.is_int(deadline) else None,
        budget_ms=budget,
    )


class Latest:
    """The latest delivery of a request being computed: its connection's generation and
    its delivery tag (``HeavyPath._offload``)."""

    __slots__ = ("generation", "tag")

    def __init__(self, generation: int, tag: int) -> None:
        self.generation = generation
        self.tag = tag


class WorkerParts:
    """What the parts of ``fibrpc.server.Worker`` share: its state (set in
    ``Worker.__init__``) and, for the type checker only, the steps one part takes for
    another (defined by the part named beside them)."""

    settings: WorkerSettings
    link: WorkerLink
    handler: Handler
    stats: WorkerStats
    desk: desk.Desk
    tally: describe.Tally
    _board: inflight.Board | None
    _index: int
    _slot: inflight.WorkerSlot | None
    _stopping: bool
    _in_flight: int
    _generation: int
    _compute: concurrent.futures.ThreadPoolExecutor
    _replied: collections.deque[Any]
    _unacked: dict[bytes, str]
    _metrics: metrics.Metrics
    _report: state.WorkerReport | None
    _debug: bool
    _exit: Callable[[int], NoReturn]
    _running: Running | None
    _computing: dict[bytes, Latest]
    _orphans: set[int]
    _busy_until: float | None
    _started: float

    if TYPE_CHECKING:

        @property
        def url(self) -> str:
            """The node connected to (or tried last)."""
            ...

        # the loop's (fibrpc.server)
        def _fate_of(self, generation: int, finish: Callable[[], None]) -> bool | None: ...
        def _hand_back(self, finish: Callable[[], None]) -> None: ...
        def _orphan_settled(self) -> None: ...
        def _tick(self, *, force: bool = False) -> None: ...
        def _report_data(self) -> dict[str, Any]: ...

        # one request's (fibrpc.requestpath)
        def _reply(
            self,
            tag: int | None,
            props: Any,
            reply: Reply,
            algo: str,
            values: int,
            started: float,
            batch: bool = False,
        ) -> None: ...
        def _skipped(self, props: Any, tag: int, started: float) -> None: ...
        def _trace(
            self, props: Any, tag: int | None, started: float, outcome: str, **details: Any
        ) -> None: ...
        def _is_suspect(self, key: bytes) -> bool: ...

        # coalesced calls' (fibrpc.coalesced)
        def _handle_calls(
            self,
            method: Any,
            props: Any,
            headers: dict[str, Any] | None,
            body: bytes,
            started: float,
        ) -> None: ...

        # the heavy path's (fibrpc.heavypath)
        def _offload(
            self,
            tag: int,
            props: Any,
            request: Any,
            headers: dict[str, Any] | None,
            budget: int | None,
            started: float,
        ) -> None: ...

        # the control desk's (fibrpc.manners)
        def _take_control(self, tag: int, props: Any, body: bytes, started: float) -> None: ...
        def _count_abandoned(self, algo: str, props: Any) -> None: ...
