"""Named exit codes of the ``fibrpc`` command, one per kind of failure.

They are part of the command's interface (README.md lists them) and tests assert them.
"""

from __future__ import annotations

import enum

from fibrpc.errors import (
    AccessRefusedError,
    BrokerRefusedError,
    BrokerUnreachableError,
    CallTimeoutError,
    ConfigError,
    NoServerError,
    RequestError,
)


class ExitCode(enum.IntEnum):
    """How a ``fibrpc`` command ended."""

    OK = 0
    FAILURE = 1  # an unexpected error; the message says what
    USAGE = 2  # bad arguments (click's own code)
    REQUEST_REFUSED = 3  # the server replied with an error (bad n, unknown algorithm...)
    TIMEOUT = 4  # no reply within --timeout
    NO_SERVER = 5  # no server consumes the queue
    BROKER_UNREACHABLE = 6  # no connection to RabbitMQ
    ACCESS_REFUSED = 7  # RabbitMQ refused the user, password, vhost or permission
    CONFIG = 8  # a setting that cannot work (a malformed URL, say)
    CRASH_LOOP = 9  # serve: workers kept dying while booting
    FORCED_STOP = 10  # serve: a second signal cut the drain short
    BROKER_REFUSED = 11  # RabbitMQ answered and refused (a queue in another form, a limit)
    ABANDONED = 12  # a worker (never the command) ended to stop work its caller gave up on
    INTERRUPTED = 130  # call/bench: Ctrl-C


_BY_ERROR: tuple[tuple[type[Exception], ExitCode], ...] = (
    (RequestError, ExitCode.REQUEST_REFUSED),
    (CallTimeoutError, ExitCode.TIMEOUT),
    (NoServerError, ExitCode.NO_SERVER),
    (AccessRefusedError, ExitCode.ACCESS_REFUSED),
    (BrokerRefusedError, ExitCode.BROKER_REFUSED),
    (BrokerUnreachableError, ExitCode.BROKER_UNREACHABLE),
    (ConfigError, ExitCode.CONFIG),
)


def for_error(error: BaseException) -> ExitCode:
    """The exit code for a fibrpc error (``FAILURE`` for anything else)."""
    for kind, code in _BY_ERROR:
        if isinstance(error, kind):
            return code
    return ExitCode.FAILURE
