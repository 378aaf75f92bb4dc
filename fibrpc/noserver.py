"""Whether a server consumes the client's queue, as the driver (``fibrpc.driver``) tells
it: it asks the broker now and then how many consumers the queue has, and fails the calls
with ``NoServerError`` after a short grace when nobody does; a request the broker returns
(no queue of that name) is sent again a little later just after a reconnect, else its
call fails the same way.

A request never outlives the chance of its answer: one published while the queue has no
consumer carries a TTL of at most ``NO_SERVER_GRACE`` (the broker drops it if no server
comes by then), and a call fails with ``NoServerError`` before its deadline only once its
request is gone from the queue; a request still queued (sent while a server consumed) is
given its whole time, a server that restarts answering it. The ``ServerWatch`` runs on
the thread that has the driver's turn.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Final

from fibrpc import callerrors
from fibrpc.calls import Call, Registry
from fibrpc.config import NO_SERVER_GRACE
from fibrpc.errors import NoServerError
from fibrpc.linkapi import Link, LinkLost

_PROBE_INTERVAL: Final = 0.5
#: After a reconnect, seconds before an empty queue counts as "no server": the servers
#: are reconnecting to the same broker at the same time.
RECONNECT_GRACE: Final = 10.0
_RETURN_RETRY: Final = 0.2
#: Seconds past the end of its request's TTL after which a call is sure its request is
#: gone from the queue (the broker counts the TTL from a moment after the publish).
_TTL_MARGIN: Final = 0.1
#: The longest a new connection waits for its first answer on the queue's consumers.
_FIRST_PROBE: Final = 1.0


class ServerWatch:
    """The consumer probe, the requests returned, and the TTL a request gets, for one
    client's driver (see the module docstring). ``publish(call)`` publishes a call's
    request again (the driver's; raises ``LinkLost``)."""

    def __init__(self, link: Link, registry: Registry, publish: Callable[[Call], None]) -> None:
        self.link = link
        self.registry = registry
        self._publish = publish
        self._next_probe = 0.0
        #: Why the broker refused to count the queue's consumers, once it has: the driver
        #: asks no more, and cannot tell that no server runs.
        self.probe_refused: str | None = None
        self._no_consumer_since: float | None = None
        #: The last answer on the queue's consumers said none (outside a reconnect's
        #: grace): requests published now get a TTL of at most ``NO_SERVER_GRACE``.
        self.unserved = False
        self._asked = False  # a question on the consumers is on its way
        self._grace_until = 0.0
        #: Requests returned just after a reconnect, to send again: when, and the call.
        self.returned: collections.deque[tuple[float, str]] = collections.deque()

    def first_probe(self) -> bool:
        """Ask whether anyone consumes the queue and wait (up to ``_FIRST_PROBE``) for the
        answer: the first requests then get the TTL that fits (see the module
        docstring). No answer in time: they get their whole time. Returns False if the
        link was lost meanwhile (the driver reconnects)."""
        self._ask_consumers()
        until = time.monotonic() + _FIRST_PROBE
        lost = False
        try:
            while self._asked and time.monotonic() < until:
                self.link.turn(wait=True)
        except LinkLost:
            lost = True
        self._next_probe = time.monotonic() + _PROBE_INTERVAL
        return not lost

    def _ask_consumers(self) -> None:
        self._asked = True
        self.link.ask_consumers()

    def lost(self) -> None:
        """The link is lost: no answer on the consumers counts until it is back."""
        self.unserved = False

    def reconnected(self) -> None:
        """A new connection: servers reconnect too (and redeclare the queue, which a
        broker restart may have deleted): give them time before calling the queue
        unserved."""
        self._grace_until = time.monotonic() + RECONNECT_GRACE
        self._next_probe = self._grace_until
        self._no_consumer_since = None
        self._asked = False

    def step(self, now: float) -> None:
        """At the end of a turn: send again the returned requests due, and ask about the
        consumers when it is time (calls in flight, the broker answering)."""
        if self.returned and now >= self.returned[0][0]:
            self._resend_returned(now)
        if len(self.registry) and now >= self._next_probe and self.probe_refused is None:
            self._next_probe = now + _PROBE_INTERVAL
            self._ask_consumers()

    def expiry(self, call: Call, now: float) -> float:
        """Set when ``call``'s request, published ``now``, is to leave the queue (see the
        module docstring): at its deadline, or within ``NO_SERVER_GRACE`` while the queue
        has no consumer. Returns it."""
        if self.unserved:
            call.expires = min(call.deadline, now + NO_SERVER_GRACE)
        else:
            call.expires = call.deadline
        return call.expires

    def on_return(self, corr_id: str) -> None:
        """The broker returned the request of ``corr_id`` (not a coalesced message): no
        queue of that name exists. Just after a reconnect the servers may not have
        redeclared it yet, so it is sent again a little later; otherwise the call fails
        with ``NoServerError``."""
        now = time.monotonic()
        if now < self._grace_until and corr_id in self.registry:
            self.returned.append((now + _RETURN_RETRY, corr_id))
            return
        self.registry.fail(corr_id, self.no_server(missing=True))

    def on_consumers(self, consumers: int | None) -> None:
        """Fail the calls whose request is gone from the queue (past its TTL) with
        ``NoServerError`` once the queue has had no consumer for ``NO_SERVER_GRACE``
        seconds; every call if the queue has not existed for that long (nothing was
        queued: the broker returned the requests). A call whose request is still queued
        waits for a server up to its deadline (then ``deadline_error`` says there was
        none). A queue deleted under calls already routed gets the same grace: its
        workers answer what they hold and declare it again (a quorum queue takes a
        moment)."""
        self._asked = False
        now = time.monotonic()
        if now < self._grace_until:
            return
        if consumers:
            self._no_consumer_since = None
            self.unserved = False
            return
        self.unserved = True
        if self._no_consumer_since is None:
            self._no_consumer_since = now
            return
        if now - self._no_consumer_since < NO_SERVER_GRACE:
            return
        error = self.no_server(missing=consumers is None)
        for call in self.registry.calls():
            if consumers is None or call.expires + _TTL_MARGIN <= now:
                self.registry.fail(call.corr_id, error)

    def no_server(self, *, missing: bool) -> NoServerError:
        """The error of a call that no server serves (``missing``: no queue at all)."""
        return callerrors.no_server(self.link.described, self.link.queue, missing=missing)

    def _resend_returned(self, now: float) -> None:
        while self.returned and now >= self.returned[0][0]:
            _, corr_id = self.returned.popleft()
            call = self.registry.get(corr_id)
            if call is not None:
                self._publish(call)
