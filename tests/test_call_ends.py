"""Every call ends, and says why (issue #21): a call made while the client reconnects keeps
its deadline and is told the broker is unreachable (or refuses it); closing wakes every
caller, a waiting one included; with no server, a short timeout still says "no server",
and the request left behind is never computed; ``imap`` streams over an input that
pauses; every bad argument of ``map``/``imap`` is a ``FibrpcError`` before anything is
reserved. Broker outages happen on private nodes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from conftest import URL, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_aio import run
from test_client import StandIn

from fibrpc import (
    AccessRefusedError,
    BrokerUnreachableError,
    Client,
    ClientClosedError,
    ConfigError,
    NoServerError,
    RequestError,
)
from fibrpc.aio import AsyncClient
from fibrpc.client import MAX_N, encode, messages
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE

#: How late an outcome may come: thread wake-ups and a loaded 2-core machine.
MARGIN = 1.0


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info and r.name.startswith("fibrpc")]


# -- a call made while the client reconnects -----------------------------------------------


def test_a_submit_while_the_broker_is_down_keeps_its_deadline_and_close_logs_no_traceback(
    private_broker, queue, caplog
):
    node = private_broker
    client = Client(node.url(), queue=queue, timeout=2)
    stopped = False
    try:
        with caplog.at_level(logging.INFO, logger="fibrpc"):
            assert node.ctl("stop_app").returncode == 0
            stopped = True
            time.sleep(1.0)  # the connection is lost: the client reconnects, in vain
            started = time.monotonic()
            future = client.submit(30)
            with pytest.raises(BrokerUnreachableError) as down:
                future.result(2 + MARGIN + 3)
            assert time.monotonic() - started < 2 + MARGIN
            assert "fib(30)" in str(down.value)
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < 1 + MARGIN
        assert not _no_tracebacks(caplog), caplog.text
    finally:
        client.close()
        if stopped:
            node.ctl("start_app")


def test_a_call_to_a_deleted_vhost_is_refused_at_once_not_left_pending(private_broker, queue):
    node = private_broker
    assert node.ctl("add_vhost", "doomed").returncode == 0
    assert node.ctl("set_permissions", "-p", "doomed", "guest", ".*", ".*", ".*").returncode == 0
    with Client(node.url().rsplit("/", 1)[0] + "/doomed", queue=queue, timeout=30) as client:
        assert node.ctl("delete_vhost", "doomed").returncode == 0  # closes its connections
        time.sleep(1.0)
        started = time.monotonic()
        future = client.submit(30)
        with pytest.raises(AccessRefusedError):
            future.result(10)
        assert time.monotonic() - started < 5  # not at its deadline, 30 s away


def test_a_connected_async_client_is_told_the_broker_is_unreachable_or_refuses(
    private_broker, queue
):
    node = private_broker
    assert node.ctl("add_user", "alice", "secret").returncode == 0
    assert node.ctl("set_permissions", "alice", ".*", ".*", ".*").returncode == 0
    parts = urllib.parse.urlsplit(node.url())
    alice = f"amqp://alice:secret@{parts.hostname}:{parts.port}/%2F"

    async def main() -> None:
        async with AsyncClient(node.url(), queue=queue, timeout=2) as guest:
            assert node.ctl("stop_app").returncode == 0
            try:
                started = time.monotonic()
                with pytest.raises(BrokerUnreachableError):
                    await guest.call(30)
                assert time.monotonic() - started < 2 + MARGIN
            finally:
                assert node.ctl("start_app").returncode == 0
        async with AsyncClient(alice, queue=queue, timeout=20) as client:
            assert node.ctl("change_password", "alice", "changed").returncode == 0
            node.ctl("close_all_connections", "a test")
            await asyncio.sleep(1.0)
            started = time.monotonic()
            with pytest.raises(AccessRefusedError):
                await client.call(30)
            assert time.monotonic() - started < 5  # not at its deadline, 20 s away

    run(main)


# -- closing wakes every caller ------------------------------------------------------------


def test_close_while_other_threads_wait_for_a_slot_ends_every_call_at_once(queue):
    never = StandIn(queue, lambda ch, method, props, body: None)  # takes, never answers
    try:
        client = Client(URL, queue=queue, window=1, timeout=60)
        first = client.submit(1)  # holds the only slot
        outcomes: list[object] = []

        def submit(n: int) -> None:
            try:
                outcomes.append(client.submit(n).exception(5))  # what its future ends with
            except BaseException as exc:  # or what submit raised
                outcomes.append(exc)

        threads = [threading.Thread(target=submit, args=(n,)) for n in (2, 3, 4)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all three wait for the slot
        started = time.monotonic()
        client.close()
        for thread in threads:
            thread.join(10)
        assert time.monotonic() - started < 1 + MARGIN
        assert isinstance(first.exception(1), ClientClosedError)
        assert len(outcomes) == 3
        assert all(isinstance(o, ClientClosedError) for o in outcomes), outcomes
    finally:
        never.close()


# -- no server ------------------------------------------------------------------------------


def test_a_short_call_with_no_server_says_no_server_before_its_deadline(queue, broker):
    broker.queue_declare(queue, durable=True)  # nothing consumes it
    with Client(URL, queue=queue, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(NoServerError):
            client.call(30, timeout=0.5)
        assert time.monotonic() - started < 0.5 + MARGIN
    result = run_cli("call", "30", "--url", URL, "--queue", queue, "--timeout", "1")
    assert result.returncode == ExitCode.NO_SERVER, result.stderr
    assert "fibrpc serve" in result.stderr


def test_a_request_left_by_a_call_that_found_no_server_is_never_computed(queue, broker):
    broker.queue_declare(queue, durable=True)
    with Client(URL, queue=queue, timeout=30) as client:
        with pytest.raises(NoServerError):
            client.call(30)
        with pytest.raises(NoServerError):
            client.map(range(100), batch_size=10)
    # A server that comes now finds nothing to compute: the broker dropped the requests.
    method, _, _ = broker.basic_get(queue, auto_ack=True)
    assert method is None
    assert broker.queue_declare(queue, passive=True).method.message_count == 0


# -- imap over an input that pauses ---------------------------------------------------------


class _Slow:
    """An input of ``count`` values, one every ``pause`` seconds; ``done`` once exhausted."""

    def __init__(self, count: int, pause: float) -> None:
        self.count = count
        self.pause = pause
        self.done = False

    def __iter__(self) -> Iterator[int]:
        for n in range(self.count):
            time.sleep(self.pause)
            yield n
        self.done = True


@pytest.mark.parametrize("batch_size", [None, 1, 5])
def test_imap_gives_results_while_a_slow_input_is_still_coming(serve, queue, batch_size):
    serve(workers=1)
    with Client(URL, queue=queue, timeout=30) as client:
        slow = _Slow(12, 0.25)
        seen: list[tuple[int, bool]] = []
        for value in client.imap(slow, batch_size=batch_size):
            seen.append((value, slow.done))
    assert [v for v, _ in seen] == list(FAST_TABLE[:12])
    assert not seen[0][1], "the first result came only once the input was exhausted"
    assert sum(not done for _, done in seen) >= 6, seen


@pytest.mark.parametrize("batch_size", [None, 1])
def test_async_imap_gives_results_while_a_slow_input_is_still_coming(serve, queue, batch_size):
    serve(workers=1)

    async def main() -> list[tuple[int, bool]]:
        slow = _Slow(12, 0.25)
        seen: list[tuple[int, bool]] = []
        async with AsyncClient(URL, queue=queue, timeout=30) as client:
            async for value in client.imap(slow, batch_size=batch_size):
                seen.append((value, slow.done))
        return seen

    seen = run(main)
    assert [v for v, _ in seen] == list(FAST_TABLE[:12])
    assert not seen[0][1], "the first result came only once the input was exhausted"
    assert sum(not done for _, done in seen) >= 6, seen


# -- bad arguments ----------------------------------------------------------------------------

_anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.integers(0, 5), max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(
    ns=st.one_of(_anything, st.lists(_anything, max_size=30)),
    algo=st.one_of(st.sampled_from(["fast", "iter", "naive", "nope"]), _anything),
    batch_size=_anything,
)
def test_every_argument_of_map_is_checked_into_a_fibrpc_error_naming_it(ns, algo, batch_size):
    """What ``map`` and ``imap`` do before anything is reserved: cut ``ns`` into messages
    and encode each. Either every message encodes, or a ``FibrpcError`` says why."""
    try:
        chunks, as_ = messages(ns, algo, batch_size)
        for chunk in chunks:
            encode(chunk, algo, as_)
    except ConfigError as exc:
        assert "batch_size" in exc.message or "iterable" in exc.message, exc.message
        return
    except RequestError as exc:
        assert exc.code in ("not_an_integer", "out_of_range", "unknown_algorithm"), exc
        return
    # Accepted: everything was a whole number of n, sent as the server reads it.
    assert batch_size is None or (type(batch_size) is int and batch_size >= 1)
    assert type(algo) is str
    values = list(ns)
    assert all(type(n) is int and n <= MAX_N for n in values)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "named"),
    [
        (([1, 2**64, 3],), {"batch_size": 3}, RequestError, "Batch member 1"),
        (([1, 2**64, 3],), {}, RequestError, "65 bits"),
        (([1, 10**5000],), {"batch_size": 2}, RequestError, "Batch member 1"),
        (([10**5000],), {"batch_size": 1}, RequestError, "bits"),
        ((range(10),), {"batch_size": 2.5}, ConfigError, "2.5"),
        ((range(10),), {"batch_size": "3"}, ConfigError, "'3'"),
        ((range(10),), {"batch_size": 0}, ConfigError, "0"),
        ((30,), {}, ConfigError, "30"),
        ((range(3), 5), {}, RequestError, "5"),
    ],
)
def test_a_bad_argument_of_map_or_imap_is_a_fibrpc_error_and_reserves_nothing(
    serve, queue, args, kwargs, error, named
):
    serve(workers=1)
    with Client(URL, queue=queue, window=2, timeout=10) as client:
        for method in (client.map, lambda *a, **k: list(client.imap(*a, **k))):
            for _ in range(3):  # more than the window: nothing leaks
                with pytest.raises(error) as bad:
                    method(*args, **kwargs)
                assert named in bad.value.message, bad.value.message
        assert client.in_flight == 0
        assert client.map(range(5), batch_size=2) == [0, 1, 1, 2, 3]

    async def main() -> None:
        async with AsyncClient(URL, queue=queue, window=2, timeout=10) as aclient:
            for _ in range(3):
                with pytest.raises(error):
                    await aclient.map(*args, **kwargs)
            assert aclient.in_flight == 0
            assert await aclient.call(10) == 55

    run(main)


def test_numpy_integers_are_a_fine_batch_size(serve, queue):
    import numpy as np  # noqa: PLC0415

    serve(workers=1)
    with Client(URL, queue=queue, timeout=10) as client:
        assert client.map(range(5), batch_size=np.int64(2)) == [0, 1, 1, 2, 3]  # type: ignore[arg-type]


# -- fork ------------------------------------------------------------------------------------


def test_children_forked_from_a_busy_parent_close_its_client_at_once(serve, queue):
    serve(workers=1)
    client = Client(URL, queue=queue, timeout=10)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            futures = [client.submit(n) for n in range(50)]
            client.call(20)
            for future in futures:
                future.result(10)

    threads = [threading.Thread(target=busy) for _ in range(3)]
    for thread in threads:
        thread.start()
    stuck: list[int] = []
    try:
        for child in range(60):
            time.sleep(0.02)
            pid = os.fork()
            if pid == 0:  # the child: uses the client or not, then closes it
                code = 1
                try:
                    used = child % 3 != 0 or client.call(10) == 55  # a third use it first
                    client.close()
                    code = 0 if used else 2
                finally:
                    os._exit(code)
            deadline = time.monotonic() + 5
            while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    stuck.append(child)
                    break
                time.sleep(0.01)
            else:
                assert os.waitstatus_to_exitcode(done[1]) == 0, child
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        client.close()
    assert not stuck, f"children {stuck} of 60 hung in close()"
