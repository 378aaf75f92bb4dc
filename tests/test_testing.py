"""The stand-ins of ``fibrpc.testing`` answer as a real server does: for the same inputs,
the same results, and the same errors (type, code and message), side by side with a real
``fibrpc serve`` on the broker under test (the pytest plugin's ``fibrpc_server``)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import gmpy2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from fibrpc import (
    CallTimeoutError,
    Client,
    ClientClosedError,
    ConfigError,
    ErrorCode,
    RequestError,
)
from fibrpc.aio import AsyncClient
from fibrpc.client import MAX_TIMEOUT, check_timeout
from fibrpc.config import Limits
from fibrpc.kernels import FAST_TABLE
from fibrpc.pytest_plugin import FibrpcServer
from fibrpc.testing import AsyncStubClient, StubClient

ALGOS = ["fast", "iter", "naive"]
SAME = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def real(fibrpc_server: FibrpcServer) -> Iterator[Client]:
    """A real client on the session's real server."""
    with fibrpc_server.client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def stub() -> Iterator[StubClient]:
    with StubClient(timeout=30) as client:
        yield client


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """What a call came to: its value, or its error's type, code and message."""
    try:
        return ("value", fn())
    except RequestError as exc:
        return ("error", type(exc).__name__, exc.code, exc.message)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))


def streamed(it: Iterator[int]) -> tuple[list[int], tuple[Any, ...] | None]:
    """The values an iterator yielded before it ended, and the error it ended with."""
    values: list[int] = []

    def drain() -> None:
        for value in it:
            values.append(value)

    ended = outcome(drain)
    return values, None if ended[0] == "value" else ended


def light(n: Any, algo: Any) -> bool:
    """Whether a call is quick on both sides (refusals are quick too)."""
    if type(n) is not int or n < 0:
        return True
    if algo == "naive":
        return n <= 25 or n > 35
    if algo == "fast":
        return n <= 200_000 or n > 10_000_000
    return True


#: Values of n a caller may pass: every kind of integer, and what is not one.
NS = st.one_of(
    st.integers(-5, 120),
    st.integers(-(10**30), 10**30),
    st.sampled_from([35, 36, 92, 93, 94, 10**7 + 1, 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.builds(np.int64, st.integers(0, 90)),
    st.builds(np.float64, st.floats(0, 90)),
)
ALGO = st.one_of(st.sampled_from([*ALGOS, "bogus", "", "FAST", "Fast "]), st.text(max_size=6))


@SAME
@given(n=NS, algo=ALGO)
@example(n=10**100, algo="fast")
@example(n=-1, algo="iter")
@example(n=3.0, algo="fast")
@example(n=True, algo="fast")
def test_a_call_gives_what_a_real_server_gives(real, stub, n, algo):
    assume(light(n, algo))
    for method in ("call", "call_text"):
        expected = outcome(lambda m=method: getattr(real, m)(n, algo=algo))
        assert outcome(lambda m=method: getattr(stub, m)(n, algo=algo)) == expected, method
    expected = outcome(lambda: real.submit(n, algo=algo).result(30))
    assert outcome(lambda: stub.submit(n, algo=algo).result(0)) == expected


@SAME
@given(
    ns=st.lists(st.one_of(st.integers(0, 93), NS), max_size=40),
    algo=ALGO,
    batch_size=st.sampled_from([None, 1, 2, 7, 1000]),
)
@example(ns=[1, 2, -3], algo="fast", batch_size=None)
@example(ns=[1, 2, 3.5, 4], algo="iter", batch_size=1)
@example(ns=[5, 94, 6], algo="iter", batch_size=2)
@example(ns=[], algo="bogus", batch_size=None)
def test_a_map_gives_what_a_real_server_gives_value_by_value_and_error_by_error(
    real, stub, ns, algo, batch_size
):
    assume(all(light(n, algo) for n in ns))
    expected = outcome(lambda: real.map(ns, algo=algo, batch_size=batch_size))
    assert outcome(lambda: stub.map(ns, algo=algo, batch_size=batch_size)) == expected
    # imap: the same values before the same error (the stub reads as far ahead).
    expected_stream = streamed(real.imap(ns, algo=algo, batch_size=batch_size))
    assert streamed(stub.imap(ns, algo=algo, batch_size=batch_size)) == expected_stream


def test_a_none_among_single_calls_is_refused_by_the_client(real, stub):
    assert outcome(lambda: real.map([1, None, 2], batch_size=1)) == outcome(
        lambda: stub.map([1, None, 2], batch_size=1)
    )


def test_a_none_among_single_calls_is_refused_by_the_asyncio_client(fibrpc_server):
    async def main(client: Any) -> tuple[Any, ...]:
        async with client:
            return await _async_outcome(client.map([1, None, 2], batch_size=1))

    real = asyncio.run(main(AsyncClient(fibrpc_server.url, queue=fibrpc_server.queue)))
    assert real == asyncio.run(main(AsyncStubClient()))


@pytest.mark.parametrize(
    ("ns", "batch_size", "code"),
    [
        ([0] * 100_001, 100_001, ErrorCode.BATCH_TOO_LARGE),  # the server's --max-batch
        # Negative n travel as JSON (a binary batch of at most --max-batch values is under
        # the 1 MiB a server reads; n past 64 bits are refused before sending): 22 bytes
        # an n.
        ([-(10**19)] * 60_000, 60_000, ErrorCode.BODY_TOO_LARGE),  # the server's 1 MiB
        ([-(10**19)] * 820_000, 820_000, ErrorCode.BODY_TOO_LARGE),  # the broker's 16 MiB
        # The server's 15 MiB of replies, in the binary form a batch asks for (87 KB each).
        ([10**6] * 200, 200, ErrorCode.REPLY_TOO_LARGE),
        ([30] * 3, 3, None),
    ],
    ids=["batch", "body", "broker-message", "reply", "fine"],
)
def test_the_limits_of_server_and_broker_are_the_same(real, stub, ns, batch_size, code):
    expected = outcome(lambda: real.map(ns, batch_size=batch_size))
    assert outcome(lambda: stub.map(ns, batch_size=batch_size)) == expected
    assert expected[0] == "value" if code is None else expected[2] == code


def test_a_huge_n_is_refused_alike_by_its_body_and_by_its_range(real, stub):
    for n in (10 ** (2 * 10**6), 10**7 + 1, 10**1000):
        assert outcome(lambda n=n: stub.call(n)) == outcome(lambda n=n: real.call(n))


def test_large_results_are_the_same_digits(real, stub):
    assert stub.call_text(10**6) == real.call_text(10**6) == gmpy2.fib(10**6).digits()
    ns = [10**5, 3, 10**5 + 1, 250_000]
    assert stub.map(ns) == real.map(ns) == [int(gmpy2.fib(n)) for n in ns]
    assert stub.map(range(94), algo="iter") == real.map(range(94), algo="iter")


@pytest.mark.parametrize("timeout", [0, -1, math.nan, "1", True, [], -math.inf])
def test_a_bad_timeout_is_the_same_config_error(real, stub, timeout):
    for call in (
        lambda c: c.call(1, timeout=timeout),
        lambda c: c.submit(1, timeout=timeout),
        lambda c: c.map([1], timeout=timeout),
    ):
        expected = outcome(lambda call=call: call(real))
        assert expected[1] == "ConfigError"
        assert outcome(lambda call=call: call(stub)) == expected


@pytest.mark.parametrize("batch_size", [0, -1, True])
def test_a_bad_batch_size_is_the_same_config_error(real, stub, batch_size):
    expected = outcome(lambda: real.map([1], batch_size=batch_size))
    assert expected[1] == "ConfigError"
    assert outcome(lambda: stub.map([1], batch_size=batch_size)) == expected


@pytest.mark.parametrize(
    "settings",
    [
        {"timeout": 0},
        {"window": 0},
        {"window": True},
        {"window": 1.5},
        {"heartbeat": -1},
        {"heartbeat": 65536},
        {"heartbeat": 1.5},
        {"heartbeat": "30"},
        {"queue": ""},
        {"queue": "q" * 256},
        {"url": "http://127.0.0.1/"},
        {"url": "amqp://"},
        {"url": ["amqp://127.0.0.1", "redis://x"]},
    ],
)
def test_bad_settings_are_the_same_config_error(settings):
    url = settings.pop("url", "amqp://guest:guest@127.0.0.1:5672/%2F")
    with pytest.raises(ConfigError) as real:
        Client(url, **settings)
    with pytest.raises(ConfigError) as stub:
        StubClient(url, **settings)
    assert str(stub.value) == str(real.value)
    with pytest.raises(ConfigError) as stub:
        AsyncStubClient(url, **settings)
    assert str(stub.value) == str(real.value)


def test_a_timeout_too_long_to_keep_is_no_deadline():
    # Past threading's limit (292 years) no deadline can be kept, and its milliseconds
    # would overflow a message's TTL: it is math.inf, on every client alike.
    assert check_timeout(1e308) == check_timeout(2e305) == check_timeout(10**400) == math.inf
    assert check_timeout(MAX_TIMEOUT) == MAX_TIMEOUT
    assert check_timeout(30) == 30.0


def test_a_call_slower_than_its_timeout_is_a_call_timeout_error_on_both(real, stub):
    for client in (real, stub):
        with pytest.raises(CallTimeoutError) as late:
            client.call(32, algo="naive", timeout=0.05)
        assert late.value.timeout == 0.05
        assert "No reply to fib(32) with 'naive' within 0.05 s" in str(late.value)
        future = client.submit(32, algo="naive", timeout=0.05)
        assert isinstance(future.exception(30), CallTimeoutError)


def test_a_closed_stub_refuses_calls_as_a_closed_client_does(fibrpc_server):
    stub = StubClient()
    with fibrpc_server.client() as real:
        values = real.imap(range(5000), batch_size=10)
        stubbed = stub.imap(range(5000), batch_size=10)
        assert next(values) == next(stubbed) == 0
        real.close()
        stub.close()
        for client in (real, stub):
            for call in (lambda c: c.call(1), lambda c: c.submit(1), lambda c: c.map([1])):
                assert outcome(lambda c=client, call=call: call(c)) == (
                    "error",
                    "ClientClosedError",
                    "The client is closed.",
                )
        # An imap left running when its client closed: the rest fails.
        with pytest.raises(ClientClosedError):
            list(values)
        with pytest.raises(ClientClosedError):
            list(stubbed)
    assert stub.in_flight == 0


def test_a_stub_counts_what_an_imap_has_read_ahead_and_leaves_nothing_in_flight():
    with StubClient(window=4) as stub:
        values = stub.imap(range(100), batch_size=10)
        assert next(values) == 0
        assert stub.in_flight == 3  # the window of 4, the first batch answered
        values.close()  # leaving the loop early
        assert stub.in_flight == 0
        assert stub.map(itertools.islice(itertools.count(), 5000)) == [
            FAST_TABLE[n] if n < 94 else int(gmpy2.fib(n)) for n in range(5000)
        ]
        assert stub.in_flight == 0


def test_a_stub_takes_the_limits_of_a_server_run_with_other_options():
    with StubClient(limits=Limits(naive_max_n=20)) as stub:
        assert stub.call(20, algo="naive") == 6765
        with pytest.raises(RequestError) as refused:
            stub.call(21, algo="naive")
        assert refused.value.code == ErrorCode.OUT_OF_RANGE
        assert "--naive-max-n" in refused.value.message


def test_the_same_limits_refuse_the_same_calls_on_a_server_started_with_them(fibrpc_serve):
    server = fibrpc_serve("--naive-max-n", "20", "--max-batch", "5")
    limits = Limits(naive_max_n=20, max_batch=5)
    with server.client(timeout=10) as real, StubClient(limits=limits) as stub:
        for fn in (
            lambda c: c.call(21, algo="naive"),
            lambda c: c.map(range(6), batch_size=6),
            lambda c: c.map(range(5), batch_size=5),
        ):
            assert outcome(lambda fn=fn: fn(stub)) == outcome(lambda fn=fn: fn(real))


def test_importing_the_plugin_or_the_stand_ins_loads_no_kernels():
    code = (
        "import sys, pytest, fibrpc\n"
        "before = set(sys.modules)\n"
        "import fibrpc.pytest_plugin\n"
        "print(sorted(set(sys.modules) - before))\n"
        "import fibrpc.testing\n"
        "print(sorted({'numba', 'gmpy2', 'fibrpc.handler', 'fibrpc.kernels'} & set(sys.modules)))\n"
        "fibrpc.testing.StubClient().call(93, algo='iter')\n"
        "print('numba' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    # The plugin adds nothing but itself, its defaults and the way to start a server (both
    # pure standard library) to what fibrpc loads; numba loads on first use.
    assert out.splitlines() == [
        "['fibrpc.config', 'fibrpc.pytest_plugin', 'fibrpc.serving']",
        "[]",
        "True",
    ]


# -- the asyncio stand-in ----------------------------------------------------------------


#: Calls of an asyncio client, each a function of the client to an awaitable.
ASYNC_CALLS: list[Callable[[Any], Any]] = [
    lambda c: c.call(30),
    lambda c: c.call(94, algo="iter"),
    lambda c: c.call(-1),
    lambda c: c.call("30"),
    lambda c: c.call(30, algo="bogus"),
    lambda c: c.call(1, timeout=0),
    lambda c: c.call(10**7 + 1),
    lambda c: c.call_text(10**5),
    lambda c: c.map([1, 2, 3, 94], algo="naive"),
    lambda c: c.map([1, 2, 3, 94], algo="naive", batch_size=1),
    lambda c: c.map(range(200)),
    lambda c: c.map([1, True], batch_size=2),
    lambda c: c.map([1], batch_size=0),
    lambda c: c.map([0] * 100_001, batch_size=100_001),
    lambda c: _collect(c.imap(range(300), algo="iter", batch_size=7)),
    lambda c: _collect(c.imap([5, 6, 94, 7], algo="iter", batch_size=1)),
]


async def _collect(values: Any) -> tuple[list[int], tuple[Any, ...] | None]:
    got: list[int] = []

    async def drain() -> None:
        async for value in values:
            got.append(value)

    ended = await _async_outcome(drain())
    return got, None if ended[0] == "value" else ended


def test_the_async_stub_gives_what_the_asyncio_client_and_a_real_server_give(fibrpc_server):
    async def outcomes(client: Any) -> list[tuple[Any, ...]]:
        async with client:
            return [await _async_outcome(call(client)) for call in ASYNC_CALLS]

    real = asyncio.run(outcomes(AsyncClient(fibrpc_server.url, queue=fibrpc_server.queue)))
    assert asyncio.run(outcomes(AsyncStubClient())) == real
    assert real[0] == ("value", 832040)


def test_the_stand_ins_have_the_clients_api():
    for stand_in, client in ((StubClient, Client), (AsyncStubClient, AsyncClient)):
        public = {name for name in dir(client) if not name.startswith("_")}
        assert public <= set(dir(stand_in)), public - set(dir(stand_in))
        for name in sorted(public | {"__init__"}):
            if isinstance(getattr(client, name), property):
                continue
            real = inspect.signature(getattr(client, name))
            stub = inspect.signature(getattr(stand_in, name))
            if name == "__init__":  # the stub's takes two more: limits, memo_bytes
                assert list(stub.parameters)[: len(real.parameters)] == list(real.parameters)
                assert [p.default for p in real.parameters.values()] == [
                    stub.parameters[p].default for p in real.parameters
                ]
            else:
                assert stub == real, name
            assert inspect.iscoroutinefunction(getattr(stand_in, name)) == (
                inspect.iscoroutinefunction(getattr(client, name))
            ), name


async def _async_outcome(awaitable: Any) -> tuple[Any, ...]:
    try:
        return ("value", await awaitable)
    except RequestError as exc:
        return ("error", type(exc).__name__, exc.code, exc.message)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))


def test_the_async_stub_computes_heavy_calls_off_the_event_loop_and_keeps_their_deadline():
    async def main() -> tuple[float, float, float]:
        async with AsyncStubClient() as stub:
            ticks: list[float] = []

            async def ticker() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(ticker())
            value = await stub.call(30, algo="naive")  # heavy: in a thread
            assert value == 832040
            started = time.monotonic()
            with pytest.raises(CallTimeoutError):
                await stub.call(33, algo="naive", timeout=0.1)  # about 0.5 s of work
            late = time.monotonic() - started
            started = time.monotonic()
            call = asyncio.create_task(stub.call(33, algo="naive"))
            await asyncio.sleep(0.05)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            cancelled = time.monotonic() - started
            task.cancel()
            gap = max(b - a for a, b in itertools.pairwise(ticks))
            assert stub.in_flight == 0
            return gap, late, cancelled

    gap, late, cancelled = asyncio.run(main())
    assert gap < 0.1, f"the event loop stalled {gap:.3f} s"
    assert late < 0.3, f"the timeout of 0.1 s came after {late:.3f} s"
    assert cancelled < 0.3, f"the cancelled call returned after {cancelled:.3f} s"


def test_an_async_stub_not_connected_or_closed_refuses_calls_as_the_asyncio_client_does():
    async def refusals(client: Any) -> list[tuple[Any, ...]]:
        before = [await _async_outcome(call(client)) for call in ASYNC_CALLS[:3]]
        await client.close()
        after = [await _async_outcome(call(client)) for call in ASYNC_CALLS]
        return [*before, *after, await _async_outcome(client.connect())]

    expected = asyncio.run(refusals(AsyncClient()))
    assert asyncio.run(refusals(AsyncStubClient())) == expected
    assert expected[0][:2] == ("error", "ClientClosedError")
