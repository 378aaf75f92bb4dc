"""Faults at the edges, each real: a broker that accepts TCP and never speaks, a network that
stalls or silently drops packets (``faultproxy.py``), a broker that blocks publishers (a
memory alarm on a private node), a ``fork()``, a done-callback that calls the client,
timeouts the broker cannot carry, clocks that differ; the asyncio client over a reset and
a half-open connection. Every deadline is kept, within its
timeout plus a small margin, and nothing innocent is harmed."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import urllib.parse

import pytest
from conftest import URL, run_cli
from faultproxy import FaultProxy, SilentListener
from rawclient import RawClient
from test_aio import run

from fibrpc import BrokerUnreachableError, CallTimeoutError, Client, ConfigError
from fibrpc.aio import AsyncClient
from fibrpc.exitcodes import ExitCode
from fibrpc.kernels import FAST_TABLE
from fibrpc.protocol import DEADLINE_HEADER

#: How late a deadline may be kept: thread wake-ups and a loaded 2-core machine.
MARGIN = 1.0


def _proxy_to(url: str) -> FaultProxy:
    parts = urllib.parse.urlsplit(url)
    return FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672)


def _recovers(client: Client, n: int, within: float = 30.0) -> None:
    """``client`` answers F(n) again by itself, within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            assert client.call(n) == FAST_TABLE[n]
            return
        except CallTimeoutError:
            assert time.monotonic() < deadline, "the client never recovered"


# -- a broker that accepts TCP and never speaks AMQP ---------------------------------------


@pytest.mark.parametrize("command", ["call", "status"])
def test_a_broker_that_never_speaks_is_unreachable_within_the_timeout(command):
    with SilentListener() as silent:
        args = ["call", "30"] if command == "call" else ["status"]
        started = time.monotonic()
        result = run_cli(*args, "--url", silent.url(), "--timeout", "2", timeout=30)
        elapsed = time.monotonic() - started
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert elapsed < 2 + MARGIN + 1.5, elapsed  # + the interpreter's start
    assert "does not speak AMQP" in result.stderr


def test_a_client_given_a_silent_broker_raises_unreachable_within_its_timeout():
    with SilentListener() as silent:
        started = time.monotonic()
        with pytest.raises(BrokerUnreachableError):
            Client(silent.url(), timeout=1.5)
        assert time.monotonic() - started < 1.5 + MARGIN


@pytest.mark.any_line
def test_serve_rides_out_a_long_network_stall_without_counting_it_as_a_crash(serve, queue):
    proxy = _proxy_to(URL)
    try:
        server = serve("--url", proxy.url(URL), "--heartbeat", "1", workers=2)
        with Client(URL, queue=queue, timeout=10) as client:
            assert client.call(30) == 832040
            proxy.freeze()  # heartbeats stop: the workers' connections die, reconnects stall
            time.sleep(25)  # more than a connect timeout (15 s) and many heartbeats
            proxy.thaw()
            proxy.reset()  # the half-dead connections of the stall go away
            server.wait_for_log("consuming", count=4, timeout=40)
            assert client.map(range(91), batch_size=1) == list(FAST_TABLE[:91])
        assert server.proc.poll() is None
        assert "lost the connection" in server.text, server.text  # the stall was felt
        assert "died" not in server.text, server.text
    finally:
        proxy.close()


# -- a blocked broker ---------------------------------------------------------------------


def test_calls_time_out_on_time_under_a_memory_alarm_and_the_client_recovers(
    serve, queue, private_broker
):
    node = private_broker
    url = node.url()
    serve(workers=1, url=url)
    if True:
        client = Client(url, queue=queue, timeout=3)
        try:
            assert client.call(30) == 832040
            alarm = node.ctl("set_vm_memory_high_watermark", "0")
            assert alarm.returncode == 0, alarm.stderr
            time.sleep(1.0)  # the alarm reaches the connections
            started = time.monotonic()
            with pytest.raises(CallTimeoutError) as timed_out:
                client.call(31)
            assert time.monotonic() - started < 3 + MARGIN
            assert "blocks this client's publishing" in str(timed_out.value)
            started = time.monotonic()
            with pytest.raises(CallTimeoutError):
                client.call(32, timeout=1)
            assert time.monotonic() - started < 1 + MARGIN
            cleared = node.ctl("set_vm_memory_high_watermark", "0.4")
            assert cleared.returncode == 0, cleared.stderr
            _recovers(client, 33)
        finally:
            node.ctl("set_vm_memory_high_watermark", "0.4")
            started = time.monotonic()
            client.close()
            assert time.monotonic() - started < 1 + MARGIN


def test_close_returns_within_a_second_while_the_broker_blocks(private_broker, tmp_path):
    node = private_broker
    client = Client(node.url(), queue="fibrpc-test-nobody", timeout=60)
    try:
        node.ctl("set_vm_memory_high_watermark", "0")
        time.sleep(1.0)
        future = client.submit(30)  # in flight, stuck behind the alarm
        time.sleep(0.5)
    finally:
        started = time.monotonic()
        client.close()
        closed_in = time.monotonic() - started
        node.ctl("set_vm_memory_high_watermark", "0.4")
    assert closed_in < 1 + MARGIN
    with pytest.raises(Exception, match="closed"):
        future.result(1)


# -- a half-open connection ---------------------------------------------------------------


@pytest.mark.any_line
def test_calls_keep_their_deadlines_over_a_half_open_connection_and_the_client_recovers(
    serve, queue
):
    serve(workers=1)
    with (
        _proxy_to(URL) as proxy,
        Client(proxy.url(URL), queue=queue, timeout=3, heartbeat=2) as client,
    ):
        assert client.call(30) == 832040
        proxy.blackhole()
        proxy.restore()  # new connections work again; the current one stays dead
        failures: list[float] = []

        def other() -> None:
            started = time.monotonic()
            with contextlib.suppress(CallTimeoutError):
                client.call(21, timeout=2)
            failures.append(time.monotonic() - started)

        thread = threading.Thread(target=other)
        started = time.monotonic()
        thread.start()
        with pytest.raises(CallTimeoutError):
            client.call(31)
        assert time.monotonic() - started < 3 + MARGIN
        thread.join(10)
        assert failures and failures[0] < 2 + MARGIN, failures
        _recovers(client, 32)  # heartbeats find the connection dead; it reconnects


def test_a_waiting_thread_honours_its_own_deadline_not_the_client_default(serve, queue):
    serve(workers=1)
    with (
        _proxy_to(URL) as proxy,
        Client(proxy.url(URL), queue=queue, timeout=0.3, heartbeat=60) as client,
    ):
        assert client.call(30) == 832040
        proxy.freeze()
        times: list[float] = []

        def wait(n: int) -> None:
            started = time.monotonic()
            with contextlib.suppress(CallTimeoutError):
                client.call(n, timeout=4)
            times.append(time.monotonic() - started)

        threads = [threading.Thread(target=wait, args=(n,)) for n in (20, 21)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        proxy.thaw()
    assert len(times) == 2
    assert all(4 - 0.1 < t < 4 + MARGIN for t in times), times
    assert client.in_flight == 0


# -- user code never runs on the connection's turn -----------------------------------------


def test_a_done_callback_that_calls_the_client_holds_up_nobody(serve, queue):
    serve(workers=1)
    with Client(URL, queue=queue, timeout=10) as client:
        results: list[int] = []
        done = threading.Event()

        def slow_callback(future):
            results.append(client.call(20))  # re-entrant
            time.sleep(2)  # and slow
            done.set()

        client.submit(19).add_done_callback(slow_callback)
        time.sleep(0.2)
        started = time.monotonic()
        assert client.call(21, timeout=5) == FAST_TABLE[21]  # while the callback sleeps
        assert time.monotonic() - started < 1.0
        assert done.wait(10)
        assert results == [FAST_TABLE[20]]


# -- fork --------------------------------------------------------------------------------


def test_a_client_used_across_fork_never_returns_another_process_s_result(serve, queue):
    serve(workers=2)
    client = Client(URL, queue=queue, timeout=10)
    try:
        assert client.call(1) == 1  # connected before the fork
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own calls, its own answers
            code = 1
            try:
                wrong = [n for n in range(1, 60) if client.call(n) != FAST_TABLE[n]]
                os.write(write, repr(wrong).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        wrong = [n for n in range(60, 91) for _ in range(3) if client.call(n) != FAST_TABLE[n]]
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            child_wrong = pipe.read()
        assert os.waitstatus_to_exitcode(status) == 0
        assert child_wrong == "[]"
        assert wrong == []
        assert client.call(90) == FAST_TABLE[90]  # the parent keeps working
    finally:
        client.close()


# -- any timeout is a timeout -------------------------------------------------------------


def test_huge_and_infinite_timeouts_work_and_share_the_channel_safely(serve, queue):
    serve(workers=1)
    with Client(URL, queue=queue, timeout=10) as client:
        others = [client.submit(n) for n in range(20)]
        assert client.call(30, timeout=1e9) == 832040  # TTL capped at RabbitMQ's ten years
        assert client.call(31, timeout=math.inf) == FAST_TABLE[31]
        assert client.call(32, timeout=10**400) == FAST_TABLE[32]
        assert [f.result(10) for f in others] == list(FAST_TABLE[:20])
    with Client(URL, queue=queue, timeout=math.inf) as forever:
        assert forever.call(33) == FAST_TABLE[33]


@pytest.mark.parametrize("bad", [math.nan, 0, -1, -math.inf, "5", True])
def test_a_timeout_that_is_no_timeout_is_a_config_error_before_anything_is_sent(serve, queue, bad):
    serve(workers=1)
    with Client(URL, queue=queue, window=2) as client:
        for _ in range(3):  # more than the window: nothing leaks
            with pytest.raises(ConfigError, match="timeout"):
                client.call(30, timeout=bad)
        assert client.in_flight == 0
        assert client.call(30, timeout=5) == 832040
    with pytest.raises(ConfigError):
        Client(URL, queue=queue, timeout=bad)


def test_the_command_line_takes_inf_and_refuses_nan_and_zero(serve, queue):
    serve(workers=1)
    result = run_cli("call", "30", "--url", URL, "--queue", queue, "--timeout", "inf")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"
    for bad in ("nan", "0", "-1"):
        result = run_cli("call", "30", "--url", URL, "--queue", queue, "--timeout", bad)
        assert result.returncode == ExitCode.USAGE, (bad, result.stderr)


# -- clocks may differ --------------------------------------------------------------------


def test_a_client_clock_1_5_s_behind_does_not_get_its_1_s_calls_skipped(serve, queue):
    """The bytes a client whose clock is 1.5 s behind the worker's sends for a call with
    a 1 s timeout: a deadline already 0.5 s past by the worker's clock, a TTL of 1 s."""
    serve(workers=1)
    raw = RawClient(URL, queue)
    try:
        now_ms = int(time.time() * 1000)
        behind = raw.publish(
            b"30", expiration="1000", headers={DEADLINE_HEADER: now_ms - 1500 + 1000}
        )
        gone = raw.publish(  # really expired: the caller gave up 1.5 s ago, on any clock
            b"31", expiration="1000", headers={DEADLINE_HEADER: now_ms - 2500}
        )
        _, body = raw.reply(behind)
        assert body == b"832040"
        raw.settle(1.0)
        assert gone not in raw.replies
    finally:
        raw.close()


# -- the asyncio client over the same faults ---------------------------------------------


def test_a_lost_connection_fails_over_and_re_sends_the_calls_in_flight(serve, queue):
    serve(workers=1)
    parts = urllib.parse.urlsplit(URL)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:

        async def main() -> None:
            # The proxy first (its connection is reset mid-run), then the broker itself.
            async with AsyncClient([proxy.url(URL), URL], queue=queue, timeout=30) as client:
                assert await client.call(10) == 55
                calls = [asyncio.create_task(client.call(n % 90)) for n in range(300)]
                await asyncio.sleep(0.01)
                proxy.reset()
                assert await asyncio.gather(*calls) == [FAST_TABLE[n % 90] for n in range(300)]
                assert await client.call(20) == 6765

        run(main)


@pytest.mark.any_line
def test_calls_keep_their_deadlines_over_a_half_open_connection(serve, queue):
    serve(workers=1)
    parts = urllib.parse.urlsplit(URL)
    with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:

        async def main() -> None:
            url = proxy.url(URL)
            async with AsyncClient(url, queue=queue, timeout=3, heartbeat=2) as client:
                assert await client.call(30) == 832040
                proxy.blackhole()
                proxy.restore()  # new connections work; the current one stays dead
                started = time.monotonic()
                with pytest.raises(CallTimeoutError):
                    await client.call(31, timeout=2)
                assert time.monotonic() - started < 2 + MARGIN
                deadline = time.monotonic() + 30
                while True:  # heartbeats find the connection dead; it reconnects
                    with contextlib.suppress(CallTimeoutError):
                        assert await client.call(32) == FAST_TABLE[32]
                        return
                    assert time.monotonic() < deadline, "the client never recovered"

        run(main)
