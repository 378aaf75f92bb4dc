"""A real RabbitMQ cluster under fire: three private nodes joined into one cluster, a
quorum request queue, two servers and a client each given all three URLs in different
orders (the servers on different nodes; the client on the first server's, or on the
third node).

Under 20,000 pipelined calls, a node is lost (``kill -9`` of the node that leads the queue
and that the client and a server are on; ``kill -9`` of that node while the client is on
the third; ``kill -9`` of the other server's node, which leads nothing, then its return;
``rabbitmqctl stop_app`` then ``start_app``). Each time every call is answered once,
correctly, both servers consume again within 15 s, and no process reconnects in a loop
(at most ``MOST_RECONNECTS`` each, counted in the servers' logs and the client's). The
times from the fault to the first answer after it, and to both servers consuming again,
are printed (``pytest -s``) for docs/scaling.md's figures.

The cluster runs on each RabbitMQ line of ``LINES`` (one cluster per line, shared by its
tests), with the reply queues the client takes there: on 3.10 only its own exclusive
queue, since direct reply-to across nodes is broken on that line (docs/scaling.md); on
4.x both. The faults each line runs are those its RabbitMQ survives (``on_lines``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
from conftest import paced, start_server
from privatenode import PrivateNode, private_cluster

from fibrpc import Client
from fibrpc.errors import CallTimeoutError
from fibrpc.numbers import FAST_TABLE

#: Broker tests; a cluster's boot (30-60 s), two servers and 20,000 calls take more than
#: the suite's 120 s.
pytestmark = [pytest.mark.broker, pytest.mark.timeout(600)]

QUEUE = "fibrpc-cluster-rpc"
CALLS = 20_000
RECOVERY = 15.0

#: The RabbitMQ lines a cluster is made of (``PrivateNode``'s ``version``: None is the
#: machine's own RabbitMQ, Debian 12's 3.10; "trixie" is Debian trixie's 4.0, "sid"
#: Debian sid's, 4.3.6 in December 2026) and the client's reply queues on each, the first
#: the one every fault runs with. Every session runs every line: scripts/dev.sh runs this
#: module once. The exclusive reply queue runs on 3.10, where it is the advice, and on
#: 4.3, today's line; direct reply-to on 4.0 and 4.3 (CI's time is short).
LINES: dict[str | None, tuple[str, ...]] = {
    None: ("exclusive",),
    "trixie": ("direct",),
    "sid": ("direct", "exclusive"),
}
_NAMES: dict[str | None, str] = {None: "3.10", "trixie": "4.0", "sid": "4.3"}  # test ids

#: The lines where a client on the node that leads the queue survives losing it. On 3.10
#: the requests it publishes from its new node are lost until the node comes back (its
#: new channel still sends them to the dead leader: rabbitmq-server#9208), so there the
#: client is on a node of its own and the leader's loss is a server's (docs/scaling.md).
LINES_4: tuple[str | None, ...] = tuple(line for line in LINES if line is not None)

#: Most reconnects a process may log in one test: one per node it loses, a failed try or
#: two while the cluster settles. A process reconnecting in a loop logs hundreds.
MOST_RECONNECTS = 8


def on_lines(*lines: str | None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run a test on these lines of ``LINES`` only (by default: on every one)."""

    def mark(test: Callable[..., None]) -> Callable[..., None]:
        test.lines = lines  # type: ignore[attr-defined]
        return test

    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``line`` and ``reply_queue``: every reply queue of each line (``on_lines``) for
    tests that take ``reply_queue``, else each line's first; ``line`` is module-scoped,
    so the tests of one line share its cluster."""
    if "line" not in metafunc.fixturenames:
        return
    lines = getattr(metafunc.function, "lines", tuple(LINES))
    if "reply_queue" in metafunc.fixturenames:
        cases = [(line, mode) for line in lines for mode in LINES[line]]
        ids = [f"{_NAMES.get(line, str(line))}-{mode}" for line, mode in cases]
        metafunc.parametrize("line, reply_queue", cases, ids=ids, indirect=["line"], scope="module")
    else:
        metafunc.parametrize(
            "line",
            lines,
            ids=[_NAMES.get(line, str(line)) for line in lines],
            indirect=True,
            scope="module",
        )


@pytest.fixture(scope="module")
def line(request: pytest.FixtureRequest) -> str | None:
    """The RabbitMQ line of the cluster (see ``LINES``)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cluster(
    line: str | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[PrivateNode]]:
    root = tmp_path_factory.mktemp(f"cluster-{_NAMES.get(line, str(line))}")
    # Each line's defaults: on 4.0.5 a node with every deprecated feature denied fails
    # to start_app after join_cluster (failed_to_deny_deprecated_features); the denials
    # are proven on a single node (test_rabbitmq4.py).
    with private_cluster(root, 3, _config(line), version=line) as nodes:
        yield nodes


def _consumers(nodes: list[PrivateNode]) -> int | None:
    """The queue's consumers, as any live node tells it (None: none answered)."""
    for node in nodes:
        with contextlib.suppress(Exception):
            conn = pika.BlockingConnection(pika.URLParameters(node.url()))
            try:
                return int(conn.channel().queue_declare(QUEUE, passive=True).method.consumer_count)
            finally:
                conn.close()
    return None


def _state(nodes: list[PrivateNode]) -> str:
    """What the live nodes say of the request queue (for a failure's message)."""
    lines = []
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            result = node.ctl(
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "online",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
                timeout=30,
            )
            lines.append(f"{node.name}: {result.stdout}{result.stderr}")
    return "\n".join(lines)


#: The consumer_disconnected_timeout (RabbitMQ 4.3 on) of the 4.3 cluster, in seconds:
#: RabbitMQ's default is 60 s; docs/scaling.md advises this lower value where a minute is
#: too long, and the held calls' test then waits 50 s less (CI's time is short).
CONSUMER_DISCONNECTED_TIMEOUT = 10.0


def _config(line: str | None) -> str:
    """The rabbitmq.conf of ``line``'s cluster: the lower hold on sid (older lines do
    not know the key and fail to boot on it)."""
    if line != "sid":
        return ""
    return f"consumer_disconnected_timeout = {int(CONSUMER_DISCONNECTED_TIMEOUT * 1000)}\n"


def _held_for(node: PrivateNode) -> float:
    """Seconds a quorum queue of ``node``'s line (a live node) may keep the requests
    delivered to a consumer on a node that went down (none before 4.3: at once)."""
    version = tuple(int(part) for part in node.server_version().split(".")[:2])
    return CONSUMER_DISCONNECTED_TIMEOUT if version >= (4, 3) else 0.0


def _live(nodes: list[PrivateNode]) -> PrivateNode:
    """A node of ``nodes`` that runs."""
    return next(n for n in nodes if n.proc is not None and n.proc.poll() is None)


def _serving(servers: list, marks: list[int], victim: PrivateNode) -> bool:
    """Whether every server that consumed on ``victim`` before the fault (``marks``: the
    ends of their logs then) consumes again since. (The queue's consumer count is no
    measure: RabbitMQ counts the consumer of a killed node until it notices it is gone.)"""
    at = f":{victim.node_port}/"
    for server, mark in zip(servers, marks, strict=True):
        before, since = server.text[:mark], server.text[mark:]
        last = before[before.rfind("consuming") :].split("\n", 1)[0]
        if at in last and "consuming" not in since:
            return False
    return True


def _leader(nodes: list[PrivateNode]) -> PrivateNode:
    out = nodes[0].checked("list_queues", "name", "leader", "--quiet", "--no-table-headers")
    for line in out.splitlines():
        name, _, leader = line.partition("\t")
        if name.strip() == QUEUE:
            return next(n for n in nodes if n.name == leader.strip())
    raise AssertionError(f"no leader for {QUEUE} in:\n{out}")


def _wait(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)
    return time.monotonic() - started


def _declare_afresh(node: PrivateNode, timeout: float = 60.0) -> None:
    """Delete and declare the quorum queue on ``node``. Just after a node of the cluster
    came back, RabbitMQ 4.3.6 may refuse that for a moment (541 INTERNAL_ERROR, the
    connection closed): asked again, on a new connection, until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        conn = pika.BlockingConnection(pika.URLParameters(node.url()))
        try:
            channel = conn.channel()
            channel.queue_delete(QUEUE)
            channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
            return
        except pika.exceptions.ConnectionClosedByBroker as exc:
            if exc.reply_code != 541 or time.monotonic() > deadline:
                raise
            time.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                conn.close()


@pytest.fixture
def setup(cluster: list[PrivateNode], tmp_path: Path) -> Iterator[tuple[list, list[PrivateNode]]]:
    """Two servers, one starting on the queue's leader, one on another node; and the
    nodes in that order: the leader, the second server's, the third."""
    for node in cluster:  # every node up, the queue declared afresh with node 1 leading
        if node.proc is None or node.proc.poll() is not None:
            node.start()
    _declare_afresh(cluster[0])
    leader = _leader(cluster)
    others = [n for n in cluster if n is not leader]
    first = [leader, *others]
    second = [others[0], others[1], leader]
    servers = []
    try:
        for order in (first, second):
            args = [a for node in order for a in ("--url", node.url())]
            servers.append(
                start_server(QUEUE, tmp_path, *args, "--queue-type", "quorum", workers=1)
            )
        _wait(lambda: _consumers(cluster) == 2, 30, "both servers consuming")
        yield servers, first
    finally:
        codes = [server.stop() for server in servers]
    # Each drains and exits by itself on SIGTERM: a worker that had failed over once
    # hung in its control path's declare of a queue on the lost node (RabbitMQ 4.x does
    # not answer it) and was killed 20 s later.
    for server, code in zip(servers, codes, strict=True):
        assert code == 0, f"exit {code}:\n{server.text[-3000:]}"


def _reconnects(text: str) -> int:
    """How many times a server's log says it reconnects (or retries a connection)."""
    return sum(
        "reconnect" in line.lower() or "retrying" in line.lower() for line in text.splitlines()
    )


def _under_load(
    urls: list[str],
    fault: Callable[[], None],
    victim: PrivateNode,
    cluster: list[PrivateNode],
    servers: list,
    reply_queue: str,
    caplog: pytest.LogCaptureFixture,
    lossy: bool = False,
) -> None:
    """Run ``CALLS`` pipelined calls over ``urls`` and ``fault()`` among them; assert
    what the module docstring says. ``lossy``: the fault kills the node that leads the
    queue on RabbitMQ 3.10, which may lose the requests in flight then (see
    ``LOST_ON_3_10``): calls that stall that way, and only that way, are an expected
    failure."""
    ns = [i % 91 for i in range(CALLS)]
    results: list[int] = []
    stamps: list[float] = []
    errors: list[BaseException] = []
    caplog.set_level(logging.INFO, logger="fibrpc.driver")
    client = Client(urls, queue=QUEUE, timeout=120, window=200, reply_queue=reply_queue)
    with client:
        reply_to = client._driver.link.reply_to  # type: ignore[attr-defined]

        def run() -> None:
            try:
                for value in client.imap(paced(ns), batch_size=1):
                    results.append(value)
                    stamps.append(time.monotonic())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        _wait(lambda: len(results) > 3000, 60, "3,000 answers before the fault")
        # Any reply counts as an answer after the fault, not only the next one imap
        # yields: imap yields in order, and from RabbitMQ 4.3 the call at the head of the
        # line may be among the requests held for a minute (below), behind which every
        # answer waits in imap; a CI run saw that (23 held, the head among them).
        settled = client._driver.registry.settled  # type: ignore[attr-defined]
        faulted = time.monotonic()
        marks = [len(server.text) for server in servers]
        fault()
        try:
            _wait(
                lambda: client._driver.registry.settled > settled,  # type: ignore[attr-defined]
                RECOVERY,
                "an answer after the fault",
                every=0.01,
            )
        except AssertionError as exc:
            logs = "\n".join(server.text[-3000:] for server in servers)
            raise AssertionError(f"{exc}\n{_state(cluster)}\n{logs}") from None
        first = time.monotonic() - faulted
        try:
            _wait(
                lambda: _serving(servers, marks, victim) and (_consumers(cluster) or 0) >= 2,
                RECOVERY - (time.monotonic() - faulted),
                "both servers again",
            )
            capacity = time.monotonic() - faulted
        except AssertionError as exc:
            logs = "\n".join(server.text[-3000:] for server in servers)
            raise AssertionError(f"{exc}; consumers {_consumers(cluster)}\n{logs}") from None
        # Paced at about 2,000 calls a second; and from RabbitMQ 4.3 a quorum queue keeps
        # the requests delivered to a consumer whose node went down for its
        # consumer_disconnected_timeout (60 s by default, 10 s here), in case the node
        # comes back, before it delivers them again: the calls among them wait for it.
        thread.join(CALLS / 500 + _held_for(_live(cluster)))
        if thread.is_alive():
            dropped = (client.dropped_unknown, client.dropped_duplicates, client.in_flight)
            for server in servers:
                server.stop()  # their last log line counts what they did
            client.close()  # ends the run: its calls fail
            thread.join(10)
            queues = (
                _live(cluster)
                .ctl(
                    "list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers"
                )
                .stdout
            )
            logs = "\n".join(server.text[-3000:] for server in servers)
            stalled = (
                f"{len(results):,} of {CALLS:,} calls answered, then none more (dropped "
                f"unknown, duplicates, in flight: {dropped}):\n{queues}\n{logs}"
            )
            if lossy and _emptied(queues) and 0 < dropped[2] <= LOST_ON_3_10:
                pytest.xfail(f"RabbitMQ 3.10 lost requests with the leader: {stalled}")
            raise AssertionError(stalled)
        new_reply_to = client._driver.link.reply_to  # type: ignore[attr-defined]
    assert not errors, errors
    assert results == [FAST_TABLE[n] for n in ns]  # each once, in order, correct
    if reply_queue == "exclusive":
        # A queue of the client's own, and a new one after its node was lost.
        assert reply_to.startswith("amq.gen-") and new_reply_to.startswith("amq.gen-")
        assert (new_reply_to != reply_to) == (f":{victim.node_port}/" in urls[0])
    else:
        assert reply_to == new_reply_to == "amq.rabbitmq.reply-to"
    # No process reconnected in a loop (a RabbitMQ 3.10 node crashing a server's channel
    # on every cross-node direct reply makes it reconnect ~50 times a second).
    opened = [
        r for r in caplog.records if r.getMessage().startswith(("reconnected", "reconnect failed"))
    ]
    assert len(opened) <= MOST_RECONNECTS, [r.getMessage() for r in opened]
    for server in servers:
        assert _reconnects(server.text) <= MOST_RECONNECTS, server.text[-4000:]
    gap = max(b - a for a, b in itertools.pairwise(stamps) if a >= faulted)
    print(
        f"\n{fault.__doc__}, reply_queue={reply_queue}: first answer {first:.2f} s after "
        f"the fault, both servers consuming after {capacity:.2f} s, longest gap between "
        f"answers {gap:.2f} s"
    )


#: On RabbitMQ 3.10, killing the node that leads the quorum queue may lose requests a
#: client on another node had just published (fibrpc publishes without confirms): seen
#: in 1 of 5 runs: 11 calls in flight never answered, the queue empty, both servers
#: consuming, their counts short of serving them. Those calls wait out their
#: timeout (docs/scaling.md). At most a window's worth; never seen on 4.x.
LOST_ON_3_10 = 200


def _emptied(queues: str) -> bool:
    """Whether ``rabbitmqctl list_queues name messages_ready messages_unacknowledged
    consumers`` says the request queue holds nothing and has both servers."""
    for row in queues.splitlines():
        fields = row.split()
        if fields and fields[0] == QUEUE:
            return fields[1:] == ["0", "0", "2"]
    return False


def _urls(*nodes: PrivateNode) -> list[str]:
    return [node.url() for node in nodes]


@on_lines(*LINES_4)
def test_losing_the_leader_node_the_client_and_a_server_are_on_loses_no_call(
    cluster, setup, reply_queue, caplog
):
    servers, (leader, second, third) = setup
    urls = _urls(leader, second, third)

    def fault() -> None:
        """kill -9 of the leader"""
        leader.kill()

    _under_load(urls, fault, leader, cluster, servers, reply_queue, caplog)
    assert all(server.proc.poll() is None for server in servers)
    assert "died" not in servers[0].text


@on_lines(None)  # on 4.x, the test above loses the leader too, and the client with it
def test_losing_the_leader_node_of_a_server_while_the_client_is_on_another_loses_no_call(
    cluster, setup, line, caplog
):
    servers, (leader, second, third) = setup
    urls = _urls(third, leader, second)

    def fault() -> None:
        """kill -9 of the leader (a server's node, not the client's)"""
        leader.kill()

    _under_load(urls, fault, leader, cluster, servers, LINES[line][0], caplog, lossy=True)
    assert all(server.proc.poll() is None for server in servers)


def test_losing_the_node_of_the_other_server_then_its_return_lose_no_call(
    cluster, setup, line, caplog
):
    servers, (leader, second, third) = setup
    urls = _urls(leader, second, third)
    victim = second  # leads nothing

    def fault() -> None:
        """kill -9 of the other server's node (it leads nothing)"""
        victim.kill()

    _under_load(urls, fault, victim, cluster, servers, LINES[line][0], caplog)
    victim.start()
    _wait(lambda: victim.name in cluster[0].checked("cluster_status"), 60, "the node rejoins")


@on_lines(*LINES_4)
def test_stop_app_and_start_app_on_a_node_lose_no_call(cluster, setup, line, caplog, request):
    if line == "sid":
        # Seen in 2 of 4 runs on 4.3.6, never on 4.0.5: after stop_app of a node, the
        # quorum queue keeps two consumers holding 64 requests unacked even after both
        # servers have stopped (the stopped node's channels', it seems), so the calls
        # among them wait out their timeout. Not understood yet: reported, not hidden
        # (docs/scaling.md); a kill -9 of a node, above, loses nothing on 4.3.
        request.applymarker(
            pytest.mark.xfail(
                reason="RabbitMQ 4.3.6 may keep a stopped node's consumers holding requests",
                strict=False,
            )
        )
    servers, nodes = setup
    urls = _urls(*nodes)
    node = cluster[1]

    def fault() -> None:
        """rabbitmqctl stop_app, then start_app"""
        node.checked("stop_app")
        threading.Timer(1.0, lambda: node.checked("start_app")).start()

    _under_load(urls, fault, node, cluster, servers, LINES[line][0], caplog)


#: How long a worker may go on failing to open during the outage before the test says it
#: never retried: a few consume-ok round trips (``amqp._ROUND_TRIP``, 30 s) and connects.
OUTAGE_WAIT = 150.0


def _retrying(text: str) -> set[str]:
    """The processes (pids) whose log says they retry opening."""
    return {line.split(" ")[2] for line in text.splitlines() if "Retrying" in line}


# Not on 3.10: in 1 of 3 runs there, RabbitMQ did not bring the restarted nodes' queue
# members online within 2 minutes (docs/scaling.md), which is no test of fibrpc.
@on_lines(*LINES_4)
def test_a_server_rides_out_an_outage_of_its_quorum_queue_s_majority(cluster, tmp_path):
    """Two of three nodes ``kill -9``: the quorum queue has no majority, so no worker's
    open is answered (no consume-ok). A worker killed meanwhile is restarted into the
    outage and its open fails; it retries, with backoff, instead of dying (before, each
    restarted worker died after its round trip and the server exited 9, CRASH_LOOP,
    within about 3 minutes). Once the nodes are back, the server answers."""
    for node in cluster:  # every node up, the queue declared afresh
        if node.proc is None or node.proc.poll() is not None:
            node.start()
    conn = pika.BlockingConnection(pika.URLParameters(cluster[0].url()))
    channel = conn.channel()
    channel.queue_delete(QUEUE)
    channel.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    survivor, lost = cluster[0], cluster[1:]
    urls = _urls(*cluster)
    args = [a for url in urls for a in ("--url", url)]
    server = start_server(
        QUEUE, tmp_path, *args, "--queue-type", "quorum", "--log-level", "debug", workers=2
    )
    try:
        _wait(lambda: _consumers(cluster) == 2, 30, "both workers consuming")
        victim = server.worker_pids()[0]
        for node in lost:
            node.kill()
        os.kill(victim, signal.SIGKILL)  # restarted into the outage
        server.wait_for_log(f"pid {victim}) died (killed by SIGKILL); restarting", timeout=10)
        # The restarted worker, and the one whose node went, fail to open and retry (the
        # first retry of an outage is a warning, the others debug lines).
        deadline = time.monotonic() + OUTAGE_WAIT
        while len(_retrying(server.text)) < 2:
            assert server.proc.poll() is None, server.text[-4000:]
            assert time.monotonic() < deadline, (
                f"no two workers retrying within {OUTAGE_WAIT:.0f} s:\n{server.text[-4000:]}"
            )
            time.sleep(0.5)
        assert server.proc.poll() is None, server.text[-4000:]
        for node in lost:
            node.start()
        # A call each 20 s until one is answered: a request published while the queue
        # elects its leader may be lost (seen on 3.10: ``LOST_ON_3_10``), and this test
        # is about the server, not that.
        with Client([survivor.url(), *_urls(*lost)], queue=QUEUE, timeout=20) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    assert client.call(90) == FAST_TABLE[90]
                    break
                except CallTimeoutError as exc:
                    if time.monotonic() > deadline:
                        state = _state(cluster)
                        raise AssertionError(f"{exc}\n{state}\n{server.text[-6000:]}") from exc
        assert server.proc.poll() is None, server.text[-4000:]
        assert server.text.count("died") == 1, server.text[-4000:]  # only the one killed
        server.wait_for_log("RabbitMQ answers again", count=2, timeout=60)
    finally:
        server.stop()
