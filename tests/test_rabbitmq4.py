"""fibrpc on RabbitMQ 4.x: every deprecated feature denied (as later releases will by
default; 4.3.6 still permits ``transient_nonexcl_queues``), 16 MiB messages, quorum queues
that count deliveries and drop a message after 20 of them, and what 4.3 changed in that
count.

These tests always run on a RabbitMQ 4.x node: the session's when the broker under test is
one (``FIBRPC_TEST_BROKER=trixie`` or ``sid``), else a private trixie node of this module's
own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import conftest
import pika
import pika.exceptions
import pytest
from conftest import connect, rabbitmq_version, run_cli, start_server
from privatenode import PrivateNode, deny_deprecated, private_node
from rawclient import RawClient
from tutorial_client import FibonacciRpcClient

from fibrpc import Client, RequestError
from fibrpc.errors import ErrorCode
from fibrpc.exitcodes import ExitCode
from fibrpc.numbers import FAST_TABLE

#: Every test here talks to a private RabbitMQ node.
pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def rabbitmq4_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNode]:
    """A RabbitMQ 4 node with every deprecated feature denied."""
    if conftest.SESSION_NODE is not None:
        yield conftest.SESSION_NODE
        return
    root = tmp_path_factory.mktemp("rabbitmq4")
    config = deny_deprecated("trixie")
    with private_node(root / "node", config, prefix="fibrpc-4", version="trixie") as node:
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


def test_the_node_denies_every_deprecated_feature_it_knows(rabbitmq4_node):
    """Each line's list in ``privatenode`` names every deprecated feature its RabbitMQ
    lists: a newer sid with a new one fails here until it is added."""
    listed = rabbitmq4_node.checked("list_deprecated_features", "--formatter", "json", "-q")
    names = {feature["name"] for feature in json.loads(listed)}
    for name in sorted(names):
        permitted = rabbitmq4_node.checked(
            "eval", f"rabbit_deprecated_features:is_permitted({name})."
        )
        # The answer is one line among the node's own log lines, before or after it.
        answers = {line.strip() for line in permitted.splitlines()} & {"true", "false"}
        assert answers == {"false"}, (name, permitted)


def test_the_node_refuses_the_tutorials_transient_queue(rabbitmq4):
    """What the tutorial's server declares is refused here: the node is configured as
    later RabbitMQ releases will ship."""
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


def test_a_batch_reply_of_19_mb_is_refused_as_reply_too_large_before_computing(
    serve, queue, rabbitmq4
):
    serve(workers=1)
    with Client(rabbitmq4, queue=queue) as client:
        started = time.monotonic()
        with pytest.raises(RequestError) as refused:
            # A batch asks for binary results: 1,100 x F(200000), 17,356 bytes each.
            client.map([200_000] * 1_100, batch_size=1_100)
        assert refused.value.code == ErrorCode.REPLY_TOO_LARGE, refused.value
        assert "15,728,640 bytes (the server's --max-reply-bytes)" in str(refused.value)
        assert time.monotonic() - started < 2.0  # not computed: 1,100 x F(200000) is not free


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


_HOLDER = """
import sys, time, pika
conn = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
channel = conn.channel()
for _ in range(200):
    method, props, body = channel.basic_get(sys.argv[2])
    if method is not None:
        print(method.redelivered, (props.headers or {}).get("x-delivery-count", 0), flush=True)
        break
    time.sleep(0.05)
time.sleep(120)
"""


def test_a_quorum_queue_counts_a_killed_consumers_delivery_and_a_nack_only_before_4_3(
    broker, queue, rabbitmq4, rabbitmq4_node
):
    """fibrpc's poison containment reads a redelivery by the ``redelivered`` flag or
    ``x-delivery-count``, and counts the deliveries of a suspect itself. What a quorum
    queue counts: a consumer killed (``kill -9``) holding a message charges it one
    delivery on every 4.x line, so the broker's delivery limit (20) still ends a crash
    loop that fibrpc's own count would not; a ``basic.nack`` with requeue charges it one
    on 4.0, and none on 4.3, which counts it in ``x-acquired-count`` instead; a
    ``basic.reject`` with requeue charges one everywhere."""
    broker.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    broker.basic_publish("", queue, b"30")
    seen = []
    for _ in range(3):
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, rabbitmq4, queue],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            seen.append(holder.stdout.readline().split() if holder.stdout else [])
        finally:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
            if holder.stdout:
                holder.stdout.close()
    assert seen == [["False", "0"], ["True", "1"], ["True", "2"]]
    method = None
    for _ in range(100):  # the broker returns the last holder's message a moment later
        method, props, _ = broker.basic_get(queue)
        if method is not None:
            break
        time.sleep(0.05)
    assert method is not None and method.redelivered
    assert props.headers["x-delivery-count"] == 3
    broker.basic_nack(method.delivery_tag, requeue=True)
    method, props, _ = broker.basic_get(queue)
    assert method is not None and method.redelivered
    counted = props.headers["x-delivery-count"]
    if rabbitmq_version(rabbitmq4_node.server_version()) >= (4, 3):
        assert counted == 3, props.headers
        assert props.headers["x-acquired-count"] == 4, props.headers
    else:
        assert counted == 4, props.headers
        assert "x-acquired-count" not in props.headers, props.headers
    # A basic.reject with requeue (pika's answer to a delivery for a cancelled consumer)
    # is a delivery on every line.
    broker.basic_reject(method.delivery_tag, requeue=True)
    method, props, _ = broker.basic_get(queue, auto_ack=True)
    assert method is not None and props.headers["x-delivery-count"] == counted + 1


def test_a_computation_longer_than_a_quorum_queue_s_consumer_timeout_is_computed_once(
    serve, queue, rabbitmq4, rabbitmq4_node
):
    """From 4.3 a quorum queue cancels the consumer of a delivery held past its
    ``consumer-timeout`` and delivers it again, every timeout, for as long as it is
    computed. Each redelivery joins the computation under way: one computation answers
    the call and is acked (before: each redelivery queued another computation of it)."""
    if rabbitmq_version(rabbitmq4_node.server_version()) < (4, 3):
        pytest.skip(
            "RabbitMQ 4.0 checks consumer timeouts once a minute (it closes the channel); "
            "measured by hand, docs/operations.md"
        )
    policy = f"fibrpc-test-timeout-{queue}"
    rabbitmq4_node.checked(
        "set_policy", "--apply-to", "queues", policy, f"^{queue}$", '{"consumer-timeout":1000}'
    )
    try:
        server = serve("--queue-type", "quorum", "--naive-max-n", "45", workers=1)
        n = 36  # a few seconds of naive recursion: longer than the timeout
        with Client(rabbitmq4, queue=queue, timeout=90) as client:
            assert client.call(n, algo="naive") == FAST_TABLE[n]
        server.stop()
    finally:
        rabbitmq4_node.checked("clear_policy", policy)
    text = server.text
    held = [int(k) for k in re.findall(r"declaring it again, (\d+) request\(s\) still held", text)]
    assert held, text[-3000:]  # the timeout did cancel the consumer
    assert max(held) == 1, text[-3000:]  # no second computation of it was queued
    assert "came back while this worker still computes it" in text, text[-3000:]
    assert "served=1," in text, text[-3000:]  # answered once
