"""Traces across the call, end to end: a real ``fibrpc serve``, the real broker, and the
OpenTelemetry SDK on both sides.

The client side records into the SDK's ``InMemorySpanExporter`` in this process. The
server is a subprocess: it exports the way an operator would, through
``OTEL_TRACES_EXPORTER``, here naming a span exporter offered by a package (a dist-info
folder on the server's ``PYTHONPATH``, as ``pip`` would leave one) that writes each
finished span as a JSON line to a file; the test reads that file. What runs without
OpenTelemetry, or without a provider, runs in a subprocess of its own, where no provider
has ever been set (a global provider is set once per process).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from fibrpc import CallTimeoutError, Client, NoServerError, RequestError, tracing
from fibrpc.aio import AsyncClient

pytestmark = pytest.mark.broker

SPAN_WAIT = 15.0  # seconds to wait for a worker's spans to reach the file

#: The span exporter the server is given: a package's, found by its entry point.
EXPORTER = '''
import json, os
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

class JsonLinesExporter(SpanExporter):
    """Appends each finished span to $FIBRPC_TEST_SPANS as one JSON line."""

    def __init__(self):
        self.path = os.environ["FIBRPC_TEST_SPANS"]

    def export(self, spans):
        with open(self.path, "a") as out:
            for span in spans:
                out.write(span.to_json(indent=None) + "\\n")
        return SpanExportResult.SUCCESS
'''


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global tracer provider for this test, recording into memory; taken away after
    (as opentelemetry-test-utils' ``reset_trace_globals`` does), so that no other test
    of the session is traced."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None


@pytest.fixture
def traced_serve(serve, tmp_path: Path):
    """Start a server whose workers export their spans; returns the file they go to."""
    site = tmp_path / "site"
    dist = site / "fibrpc_test_spans-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "fibrpc_test_spans.py").write_text(EXPORTER)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fibrpc-test-spans\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[opentelemetry_traces_exporter]\njsonl = fibrpc_test_spans:JsonLinesExporter\n"
    )
    out = tmp_path / "worker-spans.jsonl"

    def start(*args: str, env: dict[str, str] | None = None, **kwargs: Any):
        serve(
            *args,
            env={
                "OTEL_TRACES_EXPORTER": "jsonl",
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "FIBRPC_TEST_SPANS": str(out),
                "PYTHONPATH": str(site),
                **(env or {}),
            },
            **kwargs,
        )
        return out

    return start


def worker_spans(path: Path, count: int) -> list[dict[str, Any]]:
    """The first ``count`` spans the server's workers exported (waits for them)."""
    deadline = time.monotonic() + SPAN_WAIT
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            found = [json.loads(line) for line in path.read_text().splitlines() if line]
            if len(found) >= count:
                return found
        time.sleep(0.05)
    raise AssertionError(f"{len(found)} worker span(s) exported, {count} expected: {found}")


def hex_id(value: int, width: int) -> str:
    return f"0x{value:0{width}x}"


def only(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.mark.parametrize("fast_path", ["1", "0"], ids=["fast-path", "stock-pika"])
def test_a_call_made_inside_a_span_carries_its_trace_to_the_worker_and_back(
    spans, traced_serve, queue, broker_url, fast_path
):
    out = traced_serve(workers=1, env={"FIBRPC_FAST_PATH": fast_path})
    tracer = trace.get_tracer("test")
    with (
        Client(broker_url, queue=queue, timeout=10) as client,
        tracer.start_as_current_span("handle order") as outer,
    ):
        assert client.call(30) == 832040
    (call_span,) = only(spans.get_finished_spans(), f"publish {queue}")
    (worker,) = worker_spans(out, 1)

    trace_id = outer.get_span_context().trace_id
    assert call_span.context.trace_id == trace_id
    assert call_span.parent is not None
    assert call_span.parent.span_id == outer.get_span_context().span_id
    assert call_span.kind is SpanKind.CLIENT
    assert call_span.status.status_code is StatusCode.UNSET
    corr_id = call_span.attributes["messaging.message.conversation_id"]
    assert dict(call_span.attributes) == {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": queue,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.rabbitmq.destination.routing_key": queue,
        "messaging.message.id": corr_id,
        "messaging.message.conversation_id": corr_id,
        "messaging.message.body.size": 2,
        "fibrpc.algo": "fast",
        "fibrpc.n": 30,
        "server.address": "127.0.0.1",
        "server.port": int(broker_url.rsplit(":", 1)[1].split("/")[0]),
    }

    # The worker's span is the child of the call's, in the caller's trace.
    assert worker["name"] == f"process {queue}"
    assert worker["kind"] == "SpanKind.CONSUMER"
    assert worker["context"]["trace_id"] == hex_id(trace_id, 32)
    assert worker["parent_id"] == hex_id(call_span.context.span_id, 16)
    assert worker["status"]["status_code"] == "UNSET"
    attributes = worker["attributes"]
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.destination.name"] == queue
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.operation.name"] == "process"
    assert attributes["messaging.rabbitmq.destination.routing_key"] == queue
    assert attributes["messaging.message.conversation_id"] == corr_id
    assert attributes["messaging.message.id"] == corr_id
    assert attributes["messaging.rabbitmq.message.delivery_tag"] == 1
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["fibrpc.outcome"] == "ok"
    assert attributes["fibrpc.algo"] == "fast"
    assert "messaging.batch.message_count" not in attributes
    assert worker["resource"]["attributes"]["service.name"] == "fibrpc"
    # ... and within the call's time.
    assert call_span.start_time is not None and call_span.end_time is not None
    assert worker["start_time"] >= _iso(call_span.start_time)
    assert worker["end_time"] <= _iso(call_span.end_time)


def _iso(ns: int) -> str:
    """A span time as the SDK's JSON writes it (comparable as text)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}Z"


def test_a_refused_request_is_an_error_with_its_code_on_both_sides(
    spans, traced_serve, queue, broker_url
):
    out = traced_serve(workers=1)
    with (
        Client(broker_url, queue=queue, timeout=10) as client,
        pytest.raises(RequestError) as refused,
    ):
        client.call(-1)
    assert refused.value.code == "negative"
    (call_span,) = only(spans.get_finished_spans(), f"publish {queue}")
    assert call_span.status.status_code is StatusCode.ERROR
    assert call_span.status.description is not None
    assert call_span.status.description.startswith("negative: n must be 0 or more")
    assert call_span.attributes["error.type"] == "negative"

    (worker,) = worker_spans(out, 1)
    assert worker["parent_id"] == hex_id(call_span.context.span_id, 16)
    assert worker["status"]["status_code"] == "ERROR"
    assert worker["status"]["description"].startswith("negative: n must be 0 or more")
    assert worker["attributes"]["error.type"] == "negative"
    assert worker["attributes"]["fibrpc.outcome"] == "negative"


def test_submit_and_map_are_producer_spans_and_batches_carry_their_size(
    spans, traced_serve, queue, broker_url
):
    out = traced_serve(workers=1)
    with Client(broker_url, queue=queue, timeout=10) as client:
        assert client.submit(20).result(10) == 6765
        assert client.map(range(50), batch_size=25)[-1] == 7778742049
    sent = only(spans.get_finished_spans(), f"publish {queue}")
    assert [s.kind for s in sent] == [SpanKind.PRODUCER] * 3
    assert "messaging.batch.message_count" not in sent[0].attributes
    assert sent[0].attributes["fibrpc.n"] == 20
    assert [s.attributes.get("messaging.batch.message_count") for s in sent[1:]] == [25, 25]

    workers = worker_spans(out, 3)
    by_parent = {w["parent_id"]: w for w in workers}
    for span in sent:
        worker = by_parent[hex_id(span.context.span_id, 16)]
        assert worker["context"]["trace_id"] == hex_id(span.context.trace_id, 32)
        assert worker["kind"] == "SpanKind.CONSUMER"
    assert sorted(w["attributes"].get("messaging.batch.message_count", 0) for w in workers) == [
        0,
        25,
        25,
    ]


def test_a_timeout_and_no_server_end_their_spans_with_the_error(spans, broker, queue, broker_url):
    broker.queue_declare(queue, durable=True)
    mute = broker.basic_consume(queue, lambda *args: None)  # takes requests, never answers
    with Client(broker_url, queue=queue, timeout=10) as client:
        with pytest.raises(CallTimeoutError):
            client.call(5, timeout=0.05)
        broker.basic_cancel(mute)  # now nobody consumes it
        with pytest.raises(NoServerError):
            client.call(5, timeout=2)
    timed_out, no_server = only(spans.get_finished_spans(), f"publish {queue}")
    assert timed_out.status.status_code is StatusCode.ERROR
    assert timed_out.attributes["error.type"] == "call_timeout"
    assert no_server.status.status_code is StatusCode.ERROR
    assert no_server.attributes["error.type"] == "no_server"


def test_error_codes_of_spans_are_wire_codes_or_the_errors_names():
    assert tracing.error_code(RequestError("out_of_range", "too big")) == "out_of_range"
    assert tracing.error_code(CallTimeoutError("late")) == "call_timeout"
    assert tracing.error_code(NoServerError("none")) == "no_server"
    assert tracing.error_code(ValueError("x")) == "value"


# -- without a provider, and without OpenTelemetry --------------------------------------------

#: Sends one call to a queue nobody consumes and prints the headers RabbitMQ holds for it:
#: with no provider set, then (unless OpenTelemetry is blocked) after one is set.
HEADERS_SCRIPT = """
import json, sys, time
import pika
{block}
import fibrpc
from fibrpc import Client, tracing

url, queue = sys.argv[1], sys.argv[2]
conn = pika.BlockingConnection(pika.URLParameters(url))
channel = conn.channel()
channel.queue_declare(queue, durable=True)

def sent_headers(client):
    client.submit(5, timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return props.headers
        time.sleep(0.02)
    raise SystemExit("the request never reached the queue")

report = {{}}
with Client(url, queue=queue, timeout=30) as client:
    report["tracer"] = tracing.tracer() is not None
    report["before"] = sent_headers(client)
    report["imported"] = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
    if {provide}:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        trace.set_tracer_provider(TracerProvider())  # set late: the next call sees it
        report["after"] = sent_headers(client)
conn.close()
print(json.dumps(report))
"""


def run_headers_script(
    url: str, queue: str, *, block: bool, provide: bool, fast_path: str = "1"
) -> dict[str, Any]:
    script = HEADERS_SCRIPT.format(
        block="sys.modules['opentelemetry'] = None" if block else "",
        provide=provide,
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), url, queue],
        capture_output=True,
        text=True,
        timeout=60,
        env={"FIBRPC_FAST_PATH": fast_path, "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("fast_path", ["1", "0"], ids=["fast-path", "stock-pika"])
def test_without_a_provider_no_header_is_added_and_one_set_later_is_picked_up(
    queue, broker_url, fast_path
):
    report = run_headers_script(broker_url, queue, block=False, provide=True, fast_path=fast_path)
    assert report["tracer"] is False
    assert set(report["before"]) == {"x-fibrpc-deadline"}
    assert report["imported"] == []  # fibrpc imported nothing of OpenTelemetry by itself
    after = report["after"]
    assert set(after) == {"x-fibrpc-deadline", "traceparent"}
    version, trace_id, span_id, flags = after["traceparent"].split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(flags, 16) & 1  # sampled (0x02 may be set too: a random trace id)


def test_fibrpc_works_with_opentelemetry_impossible_to_import(traced_serve, queue, broker_url):
    report = run_headers_script(broker_url, queue, block=True, provide=False)
    assert report == {
        "tracer": False,
        "before": {"x-fibrpc-deadline": report["before"]["x-fibrpc-deadline"]},
        "imported": ["opentelemetry"],  # the blocking entry itself, and nothing else
    }
    # and a whole round trip, against a server that traces
    traced_serve(workers=1)
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from fibrpc import Client\n"
        "with Client(sys.argv[1], queue=sys.argv[2], timeout=10) as c:\n"
        "    print(c.call(30), c.map(range(10))[-1])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, broker_url, queue],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "832040 34\n"


def test_the_global_provider_read_directly_is_the_one_the_api_returns():
    # fibrpc.tracing reads opentelemetry.trace._TRACER_PROVIDER rather than paying for
    # get_tracer_provider() on every call: the two must agree, unset and set.
    assert trace._TRACER_PROVIDER is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert tracing.tracer() is None
    provider = TracerProvider()
    trace.set_tracer_provider(provider)
    try:
        assert trace._TRACER_PROVIDER is provider is trace.get_tracer_provider()
        assert tracing.tracer() is not None
    finally:
        trace._TRACER_PROVIDER_SET_ONCE = Once()
        trace._TRACER_PROVIDER = None
    assert tracing.tracer() is None


def test_a_worker_told_of_an_exporter_no_package_offers_serves_untraced(monkeypatch, caplog):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    with caplog.at_level("WARNING", logger="fibrpc.tracing"):
        assert tracing.export_from_env() is None
    assert "no installed package offers that span exporter" in caplog.text
    assert "console" in caplog.text  # the ones that are installed are named
    assert trace._TRACER_PROVIDER is None


@pytest.mark.parametrize("value", ["", "none", " none "])
def test_a_worker_with_no_exporter_named_sets_nothing_up(monkeypatch, value):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    assert tracing.export_from_env() is None
    assert trace._TRACER_PROVIDER is None


class Exploding:
    """A span processor that fails: tracing must never cost a call."""

    def on_start(self, span, parent_context=None):
        raise RuntimeError("on_start")

    def on_end(self, span):
        raise RuntimeError("on_end")

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis=30000):
        return True


def test_a_failing_span_processor_costs_no_call_and_no_slot(
    spans, traced_serve, queue, broker_url, caplog
):
    traced_serve(workers=1)
    trace.get_tracer_provider().add_span_processor(Exploding())
    with (
        caplog.at_level("WARNING", logger="fibrpc.tracing"),
        Client(broker_url, queue=queue, timeout=10, window=2) as client,
    ):
        assert [client.call(n) for n in range(5)] == [0, 1, 1, 2, 3]
        with pytest.raises(RequestError):
            client.call(-1)
        assert client.map(range(10), batch_size=3)[-1] == 34
        assert client.in_flight == 0
    assert "the call goes on untraced (logged once)" in caplog.text


def test_the_asyncio_client_traces_its_calls_the_same_way(spans, traced_serve, queue, broker_url):
    out = traced_serve(workers=1)

    async def main():
        async with AsyncClient(broker_url, queue=queue, timeout=10) as client:
            with trace.get_tracer("test").start_as_current_span("async handler") as outer:
                assert await client.call(30) == 832040
            assert (await client.map(range(20), batch_size=10))[-1] == 4181
        return outer

    outer = asyncio.run(main())
    call_span, *batches = only(spans.get_finished_spans(), f"publish {queue}")
    assert call_span.kind is SpanKind.CLIENT
    assert call_span.parent is not None
    assert call_span.parent.span_id == outer.get_span_context().span_id
    assert [s.kind for s in batches] == [SpanKind.PRODUCER] * 2
    assert [s.attributes["messaging.batch.message_count"] for s in batches] == [10, 10]
    by_parent = {w["parent_id"]: w for w in worker_spans(out, 3)}
    for span in (call_span, *batches):
        worker = by_parent[hex_id(span.context.span_id, 16)]
        assert worker["context"]["trace_id"] == hex_id(span.context.trace_id, 32)
