"""A worker's control desk: what it does with cancels and describes (``fibrpc.control``).

The worker (``fibrpc.server.Worker``) hands the desk the control messages it takes from
the request queue (``take``) and those its control consumer hears from the servers'
exchange (``heard``); after each turn of its link it asks the desk for what to forward
and which describes to answer (``flush``). The desk holds the cancelled keys
(``control.CancelSet``). No pika; the link is the worker's ``WorkerLink``.

With the control path off (the server's user may not declare the exchange), a worker
applies the cancels it takes itself and answers describes for its own server: the other
workers hear nothing, which only wastes work.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from fibrpc import control, inflight
from fibrpc.errors import RequestError
from fibrpc.protocol import media_type

log = logging.getLogger(__name__)


class ControlLink(Protocol):
    """What the desk needs of the worker's link (``fibrpc.workerlink.WorkerLink``)."""

    def forward(self, route: str, body: bytes) -> bool: ...


class Desk:
    """Cancelled keys, control messages to forward, describes to answer."""

    def __init__(self, cancels: control.CancelSet | None = None) -> None:
        self.cancels = cancels or control.CancelSet()
        #: Whether this worker's control path is open (``fibrpc.serverlink.open_control``).
        self.path_open = False
        self._forwards: list[tuple[str, bytes]] = []
        self._describes: list[control.Forwarded] = []
        self.heard_cancels = 0  #: keys heard in cancels (for the log and the tests)
        self._warned = False

    def opened(self, refusal: str | None) -> None:
        """The link opened its control path (``refusal`` None) or could not."""
        if refusal is not None and not self._warned:
            self._warned = True
            log.warning(
                "no control path (%s): cancels and describes reach only the worker that takes them",
                refusal,
            )
        self.path_open = refusal is None

    def take(self, props: Any, body: bytes) -> RequestError | None:
        """A control message taken from the request queue (the caller acks it): forward
        it to every server (or, with the path off, apply it here). Returns the error to
        answer for a malformed one."""
        reply_to = str(props.reply_to)
        if _media(props.content_type) == control.CANCEL:
            try:
                ids = control.decode_cancel(body)
            except RequestError as exc:
                return exc
            if self.path_open:
                self._forwards.append(
                    (control.ROUTE_CANCEL, control.forward(reply_to, props.correlation_id, ids))
                )
            else:
                self._cancel(control.Forwarded(reply_to, props.correlation_id, tuple(ids)))
            return None
        describe = control.Forwarded(reply_to, props.correlation_id)
        if self.path_open:
            self._forwards.append(
                (control.ROUTE_DESCRIBE, control.forward(reply_to, props.correlation_id))
            )
        else:
            self._describes.append(describe)
        return None

    def heard(self, route: str, body: bytes) -> None:
        """A message of the control exchange (the worker's control consumer)."""
        try:
            message = control.read_forwarded(body)
        except RequestError as exc:
            log.warning("dropped a control message: %s", exc.message)
            return
        if route == control.ROUTE_CANCEL:
            self._cancel(message)
        elif route == control.ROUTE_DESCRIBE:
            self._describes.append(message)

    def _cancel(self, message: control.Forwarded) -> None:
        keys = [inflight.key(message.reply_to, i) for i in message.ids]
        self.cancels.add(keys, time.monotonic())
        self.heard_cancels += len(keys)
        log.debug("cancelled %d call(s) of %r", len(keys), message.reply_to)

    def busy(self) -> bool:
        """Whether ``flush`` has anything to do."""
        return bool(self._forwards or self._describes)

    def flush(self, link: ControlLink) -> list[control.Forwarded]:
        """Forward what was taken (a message whose forward fails, the path having
        closed, is applied here instead); return the describes to answer."""
        forwards, self._forwards = self._forwards, []
        for route, body in forwards:
            if not link.forward(route, body):
                self.path_open = False
                self.heard(route, body)
        describes, self._describes = self._describes, []
        return describes

    def cancelled(self, reply_to: object, correlation_id: object) -> bool:
        """Whether the request of ``reply_to`` and ``correlation_id`` was cancelled."""
        cancels = self.cancels
        if not cancels:
            return False  # the usual case: no key to make
        return cancels.cancelled(inflight.key(reply_to, correlation_id), time.monotonic())


def _media(content_type: object) -> str:
    if not isinstance(content_type, str | bytes):
        return ""
    return media_type(content_type)


def is_control(content_type: object) -> bool:
    """Whether a message of ``content_type`` is a control message."""
    return content_type is not None and _media(content_type) in control.FORMS
