"""fibrpc on RabbitMQ 4 as it ships today: every deprecated feature denied (RabbitMQ 4.3
denies ``transient_nonexcl_queues`` by default), 16 MiB messages, quorum queues that count
deliveries and drop a message after 20 of them.

These tests always run on a RabbitMQ 4 node: the session's when the broker under test is
one (``FIBRPC_TEST_BROKER=rabbitmq4``), else a private node of this module's own.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import conftest
import pika
import pika.exceptions
import pytest
from conftest import connect, run_cli, start_server
from privatenode import DENY_DEPRECATED, PrivateNode, private_node
from rawclient import RawClient
from tutorial_client import FibonacciRpcClient

from fibrpc import Client, RequestError
from fibrpc.errors import ErrorCode
from fibrpc.exitcodes import ExitCode

#: Every test here talks to a private RabbitMQ node.
pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def rabbitmq4_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNode]:
    """A RabbitMQ 4 node with every deprecated feature denied."""
    if conftest.SESSION_NODE is not None:
        yield conftest.SESSION_NODE
        return
    root = tmp_path_factory.mktemp("rabbitmq4")
    with private_node(root / "node", DENY_DEPRECATED, prefix="fibrpc-4", version="4") as node:
        yield node


@pytest.fixture(scope="module")
def rabbitmq4(rabbitmq4_node: PrivateNode) -> str:
    """Its URL."""
    return rabbitmq4_node.url()


def test_the_node_is_rabbitmq_4_and_keeps_the_consumer_timeout_fibrpc_relies_on(
    rabbitmq4_node,
):
    """A delivery left unacked past ``consumer_timeout`` closes its channel. fibrpc's
    longest computation is seconds (naive(35), F(10^7)), far under the default of 30 min,
    which RabbitMQ 4 keeps."""
    status = rabbitmq4_node.ctl("status")
    assert "RabbitMQ version: 4." in status.stdout, status.stdout[:2000]
    timeout = rabbitmq4_node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    assert timeout.stdout.strip() == "{ok,1800000}", timeout.stdout + timeout.stderr


@pytest.fixture
def broker_url(rabbitmq4: str) -> str:
    return rabbitmq4


@pytest.fixture
def default_queue(rabbitmq4: str) -> Iterator[str]:
    """``rpc_queue`` itself, on the RabbitMQ 4 node: deleted before and after."""
    conn = connect(rabbitmq4)
    try:
        conn.channel().queue_delete("rpc_queue")
        yield "rpc_queue"
        conn.channel().queue_delete("rpc_queue")
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def test_the_node_denies_deprecated_features_as_rabbitmq_4_3_does(rabbitmq4):
    """What the tutorial's server declares is refused here: the node is configured as
    today's RabbitMQ ships."""
    conn = connect(rabbitmq4)
    try:
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            conn.channel().queue_declare("fibrpc-test-transient")
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    assert closed.value.reply_code == 541
    assert "transient_nonexcl_queues" in closed.value.reply_text


def test_serve_with_its_defaults_is_ready_and_answers_fibrpc_call_and_the_tutorial(
    rabbitmq4, default_queue, tmp_path
):
    server = start_server(default_queue, tmp_path, workers=2, url=rabbitmq4)
    try:
        result = run_cli("call", "30", "--url", rabbitmq4)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "832040\n"
        tutorial = FibonacciRpcClient(rabbitmq4)  # declares only its exclusive reply queue
        try:
            assert tutorial.call(30) == 832040
        finally:
            tutorial.close()
        assert "INTERNAL_ERROR" not in server.text and "Cannot connect" not in server.text
    finally:
        assert server.stop() == 0


def test_a_batch_reply_of_18_8_mb_is_refused_as_reply_too_large_before_computing(
    serve, queue, rabbitmq4
):
    serve(workers=1)
    with Client(rabbitmq4, queue=queue) as client:
        started = time.monotonic()
        with pytest.raises(RequestError) as refused:
            client.map([100_000] * 900, batch_size=900)
        assert refused.value.code == ErrorCode.REPLY_TOO_LARGE, refused.value
        assert "15,728,640 bytes (the server's --max-reply-bytes)" in str(refused.value)
        assert time.monotonic() - started < 2.0  # not computed: 900 x F(100000) is not free


def test_a_queue_of_the_name_in_another_form_is_refused_by_name_within_seconds(
    rabbitmq4, default_queue
):
    conn = connect(rabbitmq4)
    try:
        conn.channel().queue_declare(
            default_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
    finally:
        conn.close()
    started = time.monotonic()
    result = run_cli("serve", "--url", rabbitmq4, "--workers", "1", timeout=30)
    assert result.returncode == ExitCode.BROKER_REFUSED, result.stderr
    assert time.monotonic() - started < 10
    last = result.stderr.strip().splitlines()[-1]
    assert "Queue 'rpc_queue' already exists as a quorum queue" in last, last
    assert "--queue-type quorum" in last
    assert "Cannot connect" not in result.stderr


def test_a_request_past_its_ttl_is_dropped_by_the_broker(broker, queue):
    """Each call's deadline rides as a per-message TTL, which RabbitMQ 4 still honours on
    classic and quorum queues alike."""
    for kind in ("classic", "quorum"):
        name = f"{queue}-{kind}"
        broker.queue_declare(name, durable=True, arguments={"x-queue-type": kind})
        try:
            broker.basic_publish("", name, b"30", pika.BasicProperties(expiration="100"))
            broker.basic_publish("", name, b"31")
            time.sleep(0.5)
            _, _, body = broker.basic_get(name, auto_ack=True)
            assert body == b"31", kind
            assert broker.queue_declare(name, passive=True).method.message_count == 0
        finally:
            broker.queue_delete(name)


def test_direct_reply_to_carries_the_tutorial_form_reply(serve, queue, rabbitmq4):
    serve(workers=1)
    raw = RawClient(rabbitmq4, queue)
    try:
        corr_id = raw.publish(b"30")
        _, body = raw.reply(corr_id)
        assert body == b"832040"
        corr_id = raw.publish(b"-1")
        _, body = raw.reply(corr_id)
        assert json.loads(body)["error"]["code"] == ErrorCode.NEGATIVE
    finally:
        raw.close()
