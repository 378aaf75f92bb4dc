"""fibrpc: a Fibonacci RPC compute server on RabbitMQ, and its pipelining client.

Public API::

    from fibrpc import Client
    with Client("amqp://guest:guest@127.0.0.1:5672/%2F") as client:
        client.call(30)                      # 832040
        client.map(range(94), algo="iter")   # batched and pipelined (iter: n <= 93)
        client.call_text(10**6)              # 208,988 digits, as text

README.md and docs/ say the rest.
"""

from fibrpc.amqp import TLSOptions
from fibrpc.client import Client
from fibrpc.errors import (
    AccessRefusedError,
    BrokerError,
    BrokerRefusedError,
    BrokerUnreachableError,
    CallTimeoutError,
    ClientClosedError,
    ConfigError,
    ErrorCode,
    FibrpcError,
    NoServerError,
    RequestError,
    UnreadableReplyError,
)

__all__ = [
    "AccessRefusedError",
    "BrokerError",
    "BrokerRefusedError",
    "BrokerUnreachableError",
    "CallTimeoutError",
    "Client",
    "ClientClosedError",
    "ConfigError",
    "ErrorCode",
    "FibrpcError",
    "NoServerError",
    "RequestError",
    "TLSOptions",
    "UnreadableReplyError",
]
__version__ = "0.1.0"
