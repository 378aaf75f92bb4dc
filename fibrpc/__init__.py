"""fibrpc: a Fibonacci RPC compute server on RabbitMQ, and its pipelining client.

Public API::

    from fibrpc import Client
    with Client("amqp://guest:guest@127.0.0.1:5672/%2F") as client:
        client.call(30)                      # 832040
        client.map(range(94), algo="iter")   # batched and pipelined (iter: n <= 93)
        client.call_text(10**6)              # 208,988 digits, as text

README.md and docs/ say the rest.
"""

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from fibrpc.client import Client
    from fibrpc.tls import TLSOptions

#: Names imported on first use (PEP 562): ``import fibrpc`` (the pytest plugin, say, in
#: every test session of an application that installs fibrpc) loads no pika.
_LAZY = {"Client": "fibrpc.client", "TLSOptions": "fibrpc.tls"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fibrpc' has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
