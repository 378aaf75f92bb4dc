"""The documentation tells the truth: every Python block in README.md and docs/ runs as
written against a real server (one on ``rpc_queue`` of a private node, so that no test
serves the local broker's ``rpc_queue``), every link resolves inside the repository, and
README.md stays a front door (at most 250 lines).

A block that is only a fragment (placeholders, a server elsewhere) says so on its first
line: ``# fragment``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_server
from privatenode import PrivateNode

from fibrpc import ClientClosedError
from fibrpc.kernels import FAST_TABLE

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 2
            code = match.group(1)
            if not code.lstrip().startswith("# fragment"):
                found.append((str(page.relative_to(ROOT)), line, code))
    return found


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A private node with ``fibrpc serve`` on its ``rpc_queue``: its URL."""
    from conftest import start_private_node  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        node: PrivateNode = start_private_node(stack, prefix="fibrpc-docs")
        url = node.url()
        server = start_server("rpc_queue", tmp_path_factory.mktemp("docs"), url=url)
        stack.callback(server.stop)
        yield url


def test_there_are_python_blocks_to_run():
    assert len(BLOCKS) >= 3, BLOCKS


@pytest.mark.broker
@pytest.mark.parametrize(("page", "line", "code"), BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_every_python_block_runs_as_written(served, page, line, code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(DEFAULT_URL, served), f"{page}:{line}", "exec"), {})
    printed = out.getvalue()
    # Where a block says what it prints (``print(x)  # 832040``), it prints that.
    for expected in re.findall(r"print\([^\n]*\)\s+#\s*([\w\[\]]+)\s*$", code, re.M):
        assert expected in printed, f"{page}:{line}: {expected!r} not in {printed!r}"


@pytest.mark.broker
def test_readme_s_fastapi_example_serves_fibonacci_and_maps_refusals_to_422(served):
    from fastapi.testclient import TestClient  # noqa: PLC0415

    [code] = [code for page, _, code in BLOCKS if page == "README.md" and "FastAPI(" in code]
    namespace: dict[str, object] = {}
    exec(compile(code.replace(DEFAULT_URL, served), "README.md (FastAPI)", "exec"), namespace)
    with TestClient(namespace["app"]) as http:  # runs the lifespan: connects, then closes
        assert http.get("/fib/30").json() == {"n": "30", "fib": "832040"}
        assert http.get("/fib/90", params={"algo": "iter"}).json()["fib"] == str(FAST_TABLE[90])
        refused = http.get("/fib/-1")
        assert refused.status_code == 422
        assert refused.json()["detail"].startswith("negative: ")
        assert http.get("/fib/5", params={"algo": "bogus"}).status_code == 422
    # The lifespan closed the client: nothing of it is left running.
    with pytest.raises(ClientClosedError):
        asyncio.run(namespace["fib"].call(1))  # type: ignore[attr-defined]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_link_resolves_inside_the_repository(page):
    for target in _LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path = target.split("#", 1)[0]
        if path:
            assert (page.parent / path).resolve().exists(), f"{page.name}: {target}"
            assert (
                ROOT in (page.parent / path).resolve().parents
                or (page.parent / path).resolve() == ROOT
            ), f"{page.name}: {target} leaves the repository"


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
