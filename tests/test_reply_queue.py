"""A reply queue of the client's own (``reply_queue="exclusive"``): a server-named,
exclusive queue declared on each connection instead of RabbitMQ's direct reply-to.

On a private node of the broker under test's version (the tests make users and close
connections with ``rabbitmqctl``): calls, batches and the asyncio client take their
replies there; the queue is the connection's only (another connection may not touch it,
and it is gone with the client); a lost connection gets a new queue, and the calls in
flight are re-sent carrying its name; the least-privilege user of docs/security.md for
this mode may use it, and a user without those permissions is told which to add.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from conftest import run_cli, start_private_node
from privatenode import PrivateNode

from fibrpc import Client
from fibrpc.aio import AsyncClient
from fibrpc.errors import AccessRefusedError, ConfigError
from fibrpc.exitcodes import ExitCode
from fibrpc.numbers import FAST_TABLE

#: The request queues of these tests (``serving.private_queue``'s names), in the write
#: pattern of docs/security.md's client users in place of ``rpc_queue``.
QUEUES = r"fibrpc-test-[0-9a-f]{10}"
#: docs/security.md's client user for ``--reply-queue exclusive``: configure, write, read.
EXCLUSIVE_CLIENT_PERMISSIONS = (r"^amq\.gen-.*", rf"^(amq\.default|{QUEUES})$", r"^amq\.gen-.*")


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with contextlib.ExitStack() as stack:
        yield start_private_node(stack, prefix="fibrpc-replyq")


@pytest.fixture
def broker_url(node: PrivateNode) -> str:
    """Every fixture of conftest (servers, queues, channels) on this module's node."""
    return node.url()


def _reply_to(client: Client | AsyncClient) -> str:
    driver = client._driver
    assert driver is not None
    reply_to: str = driver.link.reply_to  # type: ignore[attr-defined]
    return reply_to


def _declare_passive(url: str, name: str) -> int:
    """The reply code with which another connection's passive declare of ``name`` is
    refused (0: it is not)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        return int(exc.reply_code)
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    return 0


@pytest.mark.parametrize("bad", ["Direct", "queue", "", None, 1, True])
def test_a_reply_queue_that_is_not_direct_or_exclusive_is_a_config_error_naming_it(bad):
    for make in (Client, AsyncClient):
        with pytest.raises(ConfigError) as refused:
            make("amqp://guest:guest@127.0.0.1:1/%2F", reply_queue=bad)
        assert repr(bad) in str(refused.value) and "'exclusive'" in str(refused.value)


def test_calls_and_batches_come_back_on_an_exclusive_queue_of_the_clients_own(
    serve, queue, broker_url
):
    serve(workers=1)
    with Client(broker_url, queue=queue, timeout=30, reply_queue="exclusive") as client:
        name = _reply_to(client)
        assert name.startswith("amq.gen-")
        assert client.call(30) == 832040
        assert client.call_text(1000) == str(_fib(1000))
        assert client.map(range(91), batch_size=10) == list(FAST_TABLE[:91])
        assert [f.result(10) for f in [client.submit(n) for n in range(50)]] == list(
            FAST_TABLE[:50]
        )
        assert _declare_passive(broker_url, name) == 405  # RESOURCE_LOCKED: exclusive
        assert client.dropped_unknown == client.dropped_duplicates == 0
    assert _declare_passive(broker_url, name) == 404  # gone with the client's connection


def test_the_asyncio_client_takes_its_replies_on_a_queue_of_its_own(serve, queue, broker_url):
    serve(workers=1)

    async def main() -> tuple[str, int, list[int]]:
        async with AsyncClient(broker_url, queue=queue, reply_queue="exclusive") as client:
            return _reply_to(client), await client.call(40), await client.map(range(91))

    name, one, many = asyncio.run(main())
    assert name.startswith("amq.gen-")
    assert one == FAST_TABLE[40] and many == list(FAST_TABLE[:91])


def test_a_lost_connection_gets_a_new_queue_and_the_calls_in_flight_are_answered_there(
    serve, queue, broker_url, node
):
    serve(workers=1)
    ns = [32 + i % 2 for i in range(16)]  # naive: several seconds on one worker
    with Client(broker_url, queue=queue, timeout=60, reply_queue="exclusive") as client:
        before = _reply_to(client)
        futures = [client.submit(n, "naive") for n in ns]
        deadline = time.monotonic() + 30
        while not any(f.done() for f in futures):  # the server is at work on them
            assert time.monotonic() < deadline, "no answer in 30 s"
            time.sleep(0.05)
        listed = node.checked("list_connections", "pid", "client_properties", "--quiet")
        pids = [line.split("\t")[0] for line in listed.splitlines() if "fibrpc-client" in line]
        assert len(pids) == 1, listed
        assert not all(f.done() for f in futures)  # some are in flight when it closes
        node.checked("close_connection", pids[0], "closed by test_reply_queue")
        assert [f.result(60) for f in futures] == [FAST_TABLE[n] for n in ns]
        after = _reply_to(client)
        assert after.startswith("amq.gen-") and after != before
        assert client.call(30) == 832040
    assert _declare_passive(broker_url, before) == 404


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@pytest.fixture(scope="module")
def users(node: PrivateNode) -> dict[str, str]:
    """URLs of two users: ``exclusive`` with EXCLUSIVE_CLIENT_PERMISSIONS, ``direct`` with
    the direct reply-to client's (docs/security.md)."""
    urls = {}
    for role, permissions in [
        ("exclusive", EXCLUSIVE_CLIENT_PERMISSIONS),
        ("direct", ("^$", rf"^(amq\.default|{QUEUES})$", "^$")),
    ]:
        name, password = f"fibrpc-test-{role}", secrets.token_hex(12)
        node.checked("add_user", name, password)
        node.checked("set_permissions", "-p", "/", name, *permissions)
        urls[role] = node.url(name, password)
    return urls


def test_the_documented_user_for_an_exclusive_reply_queue_calls_and_cannot_take_requests(
    serve, queue, users
):
    serve(workers=1)
    url = users["exclusive"]
    result = run_cli("call", "30", "--url", url, "--queue", queue, "--reply-queue", "exclusive")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for operation in [
            lambda ch: ch.basic_get(queue),
            lambda ch: ch.basic_consume(queue, lambda *args: None),
            lambda ch: ch.queue_purge(queue),
            lambda ch: ch.queue_delete(queue),
            lambda ch: ch.queue_declare("amq.gen-mine", durable=True),  # reserved
        ]:
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                operation(connection.channel())
            assert refused.value.reply_code == 403, refused.value
    finally:
        connection.close()


def test_a_user_who_may_not_declare_its_reply_queue_is_told_the_permissions_to_add(queue, users):
    with pytest.raises(AccessRefusedError) as refused:
        Client(users["direct"], queue=queue, timeout=10, reply_queue="exclusive")
    message = str(refused.value)
    assert r"'^amq\.gen-.*'" in message and "reply_queue='direct'" in message
    result = run_cli(
        "call", "30", "--url", users["direct"], "--queue", queue, "--timeout", "10",
        env={"FIBRPC_REPLY_QUEUE": "exclusive"},
    )  # fmt: skip
    assert result.returncode == ExitCode.ACCESS_REFUSED, result.stderr
    assert "amq\\.gen-" in result.stderr


def test_fibrpc_bench_and_call_take_the_reply_queue_option(serve, queue, broker_url):
    serve(workers=1)
    result = run_cli(
        "bench", "--url", broker_url, "--queue", queue, "--scenario", "pipelined",
        "--calls", "300", "--reply-queue", "exclusive", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reply_queue"] == "exclusive"
    assert report["scenarios"][0]["errors"] == 0
    bad = run_cli("call", "30", "--url", broker_url, "--reply-queue", "mine")
    assert bad.returncode == ExitCode.USAGE, bad.stderr
    assert "'mine'" in bad.stderr
