"""Traces across the call: every use of OpenTelemetry in fibrpc, and nothing else.

OpenTelemetry is optional (``pip install 'fibrpc[otel]'``). With it installed and a tracer
provider set, the client records a span per call, from the moment the call is made to
the moment it settles (kind CLIENT for ``call`` and ``call_text``, whose caller waits;
PRODUCER for ``submit``, ``map`` and ``imap``), and injects its W3C trace context
(``traceparent``, ``tracestate``) into the request's headers through the global
propagator; a re-sent request carries the same headers. A worker extracts that context
and records a span per request (kind CONSUMER) as its child. Attributes follow
OpenTelemetry's messaging semantic conventions; docs/tracing.md lists them.

**Zero cost when off.** Whether a call is traced is decided once, when it is made
(``start_call``); the worker decides once per request (``tracer``). fibrpc never imports
OpenTelemetry itself until it can matter: a tracer provider can only have been set by
code that imported ``opentelemetry.trace`` (or named one in ``OTEL_PYTHON_TRACER_PROVIDER``),
so until then the check is one dictionary look-up in ``sys.modules``. Once imported, a
call is traced only when the global provider is neither the API's proxy (no provider set
yet: what ``trace.get_tracer_provider()`` returns until ``set_tracer_provider``) nor its
no-op provider; a provider set later is picked up by the next call. Asking
``get_tracer_provider()`` costs about a microsecond (it looks up an environment variable
each time), so the check reads the global it returns, ``opentelemetry.trace.
_TRACER_PROVIDER`` (None until a provider is set), when the API has it, as every release
from 1.0 to 1.45 does, and no ``OTEL_PYTHON_TRACER_PROVIDER`` names a provider to load;
otherwise it asks ``get_tracer_provider()``. Without OpenTelemetry installed nothing here
is imported.

**Workers export** only when told to, with OpenTelemetry's own environment variables:
``OTEL_TRACES_EXPORTER`` names the exporters (``console``, ``otlp``, or any installed
package's ``opentelemetry_traces_exporter`` entry point), ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` the resource, ``OTEL_TRACES_SAMPLER`` the sampler
(``export_from_env``, called in each worker process after the fork). A provider set up
before (``opentelemetry-instrument fibrpc serve``) is used as it is.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final

log = logging.getLogger(__name__)

#: The instrumentation scope of fibrpc's spans.
SCOPE: Final = "fibrpc"
#: The environment variable naming the exporters a worker sets up (OpenTelemetry's own).
EXPORTER_ENV: Final = "OTEL_TRACES_EXPORTER"
#: The entry point group in which packages offer span exporters (OpenTelemetry's own).
EXPORTER_GROUP: Final = "opentelemetry_traces_exporter"

# Messaging semantic conventions (attribute names as opentelemetry-semantic-conventions
# 0.66b spells them; written out so that the package is not needed).
SYSTEM: Final = "messaging.system"
DESTINATION: Final = "messaging.destination.name"
OPERATION_TYPE: Final = "messaging.operation.type"
OPERATION_NAME: Final = "messaging.operation.name"
MESSAGE_ID: Final = "messaging.message.id"
CONVERSATION_ID: Final = "messaging.message.conversation_id"
BATCH_COUNT: Final = "messaging.batch.message_count"
BODY_SIZE: Final = "messaging.message.body.size"
ROUTING_KEY: Final = "messaging.rabbitmq.destination.routing_key"
DELIVERY_TAG: Final = "messaging.rabbitmq.message.delivery_tag"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
ERROR_TYPE: Final = "error.type"
#: fibrpc's own: the algorithm, n (a single call), and a worker's outcome.
ALGO: Final = "fibrpc.algo"
N: Final = "fibrpc.n"
OUTCOME: Final = "fibrpc.outcome"
#: On a call's span: how many calls shared its message (``MESSAGE_ID`` names it).
COALESCED: Final = "fibrpc.coalesced"

_MODULE: Final = "opentelemetry.trace"
_PROVIDER_ENV: Final = "OTEL_PYTHON_TRACER_PROVIDER"

# The OpenTelemetry API, once imported (by someone): (trace module, propagate module,
# the provider classes that mean "no provider", SpanKind, StatusCode). None: not yet;
# False: not installed.
_api: Any = None
# The provider the cached tracer came from, and that tracer.
_provider: Any = None
_tracer: Any = None
# Whether OTEL_PYTHON_TRACER_PROVIDER names a provider (read once: None, not yet).
_named: bool | None = None
# Whether the API's global provider can be read directly (see the module docstring).
_direct = False


def _load() -> Any:
    """The OpenTelemetry API if it is in use in this process, importing it once; None
    while it is not (or never can be: not installed)."""
    global _api, _named, _direct
    if _api is not None:
        return _api or None
    if _MODULE not in sys.modules:
        if _named is None:
            _named = _PROVIDER_ENV in os.environ
        if not _named:
            return None  # nobody imported it, so nobody set a provider: ask again next time
    try:
        from opentelemetry import propagate, trace  # noqa: PLC0415 - optional, lazy
    except ImportError:
        _api = False
        return None
    if _named is None:
        _named = _PROVIDER_ENV in os.environ
    _direct = not _named and hasattr(trace, "_TRACER_PROVIDER")
    _api = (
        trace,
        propagate,
        (trace.ProxyTracerProvider, trace.NoOpTracerProvider),
        trace.SpanKind,
        trace.StatusCode,
    )
    return _api


def tracer() -> Any:
    """The tracer of fibrpc's spans, or None when nothing would record them (OpenTelemetry
    not in use, or no tracer provider set): the one check per call or request."""
    api = _api or _load()
    if api is None:
        return None
    if _direct:
        provider = api[0]._TRACER_PROVIDER
        if provider is None:
            return None
    else:
        provider = api[0].get_tracer_provider()
    if provider is _provider:
        return _tracer
    return _new_provider(api, provider)


def _new_provider(api: Any, provider: Any) -> Any:
    global _provider, _tracer
    from fibrpc import __version__  # noqa: PLC0415 - once per provider

    traced = not isinstance(provider, api[2])
    _provider = provider
    _tracer = provider.get_tracer(SCOPE, __version__) if traced else None
    return _tracer


_failed = False


def _failure(what: str) -> None:
    """A span could not be recorded (a failing processor, say): tracing never costs a
    call or a request. Logged once per process, with the traceback."""
    global _failed
    if not _failed:
        _failed = True
        log.warning("%s failed; the call goes on untraced (logged once)", what, exc_info=True)


# -- the client -----------------------------------------------------------------------------


def start_call(call: Any, queue: str, *, waits: bool) -> None:
    """Start ``call``'s span (``fibrpc.calls.Call``) if a provider is set, and keep the
    trace context its request carries: kind CLIENT when the caller ``waits`` for the
    reply (``call``, ``call_text``), PRODUCER otherwise. ``Call.settle`` ends it."""
    tracer_ = tracer()
    if tracer_ is None:
        return
    try:
        _start_call(tracer_, call, queue, waits)
    except Exception:
        call.span = call.trace = None
        _failure("starting a call's span")


def _start_call(tracer_: Any, call: Any, queue: str, waits: bool) -> None:
    trace, propagate, _, kinds, _ = _api
    n = call.n
    attributes: dict[str, Any] = {
        SYSTEM: "rabbitmq",
        DESTINATION: queue,
        OPERATION_TYPE: "send",
        OPERATION_NAME: "publish",
        ROUTING_KEY: queue,
        MESSAGE_ID: call.corr_id,
        CONVERSATION_ID: call.corr_id,
        BODY_SIZE: len(call.body),
        ALGO: call.algo,
    }
    if isinstance(n, list):
        attributes[BATCH_COUNT] = len(n)
    else:
        attributes[N] = n
    span = tracer_.start_span(
        f"publish {queue}",
        kind=kinds.CLIENT if waits else kinds.PRODUCER,
        attributes=attributes,
    )
    headers: dict[str, str] = {}
    propagate.inject(headers, context=trace.set_span_in_context(span))
    call.span = span
    call.trace = headers or None


def published(span: Any, url: str) -> None:
    """The request of ``span``'s call went to the node at ``url`` (the last one counts:
    a re-sent request may go to another node of a cluster)."""
    host, port = _address(url)
    try:
        span.set_attributes({SERVER_ADDRESS: host, SERVER_PORT: port})
    except Exception:
        _failure("setting a call's span attributes")


def coalesced(span: Any, message_id: str, calls: int, url: str) -> None:
    """The request of ``span``'s call travelled in the coalesced message ``message_id``
    with ``calls`` calls in all, to the node at ``url``: the span's ``MESSAGE_ID`` names
    the message (its ``CONVERSATION_ID`` stays the call's own id)."""
    host, port = _address(url)
    try:
        span.set_attributes(
            {MESSAGE_ID: message_id, COALESCED: calls, SERVER_ADDRESS: host, SERVER_PORT: port}
        )
    except Exception:
        _failure("setting a coalesced call's span attributes")


def end_call(span: Any, outcome: Any, *, ok: bool) -> None:
    """End a call's span: status ERROR, with the error's code (a refusal's wire code,
    ``timeout``, ``no_server``, or the exception's type), when it failed."""
    try:
        if not ok:
            code = error_code(outcome)
            span.set_attribute(ERROR_TYPE, code)
            span.set_status(_api[4].ERROR, f"{code}: {outcome}")
        span.end()
    except Exception:
        _failure("ending a call's span")


def error_code(error: BaseException) -> str:
    """The code a failed call's span carries: a ``RequestError``'s wire code, or the
    snake-case name of another fibrpc error (``CallTimeoutError``: ``call_timeout``)."""
    code = getattr(error, "code", None)
    if isinstance(code, str):
        return str(code)  # an ErrorCode is a StrEnum: its plain value
    name = type(error).__name__.removesuffix("Error")
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


# -- the worker -----------------------------------------------------------------------------


def _getter() -> Any:
    """A propagator getter for AMQP headers as pika decodes them (str, or bytes)."""
    from opentelemetry.propagators.textmap import Getter  # noqa: PLC0415

    class HeadersGetter(Getter[Mapping[str, Any]]):
        def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return [value] if isinstance(value, str) else None

        def keys(self, carrier: Mapping[str, Any]) -> list[str]:
            return list(carrier)

    return HeadersGetter()


_GETTER: Any = None


def record_request(
    tracer_: Any,
    *,
    queue: str,
    url: str,
    props: Any,
    tag: int | None,
    started: float,
    outcome: str,
    values: int = 0,
    batch: bool = False,
    algo: str | None = None,
    error: bytes | None = None,
    replied: float | None = None,
) -> None:
    """Record a worker's span for one request, as the child of the context its headers
    carry: from ``started`` (``time.perf_counter`` when the request was taken) to
    ``replied`` (``time.perf_counter`` just before its reply was published), or to now.
    The span ends where the reply leaves, not after the ack and the bookkeeping, so that
    it lies within the caller's span, whose end the reply may reach first.
    ``outcome``: ``ok``, the wire code of a refusal (then ``error`` is the reply's body,
    whose message becomes the status's description), or ``expired`` (skipped). Never
    raises: a span that cannot be recorded is logged (once) and left out."""
    global _GETTER
    try:
        now, elapsed = time.time_ns(), time.perf_counter() - started
        _, propagate, _, kinds, status = _api
        if _GETTER is None:
            _GETTER = _getter()
        headers = props.headers if isinstance(props.headers, dict) else {}
        parent = propagate.extract(headers, getter=_GETTER)
        corr_id = props.correlation_id
        host, port = _address(url)
        attributes: dict[str, Any] = {
            SYSTEM: "rabbitmq",
            DESTINATION: queue,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            ROUTING_KEY: queue,
            SERVER_ADDRESS: host,
            SERVER_PORT: port,
            OUTCOME: outcome,
        }
        if corr_id is not None:
            attributes[CONVERSATION_ID] = corr_id
            attributes[MESSAGE_ID] = props.message_id or corr_id
        if tag is not None:
            attributes[DELIVERY_TAG] = tag
        if algo is not None:
            attributes[ALGO] = algo
        if batch:
            attributes[BATCH_COUNT] = values
        span = tracer_.start_span(
            f"process {queue}",
            context=parent,
            kind=kinds.CONSUMER,
            attributes=attributes,
            start_time=now - int(elapsed * 1e9),
        )
        if error is not None:
            span.set_attribute(ERROR_TYPE, outcome)
            span.set_status(status.ERROR, f"{outcome}: {_error_message(error)}")
        late = 0 if replied is None else int((time.perf_counter() - replied) * 1e9)
        span.end(end_time=now - late)
    except Exception:
        _failure("recording a request's span")


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


@functools.lru_cache(maxsize=64)
def _address(url: str) -> tuple[str, int]:
    """The host and port of an ``amqp://`` or ``amqps://`` URL (never its password)."""
    parts = urllib.parse.urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return parts.hostname or "localhost", port


# -- a worker's exporters -----------------------------------------------------------------


def export_from_env() -> Any:
    """In a worker process: if ``OTEL_TRACES_EXPORTER`` names exporters (not ``none``)
    and no tracer provider is set yet, set one up (opentelemetry-sdk) that sends spans to
    them, in batches. Returns what ``stop_exporting`` takes (None: nothing set up).
    A missing SDK or an unknown exporter is logged, never fatal."""
    names = [n.strip() for n in os.environ.get(EXPORTER_ENV, "").split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    try:
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError:
        log.warning(
            "%s=%s, but opentelemetry-sdk is not installed: this worker records no spans "
            "(pip install opentelemetry-sdk, and the exporter's package)",
            EXPORTER_ENV,
            ",".join(names),
        )
        return None
    if not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    ):
        return None  # set up already (opentelemetry-instrument, say): use it as it is
    exporters = []
    for name in names:
        exporter = _exporter(name)
        if exporter is not None:
            exporters.append(exporter)
    if not exporters:
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "fibrpc"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.debug("tracing: spans go to %s", ", ".join(names))
    return provider


def _exporter(name: str) -> Any:
    from importlib.metadata import entry_points  # noqa: PLC0415

    found = list(entry_points(group=EXPORTER_GROUP, name=name))
    if not found:
        log.warning(
            "%s names %r, but no installed package offers that span exporter; known: %s",
            EXPORTER_ENV,
            name,
            ", ".join(sorted(e.name for e in entry_points(group=EXPORTER_GROUP))) or "none",
        )
        return None
    try:
        return found[0].load()()
    except Exception as exc:
        log.warning("the span exporter %r could not be set up: %s", name, exc)
        return None


def stop_exporting(provider: Any) -> None:
    """Send the spans still waiting, then stop (a worker's last act; bounded by the
    SDK's export timeout)."""
    if provider is not None:
        provider.shutdown()
