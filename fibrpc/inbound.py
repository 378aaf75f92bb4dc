"""What the broker sends back to the client's driver (``fibrpc.driver``), on the thread
that has the turn: replies, each settling its call (a coalesced message's go to the
``Coalescer``, a control message's to its listener, a reply to nothing waiting is counted
and dropped; a binary batch a server cannot read is sent again as JSON), and the close of
the channel (a refusal fails the calls in flight; a request over the broker's
``max_message_size`` fails only the calls too large). No pika.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fibrpc import callerrors, protocol, refusals
from fibrpc.callerrors import too_large
from fibrpc.calls import Call, Registry, read_reply
from fibrpc.coalescing import Coalescer
from fibrpc.controlbox import ControlBox
from fibrpc.errors import (
    AccessRefusedError,
    BrokerRefusedError,
    ClientClosedError,
    ErrorCode,
    FibrpcError,
    RequestError,
)
from fibrpc.linkapi import Link
from fibrpc.protocol import U64

log = logging.getLogger(__name__)


class Inbound:
    """Replies and channel closes for one client's driver (see the module docstring).
    ``publish(call)`` publishes a call's request (again; raises ``LinkLost``);
    ``expiry(call, now)`` sets when a request published ``now`` leaves the queue (for the
    ``Coalescer`` it owns)."""

    def __init__(
        self,
        link: Link,
        registry: Registry,
        controls: ControlBox,
        *,
        publish: Callable[[Call], None],
        expiry: Callable[[Call, float], float],
    ) -> None:
        self.link = link
        self.registry = registry
        self._controls = controls
        self._publish = publish
        self.dropped_unknown = 0
        self.dropped_duplicates = 0
        self.prefix = ""  # the client's correlation id prefix: tells duplicates apart
        self.max_message = 0  # the broker's largest message, once it has named one
        #: Whether batches go in the binary form: until a server refuses it (an older
        #: fibrpc, or another server on the queue), then as JSON for good.
        self.binary_requests = True
        #: The coalesced messages in flight, and whether light calls share messages.
        self.coalescer = Coalescer(
            link, registry, expiry=expiry, publish=publish, count_stray=self._count_stray
        )

    def on_reply(self, corr_id: str | None, content_type: str | None, body: bytes) -> None:
        """Settle the call ``corr_id`` with the reply ``body`` (see the module docstring)."""
        call = self.registry.pop(corr_id)
        if call is None:
            members = self.coalescer.pop(corr_id)
            listener = self._controls.listener(corr_id)
            if members is not None:
                self.coalescer.on_reply(members, content_type, body)
            elif listener is not None:
                listener(content_type, body)
            else:
                self._count_stray(corr_id)
            return
        try:
            result = read_reply(body, content_type, call.as_)
        except RequestError as exc:
            if exc.code == ErrorCode.UNSUPPORTED_CONTENT_TYPE and call.content_type == U64:
                self._resend_as_json(call)
                return
            self.registry.settle(call, exc, ok=False)
        except Exception as exc:
            error = callerrors.unreadable(call, exc, self.link.described, self.link.queue)
            self.registry.settle(call, error, ok=False)
        else:
            self.registry.settle(call, result, ok=True)

    def _resend_as_json(self, call: Call) -> None:
        """A server does not read batches in the binary form: send ``call`` again as
        JSON, and every later batch too."""
        if self.binary_requests:
            log.info("a server on %r does not read binary batches: sending JSON", self.link.queue)
        self.binary_requests = False
        call.body, call.content_type, call.msg_type = protocol.encode_request(call.n, call.algo)
        self.registry.track(call)
        self._publish(call)

    def _count_stray(self, corr_id: str | None) -> None:
        """A reply to nothing waiting: a duplicate (one of ours, already settled) or an
        unknown id. Dropped, counted, logged at debug."""
        mine = corr_id is not None and bool(self.prefix) and corr_id.startswith(self.prefix)
        if mine:
            self.dropped_duplicates += 1
        else:
            self.dropped_unknown += 1
        log.debug("dropped a %s reply %r", "duplicate" if mine else "unknown", corr_id)

    def on_channel_closed(self, reason: FibrpcError) -> None:
        """The broker closed the channel: a refusal (a permission, most likely) fails
        every call in flight with the broker's reason; then a fresh channel keeps the
        client usable. Raises ``LinkLost``.

        A request over the broker's ``max_message_size`` closes the channel too: then
        only the calls too large for the broker fail (``body_too_large``, naming its
        limit, which later calls are checked against before sending), and the others are
        sent again on the new channel, since their replies were bound to the old one."""
        largest = refusals.max_message_size(str(getattr(reason, "reply_text", "")))
        registry = self.registry
        self.coalescer.clear()  # their calls are sent again (or fail) one by one
        if largest is not None:
            self.max_message = largest
            self.link.reopen()
            for call in registry.calls():
                if len(call.body) > largest:
                    registry.fail(call.corr_id, too_large(len(call.body), largest))
                else:
                    self._publish(call)
            return
        error: FibrpcError = reason
        if not isinstance(reason, AccessRefusedError | BrokerRefusedError):
            error = ClientClosedError(f"RabbitMQ closed the client's channel: {reason}")
        log.warning("%s", error)
        for call in registry.calls():
            registry.fail(call.corr_id, error)
        self.link.reopen()
