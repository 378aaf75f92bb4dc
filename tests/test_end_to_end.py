"""The core, end to end: a real ``fibrpc serve``, the real broker, and three kinds of client
(the ``fibrpc`` command, ``fibrpc.Client``, and the tutorial's own client)."""

from __future__ import annotations

import json
import os
import signal
import time

import gmpy2
import pytest
from conftest import URL, run_cli
from rawclient import RawClient
from tutorial_client import FibonacciRpcClient

from fibrpc import Client, RequestError
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE, fib_naive


def test_fibrpc_call_30_prints_832040_from_a_two_worker_server(serve, queue):
    serve(workers=2)
    result = run_cli("call", "30", "--url", URL, "--queue", queue)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"


@pytest.mark.parametrize("algo", ["naive", "iter", "fast"])
def test_fibrpc_call_gives_the_same_answer_with_every_algorithm(serve, queue, algo):
    serve(workers=1)
    result = run_cli("call", "30", "--algo", algo, "--url", URL, "--queue", queue, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["result"] == "832040"
    assert doc["n"] == 30
    assert doc["algo"] == algo
    assert doc["seconds"] > 0


def test_fibrpc_call_of_a_million_prints_all_208988_digits(serve, queue):
    serve(workers=1)
    result = run_cli("call", "1000000", "--url", URL, "--queue", queue)
    assert result.returncode == 0, result.stderr
    digits = result.stdout.strip()
    assert len(digits) == 208_988
    assert gmpy2.mpz(digits) == gmpy2.fib(1_000_000)


def test_the_tutorials_own_client_gets_correct_answers(serve, queue):
    serve(workers=2)
    client = FibonacciRpcClient(URL, queue)
    try:
        for n in [0, 1, 2, 10, 30, 90, 93, 94, 200]:
            assert client.call(n) == int(gmpy2.fib(n))
    finally:
        client.close()


def test_a_refused_call_exits_3_and_says_why_on_stderr(serve, queue):
    serve(workers=1)
    result = run_cli("call", "94", "--algo", "iter", "--url", URL, "--queue", queue)
    assert result.returncode == ExitCode.REQUEST_REFUSED
    assert result.stdout == ""
    assert "94" in result.stderr
    assert "93" in result.stderr
    assert "fast" in result.stderr


BAD_INPUTS = [
    (b"abc", {}, "malformed"),
    (b"-5", {}, "negative"),
    (b"3.5", {}, "not_an_integer"),
    (b"36", {"type": "naive"}, "out_of_range"),
    (b"94", {"type": "iter"}, "out_of_range"),
    (b"10000001", {}, "out_of_range"),
    (b"9" * 5000, {}, "out_of_range"),
    (b"30", {"type": "bogus"}, "unknown_algorithm"),
    (b"{", {"content_type": "application/json"}, "malformed"),
    (b'{"n": 1.5}', {"content_type": "application/json"}, "not_an_integer"),
    (b'{"n": -1}', {"content_type": "application/json"}, "negative"),
    (b'{"n": 30, "algo": "x"}', {"content_type": "application/json"}, "unknown_algorithm"),
    (b'{"n": [1, 2, 94], "algo": "iter"}', {"content_type": "application/json"}, "out_of_range"),
    (
        json.dumps({"n": list(range(90)) * 2000}).encode(),
        {"content_type": "application/json"},
        "batch_too_large",
    ),
    (b"1" * (2 << 20), {}, "body_too_large"),
    (b"30", {"content_type": "application/xml"}, "unsupported_content_type"),
]


def test_every_bad_input_gets_an_error_reply_and_the_server_keeps_answering(serve, queue, broker):
    server = serve(workers=2)
    raw = RawClient(URL, queue)
    try:
        ids = [(raw.publish(body, **props), code) for body, props, code in BAD_INPUTS]
        good = raw.publish(b"30")
        for corr_id, code in ids:
            assert raw.error_code(corr_id) == code, raw.replies[corr_id]
            _props, body = raw.reply(corr_id)
            message = json.loads(body)["error"]["message"]
            assert message.endswith(".") and len(message) > 20
        assert raw.reply(good)[1] == b"832040"
        raw.settle(0.3)
        assert all(len(r) == 1 for r in raw.replies.values()), "a request was answered twice"
    finally:
        raw.close()
    assert broker.queue_declare(queue, passive=True).method.message_count == 0
    assert "died" not in server.text


def test_a_message_without_reply_to_is_dropped_and_not_requeued(serve, queue, broker):
    server = serve(workers=1)
    raw = RawClient(URL, queue)
    try:
        raw.publish(b"30", reply=False)
        good = raw.publish(b"31")
        assert raw.reply(good)[1] == b"1346269"
    finally:
        raw.close()
    server.wait_for_log("dropped a message with no usable reply_to", timeout=5)
    assert broker.queue_declare(queue, passive=True).method.message_count == 0


def test_the_client_calls_submits_and_maps_against_a_real_server(serve, queue):
    serve(workers=2)
    with Client(URL, queue=queue, timeout=20) as client:
        assert client.call(30) == 832040
        assert client.call(25, algo="naive") == fib_naive(25)
        assert client.call(93, algo="iter") == FAST_TABLE[93]
        futures = [client.submit(n % 94, algo="iter") for n in range(500)]
        assert [f.result(20) for f in futures] == [FAST_TABLE[n % 94] for n in range(500)]
        ns = [n % 91 for n in range(5000)]
        assert client.map(ns) == [FAST_TABLE[n] for n in ns]
        assert client.map(ns, algo="iter", batch_size=7) == [FAST_TABLE[n] for n in ns]
        assert client.map([10**5, 3, 10**5 + 1]) == [
            int(gmpy2.fib(10**5)),
            2,
            int(gmpy2.fib(10**5 + 1)),
        ]
        assert client.map([]) == []
        assert client.in_flight == 0


def test_a_server_error_reply_raises_a_typed_error_with_its_code(fibrpc_client):
    # fibrpc_client: the pytest plugin's (fibrpc.pytest_plugin), as applications use it
    client = fibrpc_client
    with pytest.raises(RequestError) as refused:
        client.call(94, algo="iter")
    assert refused.value.code == "out_of_range"
    with pytest.raises(RequestError) as refused:
        client.map([1, 2, -3])
    assert refused.value.code == "negative"
    assert "Batch member 2" in refused.value.message
    assert client.call(10) == 55  # the client is still usable


def test_supervisor_ctrl_c_leaves_no_orphan_workers(serve, queue):
    server = serve(workers=2)
    workers = server.worker_pids()
    assert len(workers) == 2
    os.killpg(server.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert server.proc.wait(30) == 0
    _assert_gone(workers)


def test_killing_the_supervisor_takes_its_workers_with_it(serve, queue):
    server = serve(workers=2)
    workers = server.worker_pids()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    _assert_gone(workers)


def _assert_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    assert not alive, f"orphan workers still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
