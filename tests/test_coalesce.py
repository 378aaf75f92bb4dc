"""Coalesced calls against real servers (issue #23): each call of a shared message keeps
its own result or error, its own deadline, and its own charge when a worker dies; an older
server gets one message per call; many independent callers get their own answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from typing import Any

import pika
import pytest
from conftest import URL, run_cli
from rawclient import RawClient
from test_aio import run
from test_client import StandIn
from test_metrics import free_port, key, wait_for_scrape
from test_tracing import spans  # noqa: F401 - the in-memory span exporter fixture

from fibrpc import Client, RequestError, tracing
from fibrpc.aio import AsyncClient
from fibrpc.coalesce import CALLS
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE, fib_naive
from fibrpc.protocol import JSON


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _answers(raw: RawClient, corr_id: str) -> dict[str, dict[str, Any]]:
    props, body = raw.reply(corr_id)
    assert props.content_type == CALLS, body[:200]
    return {entry["id"]: entry for entry in json.loads(body)}


def test_a_bad_n_among_100_coalesced_calls_fails_only_itself(serve, queue):
    serve("--naive-max-n", "10", workers=1)
    # Through the wire as any client would send it: one call out of range.
    calls = [{"id": f"m.{i}", "n": i % 94, "algo": "iter"} for i in range(100)]
    calls[42] = {"id": "m.42", "n": 94, "algo": "iter"}
    raw = RawClient(URL, queue)
    try:
        raw.publish(json.dumps(calls).encode(), corr_id="m+", content_type=CALLS)
        answers = _answers(raw, "m+")
    finally:
        raw.close()
    assert len(answers) == 100
    assert answers["m.42"]["error"]["code"] == "out_of_range"
    for i in (*range(42), *range(43, 100)):
        assert answers[f"m.{i}"] == {"id": f"m.{i}", "result": str(FAST_TABLE[i % 94])}

    # Through fibrpc's asyncio client: naive(15) is light to the client, but above this
    # server's --naive-max-n, and shares its message with 99 others.
    async def main() -> list[Any]:
        async with AsyncClient(URL, queue=queue, timeout=30) as client:
            calls = [client.call(i % 90) for i in range(99)]
            calls.insert(50, client.call(15, algo="naive"))
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert client._driver is not None and client._driver.coalesced >= 1
            return results

    results = run(main)
    refused = results.pop(50)
    assert isinstance(refused, RequestError) and refused.code == "out_of_range"
    assert results == [FAST_TABLE[i % 90] for i in range(99)]


def test_an_expired_call_among_live_ones_is_skipped_alone(serve, queue):
    server = serve(workers=1)
    past = int(time.time() * 1000) - 60_000
    future = int(time.time() * 1000) + 60_000
    calls = [{"id": f"e.{i}", "n": i, "deadline": future, "ttl": 60_000} for i in range(10)]
    calls[3] = {"id": "e.3", "n": 3, "deadline": past, "ttl": 1}
    raw = RawClient(URL, queue)
    try:
        raw.publish(json.dumps(calls).encode(), corr_id="e+", content_type=CALLS)
        answers = _answers(raw, "e+")
        raw.settle(0.3)
        assert "e.3" not in raw.replies  # not answered alone either
    finally:
        raw.close()
    assert sorted(answers) == sorted(f"e.{i}" for i in range(10) if i != 3)
    assert all(answers[f"e.{i}"]["result"] == str(FAST_TABLE[i]) for i in range(10) if i != 3)
    server.wait_for_log("(1 in all)", timeout=10)  # skipped 1 request(s) ... (1 in all)


def test_a_heavy_call_is_answered_alone_under_its_own_id_and_never_delays_its_neighbours(
    serve, queue
):
    serve("--naive-max-n", "34", workers=1)
    calls = [{"id": "h.heavy", "n": 32, "algo": "naive"}]
    calls += [{"id": f"h.{i}", "n": i} for i in range(20)]
    raw = RawClient(URL, queue)
    try:
        raw.publish(json.dumps(calls).encode(), corr_id="h+", content_type=CALLS)
        answers = _answers(raw, "h+")
        assert "h.heavy" not in raw.replies  # the light ones came first, without it
        props, body = raw.reply("h.heavy", timeout=30)
    finally:
        raw.close()
    assert sorted(answers) == sorted(f"h.{i}" for i in range(20))
    assert props.content_type == JSON
    assert json.loads(body) == {"result": str(fib_naive(32))}


def test_a_coalesced_message_whose_worker_is_killed_three_times_charges_only_the_killer(
    serve, queue
):
    """The killer, naive(36), is heavy: split out of the message at once, its 99
    neighbours answered; it alone is computed when the worker is killed, three times,
    and refused as poison after the fourth delivery."""
    server = serve("--naive-max-n", "38", workers=1)
    calls = [{"id": "k.killer", "n": 36, "algo": "naive"}]
    calls += [{"id": f"k.{i}", "n": i % 90} for i in range(99)]
    raw = RawClient(URL, queue)
    try:
        raw.publish(json.dumps(calls).encode(), corr_id="k+", content_type=CALLS)
        answers = _answers(raw, "k+")
        for kill in range(3):
            _wait_for(lambda k=kill: server.text.count("consuming") >= k + 1, 15, "a worker")
            time.sleep(0.5)  # the killer is being computed (about 1.5 s)
            [worker] = server.worker_pids()
            os.kill(worker, signal.SIGKILL)
            _wait_for(lambda w=worker: server.worker_pids() not in ([], [w]), 5, "a respawn")
        _, body = raw.reply("k.killer", timeout=60)
    finally:
        raw.close()
    assert sorted(answers) == sorted(f"k.{i}" for i in range(99))
    assert all(answers[f"k.{i}"]["result"] == str(FAST_TABLE[i % 90]) for i in range(99))
    error = json.loads(body)["error"]
    assert error["code"] == "poison" and "delivered 4 times" in error["message"]
    server.wait_for_log("refusing", timeout=5)
    assert server.text.count("refusing") == 1, server.text


def test_a_coalesced_message_computing_when_its_worker_died_comes_back_one_message_a_call(
    serve, queue
):
    """600 naive(22): light alone, heavy together, so computed as a whole off the I/O
    thread (a second or more). The worker is killed meanwhile: the message is a suspect
    when it comes back, and is split, each call answered alone under its own id; none is
    refused (none kills again)."""
    server = serve(workers=1)
    calls = [{"id": f"s.{i}", "n": 22, "algo": "naive"} for i in range(600)]
    raw = RawClient(URL, queue)
    try:
        raw.publish(json.dumps(calls).encode(), corr_id="s+", content_type=CALLS)
        time.sleep(0.3)
        [worker] = server.worker_pids()
        os.kill(worker, signal.SIGKILL)
        raw.wait(600, timeout=120)
        raw.settle(0.3)
    finally:
        raw.close()
    assert "s+" not in raw.replies, "answered before the kill: the test did not test"
    assert sorted(raw.replies) == sorted(f"s.{i}" for i in range(600))
    for corr_id, replies in raw.replies.items():
        assert len(replies) == 1, corr_id
        assert json.loads(replies[0][1]) == {"result": str(fib_naive(22))}
    server.wait_for_log("splitting its 600 call(s) into a message each", timeout=5)


def test_an_older_server_gets_one_message_per_call(queue):
    """A stand-in that refuses the coalesced form with unsupported_content_type (as
    fibrpc did before it): every call of the refused message comes again alone, and so
    does every later call."""
    seen: list[str | None] = []

    def older_server(ch: Any, method: Any, props: Any, body: bytes) -> None:
        seen.append(props.content_type)
        if props.content_type == CALLS:
            reply = b'{"error": {"code": "unsupported_content_type", "message": "no"}}'
            content_type = JSON
        else:
            reply, content_type = str(FAST_TABLE[int(body)]).encode(), "text/plain"
        ch.basic_publish(
            "",
            props.reply_to,
            reply,
            pika.BasicProperties(correlation_id=props.correlation_id, content_type=content_type),
        )
        ch.basic_ack(method.delivery_tag)

    server = StandIn(queue, older_server)
    try:

        async def main() -> tuple[list[int], list[int]]:
            async with AsyncClient(URL, queue=queue, timeout=20) as client:
                first = await asyncio.gather(*(client.call(n) for n in range(50)))
                later = await asyncio.gather(*(client.call(n) for n in range(50, 60)))
                assert client._driver is not None and not client._driver.coalescing
                return first, later

        first, later = run(main)
    finally:
        server.close()
    assert first == list(FAST_TABLE[:50]) and later == list(FAST_TABLE[50:60])
    assert seen.count(CALLS) == 1, seen  # the first, refused; none after it
    assert seen.count(None) == 60  # every call again alone, each in the text form


def test_2000_concurrent_asyncio_calls_and_32_threads_each_get_their_own_result(serve, queue):
    serve(workers=2)

    async def main() -> tuple[list[int], int]:
        async with AsyncClient(URL, queue=queue, timeout=60) as client:
            results = await asyncio.gather(*(client.call(i % 91) for i in range(2000)))
            assert client.in_flight == 0
            assert client._driver is not None
            return results, client._driver.coalesced

    results, coalesced = run(main)
    assert results == [FAST_TABLE[i % 91] for i in range(2000)]
    assert coalesced >= 1  # they did share messages

    errors: list[BaseException] = []
    got: dict[int, list[int]] = {}
    with Client(URL, queue=queue, timeout=60) as client:

        def caller(k: int) -> None:
            try:
                got[k] = [client.call((k + i) % 91, algo="iter") for i in range(100)]
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert client.in_flight == 0
    assert not errors, errors[:3]
    assert all(not thread.is_alive() for thread in threads)
    for k in range(32):
        assert got[k] == [FAST_TABLE[(k + i) % 91] for i in range(100)], k


def test_each_coalesced_call_has_its_own_span_naming_the_message_it_travelled_in(
    spans,  # noqa: F811 - the fixture imported from test_tracing
    serve,
    queue,
):
    serve(workers=1)

    async def main() -> list[int]:
        async with AsyncClient(URL, queue=queue, timeout=30) as client:
            return await asyncio.gather(*(client.call(n) for n in range(10)))

    assert run(main) == list(FAST_TABLE[:10])
    finished = [s for s in spans.get_finished_spans() if s.name == f"publish {queue}"]
    assert len(finished) == 10
    conversations = {s.attributes[tracing.CONVERSATION_ID] for s in finished}
    assert len(conversations) == 10  # each call its own id
    messages = {s.attributes[tracing.MESSAGE_ID] for s in finished}
    assert len(messages) == 1  # all in one message, named on every span
    [message] = messages
    assert str(message).endswith("+") and message not in conversations
    assert all(s.attributes[tracing.COALESCED] == 10 for s in finished)
    assert sorted(s.attributes[tracing.N] for s in finished) == list(range(10))


@pytest.mark.broker
def test_bench_measures_independent_callers_with_every_result_checked() -> None:
    result = run_cli(
        *("bench", "--spawn", "1", "--calls", "3000", "--json", "--url", URL),
        *("--scenario", "tasks", "--scenario", "threads"),
        timeout=180,
    )
    assert result.returncode == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert [s["name"] for s in doc["scenarios"]] == ["tasks", "threads"]
    for scenario in doc["scenarios"]:
        assert scenario["calls"] == 3000 and scenario["errors"] == 0
        assert 0 < scenario["p50_ms"] <= scenario["p99_ms"]


def test_the_servers_metrics_count_each_coalesced_call_by_its_own_outcome(serve, queue):
    port = free_port()
    serve("--metrics-port", str(port), workers=1)
    past = int(time.time() * 1000) - 60_000
    calls = [{"id": f"x.{i}", "n": i} for i in range(9)]
    calls += [{"id": "x.bad", "n": 94, "algo": "iter"}]
    calls += [{"id": "x.late", "n": 5, "algo": "iter", "deadline": past, "ttl": 1}]
    raw = RawClient(URL, queue)
    try:
        raw.publish(json.dumps(calls).encode(), corr_id="x+", content_type=CALLS)
        assert len(_answers(raw, "x+")) == 10
    finally:
        raw.close()
    wait_for_scrape(
        port,
        {
            key("fibrpc_requests_total", algo="fast", outcome="ok"): 9,
            key("fibrpc_requests_total", algo="unknown", outcome="out_of_range"): 1,
            key("fibrpc_requests_total", algo="iter", outcome="expired"): 1,
            key("fibrpc_deadline_skips_total"): 1,
        },
    )
