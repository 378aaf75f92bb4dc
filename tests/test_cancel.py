"""Work whose caller has gone stops (#24, part 1), on real servers and a real broker.

A one-worker server with ``--naive-max-n 40``: naive(40) takes many seconds. Each way a
caller gives up (a timeout, ``Future.cancel()``, a cancelled asyncio task, ``close()``
with the call in flight, leaving ``imap`` early) must free the worker: checked through
the next call (answered) and the server's own counts (``Client.describe``: abandoned 1,
poison 0, the worker replaced once), never by timing. How soon is bench/cancel.py's.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import URL
from test_metrics import free_port, key, value, wait_for_scrape

from fibrpc import CallTimeoutError, Client, ClientClosedError
from fibrpc.aio import AsyncClient
from fibrpc.describe import Description

#: Every wait here is bounded by this.
BOUND = 60.0
HEAVY = ("--naive-max-n", "40")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def server(serve: Any, state_dir: Path, metrics_port: int) -> Any:
    """One worker, naive up to 40, reporting to its own state directory and serving its
    Prometheus metrics on ``metrics_port``."""
    options = (*HEAVY, "--metrics-port", str(metrics_port))
    return serve(*options, workers=1, env={"FIBRPC_STATE_DIR": str(state_dir)})


def described(client: Client) -> Description:
    """The server's description (it answers within the bound)."""
    deadline = time.monotonic() + BOUND
    while True:
        found = client.describe(0.5)
        if found:
            [description] = found
            return description
        assert time.monotonic() < deadline, "the server did not describe itself"


def wait_until(client: Client, check: Any) -> Description:
    deadline = time.monotonic() + BOUND
    while True:
        description = described(client)
        if check(description):
            return description
        assert time.monotonic() < deadline, f"never true: {description}"


def busy(description: Description) -> bool:
    return any(w.busy_seconds is not None for w in description.workers)


def freed(client: Client, server: Any) -> Description:
    """The next heavy call is answered, and the server counts one abandoned naive call,
    no poison, and one replacement of its worker; returns its description."""
    assert client.call(25, algo="naive", timeout=BOUND) == 75025
    description = wait_until(
        client, lambda d: d.counts.get("naive") and d.counts["naive"].abandoned
    )
    naive = description.counts["naive"]
    assert naive.abandoned == 1
    assert naive.poison == 0
    assert all(c.poison == 0 for c in description.counts.values())
    [worker] = description.workers
    assert worker.restarts == 1
    assert not worker.stuck
    log = server.text
    assert "abandoning request" in log
    assert "counts as a delivery" not in log  # nothing became a suspect
    assert "poison" not in log.lower()
    return description


def test_a_timed_out_heavy_call_frees_its_worker_and_is_never_charged(server, metrics_port):
    with Client(URL, queue=server.queue, timeout=BOUND) as client:
        with pytest.raises(CallTimeoutError):
            client.call(40, algo="naive", timeout=1)
        freed(client, server)
        assert "its deadline passed while it was computed" in server.text
    # Prometheus counts it too, though the worker that abandoned it is gone.
    samples = wait_for_scrape(
        metrics_port, {key("fibrpc_requests_total", algo="naive", outcome="abandoned"): 1}
    )
    assert value(samples, "fibrpc_requests_total", algo="naive", outcome="ok") == 1
    # the abandoning worker was replaced once (a restart; freed() checked that nothing
    # was charged as a crash)
    assert value(samples, "fibrpc_worker_restarts_total") == 1


def test_a_cancelled_future_frees_its_worker(server):
    with Client(URL, queue=server.queue, timeout=BOUND) as client:
        future = client.submit(40, algo="naive", timeout=BOUND)
        wait_until(client, busy)
        assert future.cancel()
        assert future.cancelled()
        freed(client, server)
        assert "its caller cancelled it" in server.text


def test_closing_a_client_with_a_call_in_flight_frees_the_worker(server):
    with Client(URL, queue=server.queue, timeout=BOUND) as watcher:
        leaving = Client(URL, queue=server.queue, timeout=BOUND)
        future = leaving.submit(40, algo="naive")
        wait_until(watcher, busy)
        leaving.close()
        with pytest.raises(ClientClosedError):
            future.result(timeout=BOUND)
        freed(watcher, server)


def test_leaving_imap_early_frees_the_worker(server):
    with Client(URL, queue=server.queue, timeout=BOUND) as client:
        stream = client.imap([20, 40], algo="naive", batch_size=1)
        assert next(stream) == 6765
        wait_until(client, busy)
        stream.close()
        freed(client, server)


def test_a_cancelled_asyncio_task_frees_the_worker(server):
    async def give_up() -> None:
        async with AsyncClient(URL, queue=server.queue, timeout=BOUND) as client:
            task = asyncio.create_task(client.call(40, algo="naive"))
            deadline = time.monotonic() + BOUND
            while not any(
                w.busy_seconds is not None for d in await client.describe(0.5) for w in d.workers
            ):
                assert time.monotonic() < deadline
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await client.call(25, algo="naive", timeout=BOUND) == 75025

    asyncio.run(give_up())
    with Client(URL, queue=server.queue, timeout=BOUND) as client:
        freed(client, server)


def test_a_storm_of_cancelled_calls_is_a_few_messages_and_the_others_are_answered(server):
    with Client(URL, queue=server.queue, timeout=BOUND, window=10_000) as storm:
        futures = [storm.submit(n % 90, algo="iter") for n in range(10_000)]
        for future in futures:
            future.cancel()
        with Client(URL, queue=server.queue, timeout=BOUND) as other:
            assert other.map(range(90), algo="iter")[89] == 1779979416004714189
            deadline = time.monotonic() + BOUND
            while storm._driver.cancels_sent == 0 or storm.in_flight:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # the cancels went in a handful of messages, however many were cancelled
            assert 1 <= storm._driver.cancels_sent <= 20, storm._driver.cancels_sent
            description = described(other)
    [worker] = description.workers
    assert worker.restarts == 0  # light work is never abandoned by ending the worker
    assert all(c.poison == 0 for c in description.counts.values())
    assert description.counts["iter"].served >= 1  # light calls go on being answered
