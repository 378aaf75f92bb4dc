"""The asyncio client keeps the threaded client's promises, from an event loop that it
never blocks: results, errors, timeouts, the window, cancellation, no-server detection,
closing (failover, re-sending and half-open connections: test_edge_faults.py, with the
network faults, on RabbitMQ 4). Real servers and a real broker; each test runs its own
loop (``asyncio.run``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from conftest import URL
from test_client import StandIn

from fibrpc import (
    BrokerUnreachableError,
    CallTimeoutError,
    ClientClosedError,
    ConfigError,
    ErrorCode,
    NoServerError,
    RequestError,
)
from fibrpc.aio import AsyncClient
from fibrpc.kernels import FAST_TABLE

#: How late a deadline may be kept: thread wake-ups and a loaded 2-core machine.
MARGIN = 1.0


def run(main: Callable[[], Coroutine[Any, Any, Any]], limit: float = 60.0) -> Any:
    """Run ``main()`` on a loop of its own, bounded by ``limit`` seconds."""

    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await main()

    return asyncio.run(bounded())


def test_call_call_text_map_and_imap_answer_as_the_threaded_client_does(serve, queue):
    serve(workers=2)

    async def main() -> None:
        async with AsyncClient(URL, queue=queue, timeout=30) as client:
            assert await client.call(30) == 832040
            assert await client.call(90, algo="iter") == FAST_TABLE[90]
            assert await client.call_text(1000) == str(_fib(1000))
            assert await client.map(range(3000)) == [_fib(n) for n in range(3000)]
            assert await client.map([5, 6], batch_size=1) == [5, 8]
            got = [value async for value in client.imap(range(94), algo="iter", batch_size=10)]
            assert got == list(FAST_TABLE[:94])
            assert client.in_flight == 0

    run(main)


def test_2000_concurrent_calls_are_all_answered_correctly_while_the_loop_keeps_ticking(
    serve, queue
):
    serve(workers=2)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.005)
            ticks += 1

    async def main() -> list[int]:
        async with AsyncClient(URL, queue=queue, timeout=60, window=256) as client:
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(stop))
            results = await asyncio.gather(*(client.call(i % 94, algo="iter") for i in range(2000)))
            stop.set()
            await tick
            assert client.in_flight == 0
            return results

    results = run(main)
    assert results == [FAST_TABLE[i % 94] for i in range(2000)]
    assert ticks > 0  # the loop ran other tasks meanwhile (bench/asyncio_lag.py: how soon)


def test_refusals_and_misuse_raise_what_the_threaded_client_raises_and_leak_no_slot(serve, queue):
    serve(workers=1)

    async def main() -> None:
        async with AsyncClient(URL, queue=queue, timeout=10, window=2) as client:
            for _ in range(3):  # more times than the window
                with pytest.raises(RequestError) as negative:
                    await client.call(-1)
                assert negative.value.code == ErrorCode.NEGATIVE
                with pytest.raises(RequestError) as bound:
                    await client.call(94, algo="iter")
                assert bound.value.code == ErrorCode.OUT_OF_RANGE
                with pytest.raises(RequestError) as algo:
                    await client.call(5, algo="bogus")
                assert algo.value.code == ErrorCode.UNKNOWN_ALGORITHM
                with pytest.raises(RequestError) as not_int:
                    await client.call(3.5)  # type: ignore[arg-type]
                assert not_int.value.code == ErrorCode.NOT_AN_INTEGER
                for bad_timeout in (0, -1, float("nan"), "1"):
                    with pytest.raises(ConfigError):
                        await client.call(5, timeout=bad_timeout)  # type: ignore[arg-type]
                with pytest.raises(ConfigError):
                    await client.map([1], batch_size=0)
            with pytest.raises(RequestError) as batch:
                await client.map([1, 2, -3])
            assert batch.value.code == ErrorCode.NEGATIVE
            assert client.in_flight == 0
            assert await client.map(range(10), batch_size=1) == list(FAST_TABLE[:10])

    run(main)
    with pytest.raises(ConfigError):
        AsyncClient(URL, window=0)
    with pytest.raises(ConfigError):
        AsyncClient("http://nowhere")


def test_a_cancelled_call_gives_back_its_slot_and_pending_entry_at_once(queue):
    held: list[Any] = []
    stand_in = StandIn(queue, lambda ch, method, props, body: held.append(props))  # never answers
    try:

        async def main() -> None:
            async with AsyncClient(URL, queue=queue, timeout=30, window=1) as client:
                task = asyncio.create_task(client.call(30))
                while not held:  # the request reached the "server"
                    await asyncio.sleep(0.01)
                assert client.in_flight == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert client.in_flight == 0
                # The one slot is free: this call times out waiting for its reply, not
                # for the window.
                with pytest.raises(CallTimeoutError, match="No reply"):
                    await client.call(31, timeout=0.5)
                assert client.in_flight == 0

        run(main)
        # The request sent carries its deadline for the worker to skip it.
        assert held[0].expiration is not None
    finally:
        stand_in.close()


def test_a_full_window_waits_without_blocking_then_times_out(queue):
    stand_in = StandIn(queue, lambda ch, method, props, body: None)
    try:

        async def main() -> None:
            async with AsyncClient(URL, queue=queue, timeout=2, window=2) as client:
                first = [asyncio.create_task(client.call(i)) for i in range(2)]
                await asyncio.sleep(0.1)
                started = time.monotonic()
                with pytest.raises(CallTimeoutError, match="window of 2"):
                    await client.call(5, timeout=0.3)
                assert time.monotonic() - started < 0.3 + MARGIN
                for task in first:
                    with pytest.raises(CallTimeoutError):
                        await task

        run(main)
    finally:
        stand_in.close()


def test_leaving_imap_early_frees_the_window(serve, queue):
    serve(workers=1)

    async def main() -> None:
        async with AsyncClient(URL, queue=queue, window=4, timeout=30) as client:
            values = client.imap(range(10_000), batch_size=10)
            async with contextlib.aclosing(values):
                async for value in values:
                    assert value == 0
                    break
            assert client.in_flight == 0
            assert await client.map(range(91)) == list(FAST_TABLE[:91])

    run(main)


def test_no_server_fails_the_call_naming_the_queue(queue, broker):
    broker.queue_declare(queue, durable=True)  # the queue exists; nothing consumes it

    async def main() -> None:
        async with AsyncClient(URL, queue=queue, timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(NoServerError, match=queue):
                await client.call(30)
            assert time.monotonic() - started < 5

    run(main)


def test_closing_fails_the_calls_in_flight_and_later_calls(queue):
    stand_in = StandIn(queue, lambda ch, method, props, body: None)
    try:

        async def main() -> None:
            client = AsyncClient(URL, queue=queue, timeout=30)
            with pytest.raises(ClientClosedError, match="not connected"):
                await client.call(1)
            await client.connect()
            task = asyncio.create_task(client.call(30))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await client.close()
            assert time.monotonic() - started < 1 + MARGIN
            with pytest.raises(ClientClosedError):
                await task
            with pytest.raises(ClientClosedError):
                await client.call(1)

        run(main)
    finally:
        stand_in.close()


def test_a_client_serves_only_its_own_loop_s_thread(serve, queue):
    serve(workers=1)

    async def main() -> None:
        async with AsyncClient(URL, queue=queue, timeout=10) as client:
            errors: list[BaseException] = []

            def elsewhere() -> None:
                try:
                    asyncio.run(client.call(5))
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=elsewhere)
            thread.start()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
            assert len(errors) == 1 and isinstance(errors[0], ClientClosedError)
            assert await client.call(5) == 5

    run(main)


def test_an_unreachable_broker_is_a_clear_error_on_connect():
    async def main() -> None:
        with pytest.raises(BrokerUnreachableError):
            async with AsyncClient("amqp://guest:guest@127.0.0.1:1/%2F", timeout=2):
                pass

    run(main)


def _fib(n: int) -> int:
    import gmpy2  # noqa: PLC0415

    return int(gmpy2.fib(n))


# -- the window (pure policy: no broker) --------------------------------------------------


def test_the_window_serves_waiters_first_come_first_served_and_passes_on_a_cancelled_slot():
    from fibrpc.aio import Window  # noqa: PLC0415

    async def main() -> None:
        window = Window(1)
        assert window.try_take()
        order: list[str] = []

        async def wait(name: str) -> None:
            assert await window.take(math.inf)
            order.append(name)

        first = asyncio.create_task(wait("first"))
        second = asyncio.create_task(wait("second"))
        cancelled = asyncio.create_task(wait("cancelled"))
        await asyncio.sleep(0)
        assert not window.try_take()  # three wait before us
        cancelled.cancel()
        window.give()  # to "first"
        await asyncio.sleep(0)
        window.give()  # to "second"
        await asyncio.sleep(0)
        assert order == ["first", "second"]
        await asyncio.gather(first, second)
        window.give()  # "cancelled" is gone: the slot is free
        window.give()
        assert window.free == 2

        # A slot given to a waiter cancelled before it ran is passed on, not lost.
        assert window.try_take() and window.try_take()
        lost = asyncio.create_task(window.take(math.inf))
        heir = asyncio.create_task(window.take(math.inf))
        await asyncio.sleep(0)
        window.give()
        lost.cancel()
        await asyncio.sleep(0)
        assert await heir

    asyncio.run(main())


def test_a_wait_for_the_window_fails_once_expire_finds_it_past_its_time():
    from fibrpc.aio import Window  # noqa: PLC0415

    async def main() -> None:
        window = Window(1)
        assert window.try_take()
        timed = asyncio.create_task(window.take(0.01))
        endless = asyncio.create_task(window.take(math.inf))
        await asyncio.sleep(0)
        assert window.expire(time.monotonic()) is True  # the timed one is not due yet
        assert window.expire(time.monotonic() + 1) is False  # now it is; none is left
        assert await timed is False
        window.give()
        assert await endless is True
        assert window.free == 0

    asyncio.run(main())


def test_leaving_imap_or_a_refused_map_leaves_no_unretrieved_exception(serve, queue):
    """asyncio reports a future whose exception nobody retrieved when it is collected:
    the calls imap abandons must not be such futures."""
    import gc  # noqa: PLC0415

    serve(workers=1)
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        async with AsyncClient(URL, queue=queue, window=8, timeout=30) as client:
            values = client.imap(range(10_000), batch_size=10)
            async with contextlib.aclosing(values):
                async for _ in values:
                    break
            with pytest.raises(RequestError):
                await client.map([*range(100), -1, *range(1000)], batch_size=10)
            await asyncio.sleep(0.2)  # the abandoned calls' replies come and go
            gc.collect()
            await asyncio.sleep(0)

    run(main)
    assert reported == []
