"""The one exception tree of fibrpc.

Every error fibrpc raises is a ``FibrpcError``; pika's exceptions are translated once, in
``fibrpc.amqp``, and never escape the package::

    FibrpcError
    ├── ConfigError              a setting or URL that cannot work
    ├── RequestError             a request was refused; ``.code`` is its stable wire code
    ├── BrokerError              talking to RabbitMQ failed
    │   ├── BrokerUnreachableError   no TCP/TLS connection to the broker
    │   ├── AccessRefusedError       login, vhost or permission refused
    │   └── BrokerRefusedError       the broker answered and refused what was asked
    ├── NoServerError            no fibrpc server consumes the request queue
    ├── CallTimeoutError         no reply within the call's timeout (also a ``TimeoutError``)
    └── ClientClosedError        the client was closed while calls were in flight

``RequestError`` is the same class on both sides of the wire: a server raises it while
validating or computing, encodes it as an error envelope, and the client decodes that
envelope back into a ``RequestError`` with the same code and message.
"""

from __future__ import annotations

from typing import Final


class FibrpcError(Exception):
    """Base class of every error fibrpc raises."""


class ConfigError(FibrpcError):
    """A setting, option or URL that cannot work, found before anything is sent."""


class ErrorCode:
    """The stable, machine-readable codes carried by error replies.

    They are part of the wire protocol (see README.md): never rename one.
    """

    MALFORMED: Final = "malformed"  # body is not a decimal n, nor valid JSON
    NOT_AN_INTEGER: Final = "not_an_integer"  # a float, bool, string or other non-integer n
    NEGATIVE: Final = "negative"  # n < 0
    OUT_OF_RANGE: Final = "out_of_range"  # n above the algorithm's bound
    UNKNOWN_ALGORITHM: Final = "unknown_algorithm"
    BODY_TOO_LARGE: Final = "body_too_large"
    BATCH_TOO_LARGE: Final = "batch_too_large"
    REPLY_TOO_LARGE: Final = "reply_too_large"
    UNSUPPORTED_CONTENT_TYPE: Final = "unsupported_content_type"
    POISON: Final = "poison"  # delivered too many times without an answer
    INTERNAL: Final = "internal"  # a bug in fibrpc: reported, never a crash


class RequestError(FibrpcError):
    """A request was refused, by validation or by the algorithm.

    ``code`` is one of ``ErrorCode``; ``message`` is a sentence naming the bad value and
    the bound it broke. A client raises it when an error reply arrives.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RequestError(code={self.code!r}, message={self.message!r})"


class BrokerError(FibrpcError):
    """Talking to RabbitMQ failed; the message names the URL with its password hidden."""


class BrokerUnreachableError(BrokerError):
    """No connection to the broker could be opened (refused, DNS, TLS handshake)."""


class AccessRefusedError(BrokerError):
    """The broker refused the login, the virtual host or a permission."""


class BrokerRefusedError(BrokerError):
    """The broker answered and refused what fibrpc asked of it: a queue that exists in
    another form, a deprecated feature the broker denies, a limit of the virtual host, a
    message larger than the broker accepts. Retrying the same thing cannot help.

    ``reply_code`` and ``reply_text`` are the broker's own (0 and "" when the refusal
    was found before anything was sent).
    """

    def __init__(self, message: str, *, reply_code: int = 0, reply_text: str = "") -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text


class NoServerError(FibrpcError):
    """No server consumes the request queue, so a call could never be answered."""


class CallTimeoutError(FibrpcError, TimeoutError):
    """A call got no reply within its timeout."""


class ClientClosedError(FibrpcError):
    """The client was closed (or lost its connection for good) with the call in flight."""
