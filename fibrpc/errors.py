"""The one exception tree of fibrpc.

Every error fibrpc raises is a ``FibrpcError``; pika's exceptions are translated once, in
``fibrpc.amqp``, keeping the original as ``__cause__``, and never escape the package::

    FibrpcError                  .url (password hidden), .queue: where, when known
    ├── ConfigError              a setting, URL or argument that cannot work
    ├── RequestError             a request was refused; .code is its stable wire code
    ├── UnreadableReplyError     a reply that is not what the protocol says
    ├── BrokerError              talking to RabbitMQ failed
    │   ├── BrokerUnreachableError   no working connection to the broker
    │   ├── AccessRefusedError       login, vhost or permission refused
    │   └── BrokerRefusedError       the broker answered and refused what was asked
    ├── NoServerError            no fibrpc server consumes the request queue
    ├── CallTimeoutError         no reply within the call's .timeout (also a TimeoutError)
    ├── ClientClosedError        the client was closed while calls were in flight
    └── SpawnError               a ``fibrpc serve`` started by fibrpc did not come up

``RequestError`` is the same class on both sides of the wire: a server raises it while
validating or computing, encodes it as an error envelope, and the client decodes that
envelope back into a ``RequestError`` with the same code and message. A client that
cannot send an argument (not an integer, say) raises it too, with the code a server would
have answered.
"""

from __future__ import annotations

import enum


class FibrpcError(Exception):
    """Base class of every error fibrpc raises.

    ``message`` is a full sentence naming the bad value; ``url`` (its password hidden)
    and ``queue`` say where it happened, when that is known (else None).
    """

    def __init__(self, message: str, *, url: str | None = None, queue: str | None = None):
        super().__init__(message)
        self.message = message
        self.url = url
        self.queue = queue


class ConfigError(FibrpcError):
    """A setting, option, URL or argument that cannot work, found before anything is
    sent."""


class ErrorCode(enum.StrEnum):
    """The stable, machine-readable codes carried by error replies (strings: each
    compares equal to its value).

    They are part of the wire protocol (docs/protocol.md): never rename one.
    """

    MALFORMED = "malformed"  # body is not a decimal n, nor valid JSON
    NOT_AN_INTEGER = "not_an_integer"  # a float, bool, string or other non-integer n
    NEGATIVE = "negative"  # n < 0
    OUT_OF_RANGE = "out_of_range"  # n above the algorithm's bound
    UNKNOWN_ALGORITHM = "unknown_algorithm"
    BODY_TOO_LARGE = "body_too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    REPLY_TOO_LARGE = "reply_too_large"
    UNSUPPORTED_CONTENT_TYPE = "unsupported_content_type"
    POISON = "poison"  # delivered too many times without an answer
    INTERNAL = "internal"  # a bug in fibrpc: reported, never a crash


class RequestError(FibrpcError):
    """A request was refused, by validation or by the algorithm.

    ``code`` is an ``ErrorCode`` (or, from a newer server, a code this version does not
    know, as a plain string); ``message`` is a sentence naming the bad value and the
    bound it broke. A client raises it when an error reply arrives.
    """

    def __init__(
        self, code: str, message: str, *, url: str | None = None, queue: str | None = None
    ) -> None:
        super().__init__(message, url=url, queue=queue)
        try:
            self.code: ErrorCode | str = ErrorCode(code)
        except ValueError:
            self.code = code

    def __repr__(self) -> str:
        return f"RequestError(code={str(self.code)!r}, message={self.message!r})"


class UnreadableReplyError(FibrpcError):
    """A reply that cannot be read: not the JSON, text or error envelope the protocol
    says, or a list where one result was due. A protocol error, not a refusal."""


class BrokerError(FibrpcError):
    """Talking to RabbitMQ failed; the message names the URL with its password hidden."""


class BrokerUnreachableError(BrokerError):
    """No working connection to the broker could be opened: refused, unroutable, a TLS
    failure, or a peer that accepts TCP and does not speak AMQP in time."""


class AccessRefusedError(BrokerError):
    """The broker refused the login, the virtual host or a permission."""


class BrokerRefusedError(BrokerError):
    """The broker answered and refused what fibrpc asked of it: a queue that exists in
    another form, a deprecated feature the broker denies, a limit of the virtual host, a
    message larger than the broker accepts. Retrying the same thing cannot help.

    ``reply_code`` and ``reply_text`` are the broker's own (0 and "" when the refusal
    was found before anything was sent).
    """

    def __init__(
        self,
        message: str,
        *,
        reply_code: int = 0,
        reply_text: str = "",
        url: str | None = None,
        queue: str | None = None,
    ) -> None:
        super().__init__(message, url=url, queue=queue)
        self.reply_code = reply_code
        self.reply_text = reply_text


class NoServerError(FibrpcError):
    """No server consumes the request queue, so a call could never be answered."""


class CallTimeoutError(FibrpcError, TimeoutError):
    """A call got no reply within its timeout (``timeout``, seconds)."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        queue: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(message, url=url, queue=queue)
        self.timeout = timeout


class ClientClosedError(FibrpcError):
    """The client was closed (or lost its connection for good) with the call in flight."""


class SpawnError(FibrpcError):
    """A ``fibrpc serve`` that fibrpc started (``fibrpc bench --spawn``, the pytest
    plugin: ``fibrpc.serving``) exited or did not become ready in time; the message
    quotes the end of its log."""
