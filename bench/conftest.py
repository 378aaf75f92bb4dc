"""Fixtures of the benchmark suites, and the hook that makes ``pytest bench`` find them.

The suites are named ``bench_*.py`` so that the normal ``pytest`` run (``testpaths =
["tests"]``) never collects them; ``pytest_collect_file`` below collects them when bench/
is named on the command line. The end-to-end suite gets a real ``fibrpc serve`` on a
queue of its own, started here (bench/ does not import from tests/), and fails, never
skips, when no broker answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fibrpc import Client, bench

URL = os.environ.get("FIBRPC_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
SERVER_WORKERS = int(os.environ.get("FIBRPC_BENCH_WORKERS", "2"))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` in this folder as test modules (pytest itself collects a file
    named on the command line, so that one is left to it)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def server_queue() -> Iterator[str]:
    """The queue of a ``fibrpc serve --workers 2`` that lives for the whole session.

    It reuses ``fibrpc.bench.spawned_server``: a process group of its own, stopped (and
    its queue deleted) at the end, however the session ends.
    """
    try:
        with bench.spawned_server(URL, SERVER_WORKERS) as server:
            yield server.queue
    except bench.SpawnError as exc:
        pytest.fail(f"Could not start fibrpc serve for the benchmarks: {exc}", pytrace=False)


@pytest.fixture(scope="module")
def client(server_queue: str) -> Iterator[Client]:
    """A client of the session's server, with the default window."""
    try:
        c = Client(URL, queue=server_queue, timeout=30)
    except Exception as exc:
        pytest.fail(f"No RabbitMQ at {URL} ({exc}); start it with scripts/ensure-broker.sh")
    with contextlib.closing(c):
        yield c
