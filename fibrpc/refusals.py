"""What RabbitMQ's refusals mean: pure readings of its reply codes and texts. No pika.

A broker that answers and refuses (a queue that exists in another form, a deprecated
feature it denies, a vhost limit, a message over its ``max_message_size``) must never be
taken for a broker that is down: retrying cannot help, so ``serve``, ``call``, ``status``
and ``bench`` stop with ``BrokerRefusedError`` and say what to do. Only a broker that does
not answer, or drops the connection (``320 CONNECTION_FORCED`` on a restart, say), is
retried. ``fibrpc.amqp`` raises; this module only reads.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

#: AMQP reply codes that mean "you are not allowed" (login, vhost, permission).
ACCESS_REFUSED_CODES: Final = frozenset({403, 530})

#: AMQP reply codes with which the broker refuses a request it understood: asking again
#: gets the same answer. (320 CONNECTION_FORCED, a broker shutting down, is not one.)
_REFUSAL_CODES: Final = frozenset(
    {
        402,  # INVALID_PATH
        404,  # NOT_FOUND
        405,  # RESOURCE_LOCKED: an exclusive queue of another connection
        406,  # PRECONDITION_FAILED: inequivalent arguments, a vhost limit, a message size
        540,  # NOT_IMPLEMENTED
    }
)

#: 541 INTERNAL_ERROR is a refusal only when it names a deprecated feature the broker
#: denies (RabbitMQ 4.x: "Feature transient_nonexcl_queues is deprecated"); otherwise it
#: may be passing (a quorum queue without a leader, say) and is retried.
_DEPRECATED: Final = re.compile(r"[Ff]eature `?([\w.-]+)`? is deprecated")

_INEQUIVALENT: Final = re.compile(
    r"inequivalent arg '(?P<arg>[^']*)' for queue '(?P<queue>.*)' in vhost '(?P<vhost>.*)': "
    r"received (?P<received>.*?) but current is (?P<current>.*?)\s*$"
)
_VALUE: Final = re.compile(r"(?:the value )?'(?P<value>[^']*)'(?: of type '[^']*')?")
_MESSAGE_SIZE: Final = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_ACK_TIMEOUT: Final = re.compile(r"delivery acknowledgement on channel \d+ timed out")
_ACCESS: Final = re.compile(
    r"access to (?:queue|exchange) '(?P<name>.*)' in vhost '(?P<vhost>.*)' refused for user "
    r"'(?P<user>.*)'"
)


def is_refusal(reply_code: int, reply_text: str) -> bool:
    """Whether a channel or connection closed by the broker with ``reply_code`` and
    ``reply_text`` is a refusal (stop and say so) rather than an outage (retry)."""
    if reply_code in _REFUSAL_CODES:
        return True
    return reply_code == 541 and _DEPRECATED.search(reply_text) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Inequivalence:
    """A queue that exists with ``argument`` = ``current``, declared with ``received``."""

    queue: str
    argument: str
    received: str
    current: str


def inequivalence(reply_text: str) -> Inequivalence | None:
    """The difference named by RabbitMQ's ``406 PRECONDITION_FAILED - inequivalent arg
    'durable' for queue 'q' in vhost '/': received 'true' but current is 'false'``, or
    None when the text is not one of those."""
    found = _INEQUIVALENT.search(reply_text)
    if found is None:
        return None
    return Inequivalence(
        queue=found["queue"],
        argument=found["arg"],
        received=_value(found["received"]),
        current=_value(found["current"]),
    )


def _value(text: str) -> str:
    """``'true'`` or ``the value 'quorum' of type 'longstr'`` as ``true`` / ``quorum``;
    RabbitMQ's ``none`` (the argument is absent) as ``none``."""
    found = _VALUE.fullmatch(text.strip())
    return found["value"] if found is not None else text.strip()


def explain_queue_refusal(queue: str, queue_type: str, reply_code: int, reply_text: str) -> str:
    """One sentence saying why RabbitMQ refused to declare the request queue ``queue`` as
    a ``queue_type`` queue, and what to do about it."""
    found = inequivalence(reply_text)
    if found is None:
        feature = _DEPRECATED.search(reply_text)
        if feature is not None:
            return (
                f"RabbitMQ refused to declare queue {queue!r}: it denies the deprecated "
                f"feature {feature[1]} ({reply_code}: {reply_text}). Upgrade the program "
                "that declares the queue that way, or delete the queue and let fibrpc "
                f"declare it: rabbitmqctl delete_queue {queue}"
            )
        return (
            f"RabbitMQ refused to declare queue {queue!r} as a {queue_type} queue "
            f"({reply_code}: {reply_text})."
        )
    if found.argument == "x-queue-type":
        current = "classic" if found.current == "none" else found.current
        usable = current in ("classic", "quorum")
        hint = f"serve it as it is with --queue-type {current}, or " if usable else ""
        what = f"Queue {queue!r} already exists as a {current} queue, but fibrpc declares a "
        what += f"{queue_type} queue (--queue-type {queue_type})"
    else:
        hint = ""
        what = (
            f"Queue {queue!r} already exists with {found.argument} = {found.current}, but "
            f"fibrpc declares it with {found.argument} = {found.received} (a {queue_type} queue)"
        )
    return (
        f"{what}. It was declared by another program or an older fibrpc: {hint}delete it "
        f"(rabbitmqctl delete_queue {queue}; requests waiting in it are lost) and start the "
        "server again, or serve another queue with --queue."
    )


def max_message_size(reply_text: str) -> int | None:
    """The broker's largest message in bytes, from the ``406 PRECONDITION_FAILED -
    message size N is larger than configured max size M`` with which RabbitMQ closes the
    channel of a publisher that went over it; None for any other text."""
    found = _MESSAGE_SIZE.search(reply_text)
    return int(found[2]) if found is not None else None


def ack_timed_out(reply_text: str) -> str | None:
    """What to do when RabbitMQ closed a worker's channel with ``406 PRECONDITION_FAILED
    - delivery acknowledgement on channel N timed out``: a computation outlasted the
    broker's consumer timeout. None for any other text."""
    if _ACK_TIMEOUT.search(reply_text) is None:
        return None
    return (
        "a computation outlasted RabbitMQ's consumer timeout; the request comes back and "
        "joins the computation under way, but set consumer_timeout (rabbitmq.conf, in ms) "
        "or the queue's consumer-timeout policy above the longest computation the server "
        "allows (docs/operations.md)"
    )


def probe_refused(queue: str, reply_code: int, reply_text: str) -> str:
    """What to do when RabbitMQ refused the passive declare of ``queue`` with which a
    client counts its consumers (``fibrpc status`` too): since RabbitMQ 4.2.6 and 4.3.0 it
    needs some permission on the queue, and the harmless one is write (publishing checks
    the exchange, not the queue; binding the queue needs read on an exchange as well).
    Names the user and vhost from RabbitMQ's text when it gives them."""
    found = _ACCESS.search(reply_text)
    user = found["user"] if found is not None else "USER"
    vhost = found["vhost"] if found is not None else "VHOST"
    write = f"^(amq\\.default|{re.escape(queue)})$"
    return (
        f"RabbitMQ refused to let user {user!r} count the consumers of queue {queue!r} "
        f"({reply_code}: {reply_text}). RabbitMQ 4.2.6 and later need a permission on the "
        f"queue for that: add the queue to the user's write permission, as docs/security.md "
        f"sets the client user up: rabbitmqctl set_permissions -p {vhost} {user} '^$' "
        f"'{write}' '^$'."
    )
