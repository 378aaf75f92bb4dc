"""The client's promises, against the real broker: timeouts, no server, stray replies,
threads, closing. Stand-in servers here are bare pika consumers that misbehave on purpose."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gmpy2
import pika
import pytest
from conftest import URL, run_cli

from fibrpc import (
    AccessRefusedError,
    BrokerUnreachableError,
    CallTimeoutError,
    Client,
    ClientClosedError,
    ConfigError,
    FibrpcError,
    NoServerError,
    UnreadableReplyError,
)
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE
from fibrpc.protocol import to_ints


class StandIn:
    """A bare pika consumer on ``queue`` running ``on_request`` in a thread of its own."""

    def __init__(self, queue: str, on_request: Callable[..., None]) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(URL))
        self.channel = self.conn.channel()
        self.channel.queue_declare(queue, durable=True)
        self.channel.basic_consume(queue, on_request)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.conn.process_data_events(time_limit=0.05)
        self.conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def stand_in(queue: str) -> Iterator[Callable[[Callable[..., None]], StandIn]]:
    started: list[StandIn] = []

    def start(on_request: Callable[..., None]) -> StandIn:
        s = StandIn(queue, on_request)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _reply(ch: Any, props: Any, body: bytes) -> None:
    ch.basic_publish(
        "", props.reply_to, body, pika.BasicProperties(correlation_id=props.correlation_id)
    )


def test_a_call_with_no_server_fails_within_2_seconds_naming_queue_url_and_the_fix(queue, broker):
    broker.queue_declare(queue, durable=True)  # the queue exists, but nothing consumes it
    with Client(URL, queue=queue, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(NoServerError) as no_server:
            client.call(30)
        assert time.monotonic() - started < 2.0
    message = str(no_server.value)
    assert queue in message
    assert "guest:***@127.0.0.1" in message
    assert "fibrpc serve" in message
    assert "guest:guest" not in message


def test_a_call_to_a_queue_that_does_not_exist_fails_at_once(queue):
    with Client(URL, queue=queue) as client:
        started = time.monotonic()
        with pytest.raises(NoServerError, match="does not exist"):
            client.call(30)
        assert time.monotonic() - started < 2.0


def test_fibrpc_call_with_no_server_exits_5(queue, broker):
    broker.queue_declare(queue, durable=True)
    result = run_cli("call", "30", "--url", URL, "--queue", queue)
    assert result.returncode == ExitCode.NO_SERVER
    assert "fibrpc serve" in result.stderr


def test_a_call_past_its_timeout_raises_a_timeout_error(queue, stand_in):
    stand_in(lambda ch, method, props, body: None)  # takes requests, never answers
    with Client(URL, queue=queue) as client:
        started = time.monotonic()
        with pytest.raises(CallTimeoutError, match=r"within 0\.3 s") as timed_out:
            client.call(30, timeout=0.3)
        assert 0.25 < time.monotonic() - started < 1.5
        assert isinstance(timed_out.value, TimeoutError)
        assert client.in_flight == 0


def test_fibrpc_call_past_its_timeout_exits_4(queue, stand_in):
    stand_in(lambda ch, method, props, body: None)
    result = run_cli("call", "30", "--url", URL, "--queue", queue, "--timeout", "0.3")
    assert result.returncode == ExitCode.TIMEOUT, result.stderr
    assert "within 0.3 s" in result.stderr


def test_duplicate_and_unknown_replies_are_dropped_and_counted(queue, stand_in):
    def twice_and_a_stranger(ch, method, props, body):
        n = int(body)
        _reply(ch, props, str(FAST_TABLE[n]).encode())
        _reply(ch, props, b"999")  # a duplicate with a wrong value: must not be seen
        ch.basic_publish(
            "", props.reply_to, b"1", pika.BasicProperties(correlation_id="not-one-of-ours")
        )
        ch.basic_ack(method.delivery_tag)

    stand_in(twice_and_a_stranger)
    with Client(URL, queue=queue) as client:
        assert [client.call(n) for n in range(20)] == list(FAST_TABLE[:20])
        deadline = time.monotonic() + 5
        while (client.dropped_duplicates, client.dropped_unknown) < (20, 20) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert client.dropped_duplicates == 20
        assert client.dropped_unknown == 20


def test_many_threads_can_share_one_client(serve, queue):
    serve(workers=2)
    with Client(URL, queue=queue, window=32) as client:

        def work(seed: int) -> list[int]:
            return [client.call((seed * 7 + i) % 94, algo="iter") for i in range(100)]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(8)))
    for seed, got in enumerate(results):
        assert got == [FAST_TABLE[(seed * 7 + i) % 94] for i in range(100)]


def test_the_window_bounds_calls_in_flight(queue, stand_in):
    held: list[tuple[Any, Any]] = []
    stand_in(lambda ch, method, props, body: held.append((props, body)))
    with Client(URL, queue=queue, window=4, timeout=1.0) as client:
        futures = [client.submit(i) for i in range(4)]
        with pytest.raises(CallTimeoutError, match="window of 4"):
            client.submit(5, timeout=0.2)
        assert client.in_flight == 4
        for f in futures:
            with pytest.raises(CallTimeoutError):
                f.result(5)


def test_closing_the_client_fails_its_calls_in_flight(queue, stand_in):
    stand_in(lambda ch, method, props, body: None)
    client = Client(URL, queue=queue)
    future = client.submit(30)
    client.close()
    with pytest.raises(ClientClosedError):
        future.result(5)
    with pytest.raises(ClientClosedError):
        client.call(1)


def test_an_unreachable_broker_is_a_clear_error_and_exit_6():
    url = "amqp://guest:secret@127.0.0.1:1/%2F"
    with pytest.raises(BrokerUnreachableError) as unreachable:
        Client(url)
    assert "127.0.0.1:1" in str(unreachable.value)
    assert "secret" not in str(unreachable.value)
    result = run_cli("call", "3", "--url", url)
    assert result.returncode == ExitCode.BROKER_UNREACHABLE
    assert "secret" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.broker
def test_a_wrong_password_is_access_refused_and_exit_7():
    url = "amqp://guest:wrong-password@127.0.0.1:5672/%2F"
    with pytest.raises(AccessRefusedError) as refused:
        Client(url)
    assert "wrong-password" not in str(refused.value)
    result = run_cli("call", "3", "--url", url)
    assert result.returncode == ExitCode.ACCESS_REFUSED, result.stderr
    assert "wrong-password" not in result.stderr


def test_a_malformed_url_is_a_config_error_and_a_usage_error_on_the_command_line():
    with pytest.raises(ConfigError):
        Client("amqp://guest:guest@127.0.0.1:notaport/")
    result = run_cli("call", "3", "--url", "amqp://guest:guest@127.0.0.1:notaport/")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "amqp://guest:***@127.0.0.1" in result.stderr


def test_to_ints_converts_short_and_long_texts_alike() -> None:
    """Past Python's 4,300-digit limit ``int`` refuses a text; ``to_ints`` then converts
    every text of the batch through ``to_int`` (GMP for the long ones)."""
    texts = [str(gmpy2.fib(n)) for n in (0, 1, 90, 10**5, 7)]
    assert len(texts[3]) > 4300
    assert to_ints(texts) == [int(gmpy2.fib(n)) for n in (0, 1, 90, 10**5, 7)]
    assert to_ints(texts[:3]) == [0, 1, 2880067194370816120]
    with pytest.raises(ValueError):
        to_ints(["12", "x"])


def test_a_batch_answered_with_a_single_text_is_an_unreadable_reply(stand_in, queue):
    """A server that answers a batch with one text (``b"123"``) must not have the client
    read it as the batch [1, 2, 3]: a protocol error, not a refusal."""
    stand_in(lambda ch, method, props, body: _reply(ch, props, b"123"))
    with (
        Client(URL, queue=queue, timeout=10) as client,
        pytest.raises(UnreadableReplyError, match="list of results") as unreadable,
    ):
        client.map([1, 2, 3], batch_size=3)
    assert unreadable.value.queue == queue
    assert isinstance(unreadable.value.__cause__, TypeError)


def test_every_misuse_is_a_fibrpc_error_and_leaks_no_slot(queue, serve):
    """Each error path, more times than the window, then a call answered at once."""
    import numpy as np  # noqa: PLC0415 - numpy's integers are integers

    serve(workers=1)
    huge = 10**5000  # past Python's 4,300-digit str limit: sent by GMP, refused by bound
    with Client(URL, queue=queue, window=3, timeout=10) as client:
        for bad in (30.0, "30", None, True, [30], b"30", huge):
            for _ in range(4):
                with pytest.raises(FibrpcError) as refused:
                    client.call(bad)  # type: ignore[arg-type]
                assert not isinstance(refused.value, CallTimeoutError), bad
        for bad_timeout in (0, -1, float("nan"), "1"):
            for _ in range(4):
                with pytest.raises(ConfigError):
                    client.submit(30, timeout=bad_timeout)  # type: ignore[arg-type]
        with pytest.raises(FibrpcError):
            client.map([1, 2, "3"])  # type: ignore[list-item]
        assert client.in_flight == 0
        started = time.monotonic()
        assert client.call(30) == 832040
        assert time.monotonic() - started < 1.0
        assert client.call(np.int64(30)) == 832040  # type: ignore[arg-type]
        assert client.map(np.arange(5)) == [0, 1, 1, 2, 3]
        assert client.map(np.arange(5), batch_size=1) == [0, 1, 1, 2, 3]


def test_leaving_imap_early_frees_the_window_at_once(serve, queue):
    serve(workers=1)
    with Client(URL, queue=queue, window=4, timeout=30) as client:
        for value in client.imap(range(10_000), batch_size=10):
            assert value == 0
            break
        assert client.in_flight == 0
        started = time.monotonic()
        assert client.map(range(91)) == list(FAST_TABLE[:91])
        assert time.monotonic() - started < 2.0


def test_closing_what_imap_returns_abandons_its_calls_in_flight(queue, stand_in):
    answered: list[bytes] = []

    def first_only(ch, method, props, body):  # answers the first batch, holds the others
        if not answered:
            answered.append(body)
            results = json.dumps({"results": [str(FAST_TABLE[n]) for n in range(10)]})
            ch.basic_publish(
                "",
                props.reply_to,
                results.encode(),
                pika.BasicProperties(
                    correlation_id=props.correlation_id, content_type="application/json"
                ),
            )

    stand_in(first_only)
    with Client(URL, queue=queue, window=4, timeout=30) as client:
        values = client.imap(range(10_000), batch_size=10)
        assert [next(values), next(values)] == [0, 1]
        assert client.in_flight == 3
        values.close()
        assert client.in_flight == 0
