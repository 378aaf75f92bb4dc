"""The broker's largest message: a reply or a request over RabbitMQ's ``max_message_size``
gets one clear error, and nothing else is harmed.

RabbitMQ 4 accepts messages of up to 16 MiB by default (3.x: 128 MiB), and closes the
channel of a publisher that goes over. fibrpc's default ``--max-reply-bytes`` (15 MiB)
keeps replies under 4.x's default; these tests run on a private node configured lower
(1 MiB), as a user's broker may be, of the broker under test's version.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import pytest
from conftest import start_private_node
from privatenode import PrivateNode
from rawclient import RawClient

from fibrpc import Client, RequestError
from fibrpc.errors import ErrorCode

LIMIT = 1 << 20


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with contextlib.ExitStack() as stack:
        yield start_private_node(stack, f"max_message_size = {LIMIT}\n", prefix="fibrpc-size")


@pytest.fixture
def broker_url(node: PrivateNode) -> str:
    return node.url()


def test_a_reply_the_broker_refuses_for_its_size_comes_back_as_reply_too_large_not_poison(
    serve, queue, broker_url
):
    # --max-deliveries 1: a request charged for its redelivery would be refused as poison.
    server = serve("--max-deliveries", "1", workers=1)
    pids = server.worker_pids()
    with Client(broker_url, queue=queue, timeout=30) as client:
        with pytest.raises(RequestError) as refused:
            client.call_text(10**7)  # 2.09 MB of digits: over the broker's 1 MiB
        assert refused.value.code == ErrorCode.REPLY_TOO_LARGE, refused.value
        assert f"{LIMIT:,} bytes (RabbitMQ's max_message_size at amqp://guest:***@" in str(
            refused.value
        )
        assert client.call(30) == 832040  # the worker keeps serving
        started = time.monotonic()
        with pytest.raises(RequestError) as again:
            client.call_text(6 * 10**6)  # 1.25 MB: refused now, before computing
        assert again.value.code == ErrorCode.REPLY_TOO_LARGE
        assert time.monotonic() - started < 1.0
        assert len(client.call_text(10**6)) == 208988  # under the limit: answered
    assert server.worker_pids() == pids
    text = server.text
    assert "poison" not in text and "refusing" not in text, text
    assert text.count("RabbitMQ refused a reply over its max_message_size of 1048576") == 1


def test_a_request_the_broker_refuses_for_its_size_fails_alone_and_the_others_are_answered(
    serve, queue, broker_url
):
    serve(workers=1)
    big = list(range(100_000, 300_000))  # about 1.4 MB of JSON
    with Client(broker_url, queue=queue, timeout=30) as client:
        slow = client.submit(29, algo="naive")  # in flight while the channel closes
        with pytest.raises(RequestError) as refused:
            client.map(big, batch_size=len(big))
        assert refused.value.code == ErrorCode.BODY_TOO_LARGE
        assert f"at most {LIMIT:,} bytes (RabbitMQ's max_message_size)" in str(refused.value)
        assert slow.result(30) == 514229
        started = time.monotonic()
        with pytest.raises(RequestError) as again:  # now checked before it is sent
            client.map(big, batch_size=len(big))
        assert again.value.code == ErrorCode.BODY_TOO_LARGE
        assert time.monotonic() - started < 0.5
        assert client.in_flight == 0
        assert client.map(range(91)) == [client.call(n) for n in range(91)]


def test_the_tutorial_form_is_refused_too_when_its_reply_is_too_large(serve, queue, broker_url):
    serve(workers=1)
    raw = RawClient(broker_url, queue)
    try:
        corr_id = raw.publish(b"10000000")
        props, body = raw.reply(corr_id)
        assert props.content_type == "application/json"
        assert json.loads(body)["error"]["code"] == ErrorCode.REPLY_TOO_LARGE
    finally:
        raw.close()
