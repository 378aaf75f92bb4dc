"""What the client's calls are told when they fail without a server's answer: no server
on the queue, the broker unreachable (or refusing) while the connection is down, no reply
in time, a reply that cannot be read, a request too large for the broker. Pure: built
from the call, the node and the queue (``fibrpc.driver`` supplies them).
"""

from __future__ import annotations

from fibrpc.calls import Call
from fibrpc.errors import (
    BrokerError,
    CallTimeoutError,
    ErrorCode,
    NoServerError,
    RequestError,
    UnreadableReplyError,
)


def no_server(url: str, queue: str, *, missing: bool) -> NoServerError:
    """No server consumes ``queue`` at ``url`` (``missing``: the queue does not exist)."""
    state = "does not exist" if missing else "has no consumer"
    return NoServerError(
        f"No fibrpc server is serving queue {queue!r} at {url} (the queue "
        f"{state}). Start one with: fibrpc serve --url URL --queue {queue}",
        url=url,
        queue=queue,
    )


def down_error(call: Call, down: BrokerError, url: str, queue: str) -> BrokerError:
    """The error of ``call`` while the connection is down: ``down``'s kind, saying what
    happened to the call (``url``: the node, if ``down`` names none)."""
    error = type(down)(
        f"No reply to {call.describe()}: the connection to RabbitMQ was lost and "
        f"reconnecting fails: {down.message}",
        url=down.url or url,
        queue=queue,
    )
    error.__cause__ = down
    return error


def timed_out(call: Call, url: str, queue: str, blocked: str | None) -> CallTimeoutError:
    """The error of ``call`` past its deadline, with a connection and a server
    (``blocked``: why RabbitMQ blocks the client's publishing, while it does)."""
    why = f" RabbitMQ blocks this client's publishing ({blocked})." if blocked else ""
    return CallTimeoutError(
        f"No reply to {call.describe()} within {call.timeout} s from queue "
        f"{queue!r} at {url}.{why}",
        url=url,
        queue=queue,
        timeout=call.timeout,
    )


def unreadable(call: Call, exc: Exception, url: str, queue: str) -> UnreadableReplyError:
    """The error of ``call`` whose reply could not be read (``exc``: why; its cause)."""
    error = UnreadableReplyError(
        f"The reply to {call.describe()} could not be read: {exc}",
        url=url,
        queue=queue,
    )
    error.__cause__ = exc
    return error


def too_large(size: int, largest: int) -> RequestError:
    """The error of a request over the broker's ``max_message_size`` (``largest``)."""
    return RequestError(
        ErrorCode.BODY_TOO_LARGE,
        f"The request body has {size:,} bytes; the broker accepts messages of at most "
        f"{largest:,} bytes (RabbitMQ's max_message_size). Send fewer values of n per "
        "call (map's batch_size).",
    )
