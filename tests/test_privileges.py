"""Least privilege: a server user and a client user whose permissions cover only what each
needs (docs/security.md, "Least privilege"), and nothing more, on every broker line.

What each needs, found by trying on 3.10.8, 4.0.5 and 4.3.6 (RabbitMQ checks the default
exchange as ``amq.default``):

- server: configure the request queue (declare it), read it (consume, ack), write
  ``amq.default`` (replies to ``amq.rabbitmq.reply-to.*`` and re-published redeliveries).
- client: write ``amq.default`` (requests), and write on the request queue: since
  RabbitMQ 4.2.6 and 4.3.0 the passive declare that counts the queue's consumers (the
  no-server check, ``fibrpc status``) needs some permission on the queue (PR #16085, #16272
  relaxed it to any of the three). Read would let it take and purge requests, configure
  delete and declare the queue; write on a queue lets a user bind it, but only to an
  exchange it may also read, and it may read none. Before 4.2.6 the passive declare
  needs no permission, and the write on the queue is unused. Consuming direct reply-to
  needs none anywhere.

The users are made with ``rabbitmqctl`` on a private node of this module's own (of the
broker under test's version): no test changes the users of the local broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator

import pika
import pika.exceptions
import pytest
from conftest import delete_queue, rabbitmq_version, run_cli, start_private_node
from privatenode import PrivateNode
from rawclient import RawClient

from fibrpc import Client
from fibrpc.exitcodes import ExitCode

#: The RabbitMQ releases from which a passive declare needs a permission on the queue.
PASSIVE_NEEDS_A_PERMISSION = (4, 2, 6)


def client_permissions(queue: str) -> tuple[str, str, str]:
    """The client's permissions for ``queue``: configure, write, read."""
    return "^$", rf"^(amq\.default|{re.escape(queue)})$", "^$"


#: The client's permissions as docs/security.md gave them before RabbitMQ 4.2.6: enough on
#: 3.10 and 4.0, not for counting consumers on 4.3.
OLD_CLIENT_PERMISSIONS = ("^$", r"^amq\.default$", "^$")


def server_permissions(queue: str) -> tuple[str, str, str]:
    """The server's permissions on ``queue``: configure, write, read."""
    own = f"^{re.escape(queue)}$"
    return own, r"^amq\.default$", own


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    with contextlib.ExitStack() as stack:
        yield start_private_node(stack, prefix="fibrpc-privileges")


@pytest.fixture
def broker_url(node: PrivateNode) -> str:
    """Every fixture of conftest (servers, queues, channels) on this module's node."""
    return node.url()


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    password: str
    url: str  #: the node's URL, logging in as this user


@dataclasses.dataclass(frozen=True)
class Cast:
    """A request queue of the module's own and the users of the tests, made once (each
    ``rabbitmqctl`` call costs most of a second)."""

    queue: str
    server: User  #: server_permissions(queue)
    client: User  #: client_permissions(queue)
    old_client: User  #: OLD_CLIENT_PERMISSIONS
    stranger: User  #: no permissions on the vhost at all
    mute: User  #: permissions that allow nothing


@pytest.fixture(scope="module")
def cast(node: PrivateNode) -> Cast:
    queue = f"fibrpc-test-privileges-{secrets.token_hex(4)}"

    def make(role: str, permissions: tuple[str, str, str] | None = None) -> User:
        name, password = f"fibrpc-test-{role}", secrets.token_hex(12)
        node.checked("add_user", name, password)
        if permissions is not None:
            node.checked("set_permissions", "-p", "/", name, *permissions)
        return User(name, password, node.url(name, password))

    return Cast(
        queue=queue,
        server=make("server", server_permissions(queue)),
        client=make("client", client_permissions(queue)),
        old_client=make("old-client", OLD_CLIENT_PERMISSIONS),
        stranger=make("stranger"),
        mute=make("mute", ("^$", "^$", "^$")),
    )


@pytest.fixture
def queue(cast: Cast, broker_url: str) -> Iterator[str]:
    """The module's request queue, new for each test (the users' permissions name it)."""
    delete_queue(broker_url, cast.queue)
    yield cast.queue
    delete_queue(broker_url, cast.queue)


def _refused(operation: Callable[[], object]) -> str:
    """Run ``operation``, which must be refused with 403 ACCESS_REFUSED; the reply text."""
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        operation()
    assert closed.value.reply_code == 403, closed.value
    assert "ACCESS_REFUSED" in closed.value.reply_text
    return str(closed.value.reply_text)


def test_a_server_and_a_client_with_only_their_own_permissions_compute_fib_30(serve, queue, cast):
    client = cast.client
    serve("--url", cast.server.url, workers=1)  # its --url replaces the fixture's
    result = run_cli("call", "30", "--url", client.url, "--queue", queue)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"
    with Client(client.url, queue=queue, timeout=10) as fib:
        assert fib.map(range(100)) == list(_fibs(100))


def _fibs(count: int) -> Iterator[int]:
    a, b = 0, 1
    for _ in range(count):
        yield a
        a, b = b, a + b


def test_the_server_user_may_republish_a_redelivered_request(serve, queue, broker, cast):
    broker.queue_declare(queue, durable=True)
    raw = RawClient(cast.client.url, queue)
    try:
        raw.channel.confirm_delivery()  # so the request is in the queue before basic_get
        corr_id = raw.publish(b"30")
        # Take the request and put it back, as a dying worker's broker would: it is now
        # "redelivered", and a worker re-publishes such a request with its count.
        method, _, _ = broker.basic_get(queue)
        assert method is not None
        broker.basic_reject(method.delivery_tag, requeue=True)
        serve("--url", cast.server.url, workers=1)
        _, body = raw.reply(corr_id)
        assert body == b"832040"
    finally:
        raw.close()


def test_the_client_user_can_only_send_requests_and_count_consumers(serve, queue, cast):
    client = cast.client
    serve(workers=1)  # the request queue exists and is served
    connection = pika.BlockingConnection(pika.URLParameters(client.url))
    try:
        for operation in [
            lambda ch: ch.basic_get(queue),
            lambda ch: ch.basic_consume(queue, lambda *args: None),
            lambda ch: ch.queue_purge(queue),
            lambda ch: ch.queue_delete(queue),
            lambda ch: ch.queue_declare(queue, durable=True),
            lambda ch: ch.queue_declare(f"{queue}-other", durable=True),
            lambda ch: ch.queue_declare("", exclusive=True),
            lambda ch: ch.queue_bind(queue, "amq.direct", "x"),  # write on the queue...
            lambda ch: ch.queue_bind(queue, "amq.fanout"),  # ...but read on no exchange
            lambda ch: ch.queue_unbind(queue, "amq.direct", "x"),
        ]:
            text = _refused(lambda op=operation: op(connection.channel()))
            assert client.name in text
        channel = connection.channel()
        channel.confirm_delivery()
        _refused(lambda: channel.basic_publish("amq.topic", queue, b"30"))
        # What it may do: count the queue's consumers, and send (confirmed).
        channel = connection.channel()
        channel.confirm_delivery()
        assert channel.queue_declare(queue, passive=True).method.consumer_count == 1
        channel.basic_publish("", queue, b"30")
    finally:
        connection.close()


def test_the_client_user_is_told_no_server_serves_the_queue_with_exit_5(queue, broker, cast):
    """Whether the queue is missing or has no consumer, and whatever the version: a call
    with a 5 s timeout ends with NO_SERVER, not TIMEOUT, so the client found out in time."""
    url = cast.client.url
    missing = run_cli("call", "30", "--url", url, "--queue", queue, "--timeout", "5")
    assert missing.returncode == ExitCode.NO_SERVER, missing.stderr
    assert "does not exist" in missing.stderr
    broker.queue_declare(queue, durable=True)
    idle = run_cli("call", "30", "--url", url, "--queue", queue, "--timeout", "5")
    assert idle.returncode == ExitCode.NO_SERVER, idle.stderr
    assert "has no consumer" in idle.stderr
    status = run_cli("status", "--url", url, "--queue", queue, "--json")
    assert status.returncode == ExitCode.NO_SERVER, status.stderr
    assert json.loads(status.stdout)["consumers"] == 0


def test_fibrpc_status_with_the_client_user_counts_the_servers(serve, queue, cast):
    serve(workers=1)
    status = run_cli("status", "--url", cast.client.url, "--queue", queue, "--json")
    assert status.returncode == ExitCode.OK, status.stderr
    report = json.loads(status.stdout)
    assert report["exists"] is True and report["consumers"] == 1, report


def test_the_older_client_permissions_count_consumers_only_before_rabbitmq_4_2_6(
    serve, queue, cast, node, caplog
):
    """With write on ``amq.default`` alone, the client's calls go through on every line;
    on 4.2.6 and later the count of consumers is refused, said once in a warning naming
    the permission to add (asked once: the node logs one refusal), and ``fibrpc status``
    exits ACCESS_REFUSED naming it too."""
    old = cast.old_client
    serve(workers=1)
    refusal = f"access to queue '{queue}' in vhost '/' refused for user '{old.name}'"
    before = node.log.count(refusal)
    with (
        caplog.at_level(logging.WARNING, logger="fibrpc.driver"),
        Client(old.url, queue=queue, timeout=10) as fib,
    ):
        for n in range(30):  # over a few of the probe's half-second intervals
            assert fib.call(n) == list(_fibs(n + 1))[-1]
            time.sleep(0.05)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fibrpc.driver"]
    status = run_cli("status", "--url", old.url, "--queue", queue)
    fix = f"'^(amq\\.default|{re.escape(queue)})$'"
    if rabbitmq_version() >= PASSIVE_NEEDS_A_PERMISSION:
        assert len(warnings) == 1, warnings
        assert f"user {old.name!r}" in warnings[0] and fix in warnings[0]
        assert _wait_for(lambda: node.log.count(refusal) > before)
        assert node.log.count(refusal) == before + 1
        assert status.returncode == ExitCode.ACCESS_REFUSED, status.stderr
        assert fix in status.stderr
    else:
        assert warnings == []
        assert node.log.count(refusal) == before
        assert status.returncode == ExitCode.OK, status.stderr


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``predicate`` holds within ``timeout`` seconds (the node writes its log a
    moment after the refusal)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_the_server_user_cannot_touch_other_queues(queue, cast):
    server = cast.server
    other = f"{queue}-other"
    connection = pika.BlockingConnection(pika.URLParameters(server.url))
    try:
        _refused(lambda: connection.channel().queue_declare(other, durable=True))
        _refused(
            lambda: connection.channel().queue_declare(f"x{queue}", durable=True)
        )  # anchored regex
        channel = connection.channel()
        channel.confirm_delivery()
        _refused(lambda: channel.basic_publish("amq.direct", queue, b"30"))
    finally:
        connection.close()


def test_a_user_without_permissions_on_the_vhost_is_refused_with_exit_7(queue, cast):
    stranger = cast.stranger
    for command in [
        ("call", "30", "--url", stranger.url, "--queue", queue),
        ("serve", "--url", stranger.url, "--queue", queue, "--workers", "1"),
    ]:
        result = run_cli(*command, timeout=30)
        assert result.returncode == ExitCode.ACCESS_REFUSED, (command[0], result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.startswith("fibrpc:")]
        assert len(lines) == 1, result.stderr
        assert "refused" in lines[0]
        assert f"{stranger.name}:***@" in lines[0]
        assert stranger.password not in result.stderr


def test_a_client_user_that_may_not_publish_is_told_so_not_timed_out(serve, queue, cast):
    serve(workers=1)
    result = run_cli("call", "30", "--url", cast.mute.url, "--queue", queue, "--timeout", "3")
    assert result.returncode == ExitCode.ACCESS_REFUSED, result.stderr
    assert "amq.default" in result.stderr
