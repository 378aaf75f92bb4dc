"""The client's side of coalescing (the form is ``fibrpc.coalesce``'s): light single calls
taken from the outbox at the same turn share messages (at most ``coalesce.MAX_CALLS`` a
message), with no waiting added: a call alone goes out alone, as it always has. Each call
stays a call of its own (its entry in the registry, its slot of the window, its deadline
and its outcome); the ``Coalescer`` keeps only which calls each coalesced message
carried, to settle them from the message's reply, to fail them together when the message
is refused whole, and to send them again one message each to a server that does not read
the form. It runs on the thread that has the driver's turn (``fibrpc.driver``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

from fibrpc import callerrors, coalesce, protocol, tracing
from fibrpc.calls import AS_TEXT, Call, Registry
from fibrpc.errors import ErrorCode, RequestError, UnreadableReplyError
from fibrpc.linkapi import Link

log = logging.getLogger(__name__)

#: The coalesced messages remembered are pruned of those wholly settled when they
#: outnumber the calls in flight by this many.
_MESSAGES_SLACK: Final = 1024


class Coalescer:
    """The coalesced messages of one client's driver (see the module docstring).

    ``expiry(call, now)`` sets when a call's request, published ``now``, is to leave
    the queue and returns it (monotonic seconds, or ``math.inf``); ``publish(call)``
    publishes a call's request alone (raises ``LinkLost``); ``count_stray(corr_id)``
    counts a reply to nothing waiting."""

    def __init__(
        self,
        link: Link,
        registry: Registry,
        *,
        expiry: Callable[[Call, float], float],
        publish: Callable[[Call], None],
        count_stray: Callable[[str | None], None],
    ) -> None:
        self.link = link
        self.registry = registry
        self._expiry = expiry
        self._publish = publish
        self._count_stray = count_stray
        #: Whether light single calls share messages: until a server refuses the form.
        self.coalescing = True
        self.coalesced = 0  #: coalesced messages sent (for tests and bench)
        #: The coalesced messages in flight: their correlation id, and their calls.
        self._messages: dict[str, list[Call]] = {}

    def pop(self, corr_id: str | None) -> list[Call] | None:
        """The calls of the coalesced message ``corr_id``, forgotten; None if it is not
        one (or no longer)."""
        messages = self._messages
        return messages.pop(corr_id, None) if messages and corr_id else None

    def clear(self) -> None:
        """Forget every coalesced message: their calls are sent again (or fail) one by
        one (a new channel or connection: their replies went with the old one)."""
        self._messages.clear()

    def pack(self, calls: list[Call]) -> list[Call]:
        """Publish the light calls of ``calls`` in coalesced messages (when more than one
        is light); return the calls still to publish one message each. Raises
        ``LinkLost``."""
        light = [call for call in calls if call.light]
        if len(light) < 2:
            return calls
        alone = [call for call in calls if not call.light]
        for start in range(0, len(light), coalesce.MAX_CALLS):
            chunk = light[start : start + coalesce.MAX_CALLS]
            if len(chunk) == 1:
                alone.append(chunk[0])
            else:
                self._publish_coalesced(chunk)
        return alone

    def _publish_coalesced(self, calls: list[Call]) -> None:
        """Publish ``calls`` (tracked already) in one coalesced message; its TTL is
        the longest of theirs. Raises ``LinkLost`` (the calls stay pending: re-sent
        after the reconnect, each alone)."""
        now = time.monotonic()
        wall_ms = int(time.time() * 1000)
        expiry = self._expiry
        outgoing: list[tuple[str, int, str, int | None, int | None]] = []
        append = outgoing.append
        latest = 0.0
        for call in calls:
            n: int = call.n  # type: ignore[assignment]  # a light call has one n
            expires = expiry(call, now)
            if expires == math.inf:
                latest = math.inf
                append((call.corr_id, n, call.algo, None, None))
                continue
            latest = max(latest, expires)
            left_ms = int((expires - now) * 1000)
            left_ms = max(left_ms, 1)
            append((call.corr_id, n, call.algo, wall_ms + left_ms, left_ms))
        message_id = calls[0].corr_id + "+"
        body = coalesce.encode_calls(outgoing)
        message = Call(message_id, [], "", AS_TEXT, math.inf, (body, coalesce.CALLS, None))
        message.deadline = message.expires = latest
        messages = self._messages
        if len(messages) > len(self.registry) + _MESSAGES_SLACK:
            self._messages = messages = {
                key: members
                for key, members in messages.items()
                if not all(member.done for member in members)
            }
        messages[message_id] = calls
        for call in calls:
            if call.span is not None:
                tracing.coalesced(call.span, message_id, len(calls), self.link.described)
        self.link.publish(message)
        self.coalesced += 1

    def on_reply(self, members: list[Call], content_type: str | None, body: bytes) -> None:
        """The reply to a coalesced message: settle each call its entries name. A call
        with no entry is settled later (by its deadline, or by a reply of its own). A
        reply refusing the message whole fails each of its calls still in flight, but
        ``unsupported_content_type``, which sends them again one message each."""
        registry = self.registry
        if protocol.media_type(content_type) == coalesce.CALLS:
            try:
                answers = coalesce.decode_answers(body)
            except ValueError as exc:
                self._fail_members(members, exc)
                return
            outcomes: list[tuple[Call, Any, bool]] = []
            settle = outcomes.append
            pop = registry.pop
            for answer in answers:
                call = pop(answer.id)
                if call is None:
                    self._count_stray(answer.id)
                elif answer.error is not None:
                    settle((call, answer.error, False))
                else:
                    try:
                        result: Any = answer.result
                        if call.as_ != AS_TEXT:
                            result = protocol.to_int(answer.result)  # type: ignore[arg-type]
                    except ValueError as exc:
                        settle((call, self._unreadable(call, exc), False))
                    else:
                        settle((call, result, True))
            registry.settle_each(outcomes)
            return
        try:
            protocol.decode_reply(body, content_type)
        except RequestError as exc:
            if exc.code == ErrorCode.UNSUPPORTED_CONTENT_TYPE:
                self._uncoalesce(members)
                return
            for call in members:
                registry.fail(call.corr_id, RequestError(exc.code, exc.message))
            return
        except Exception as exc:
            self._fail_members(members, exc)
            return
        self._fail_members(members, ValueError("one result for a coalesced message"))

    def _fail_members(self, members: list[Call], cause: Exception) -> None:
        """Fail the calls of a coalesced message whose reply could not be read."""
        for call in members:
            if call.corr_id in self.registry:
                self.registry.fail(call.corr_id, self._unreadable(call, cause))

    def _unreadable(self, call: Call, exc: Exception) -> UnreadableReplyError:
        return callerrors.unreadable(call, exc, self.link.described, self.link.queue)

    def _uncoalesce(self, members: list[Call]) -> None:
        """A server does not read coalesced messages: send ``members`` again one message
        each, and stop coalescing."""
        if self.coalescing:
            log.info(
                "a server on %r does not read coalesced calls: sending each alone", self.link.queue
            )
        self.coalescing = False
        for call in members:
            if call.corr_id in self.registry:
                self._publish(call)
