"""The pytest plugin, as an application meets it: a pytest session of its own
(``runpytest_subprocess``), which loads the plugin from the installed package's entry
point, with test modules that have no fibrpc code of their own, on the broker under test."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pika
import pytest
from conftest import URL

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parent.parent
#: Seconds an inner session may take (it starts a server or two).
INNER_TIMEOUT = 90
INI = "[pytest]\nfilterwarnings = error\naddopts = -p no:cacheprovider\n"
#: Where a session's test reports the server it saw: url, queue and pid.
REPORT = """
import json, pathlib


def report(server, name):
    path = pathlib.Path(__file__).parent / f"{name}.json"
    path.write_text(json.dumps({"url": server.url, "queue": server.queue, "pid": server.pid}))
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An application's pytest session on the broker under test."""
    return pytester.runpytest_subprocess(f"--fibrpc-url={URL}", *args, timeout=INNER_TIMEOUT)


def example_blocks() -> list[tuple[str, str]]:
    """The documented test modules that this file runs: (where, code)."""
    found = []
    for page in (ROOT / "README.md", ROOT / "docs" / "testing.md"):
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            if "run by tests/test_pytest_plugin.py" in match.group(1).split("\n", 1)[0]:
                found.append((f"{page.name}:{text[: match.start()].count(chr(10)) + 2}", match[1]))
    return found


EXAMPLES = example_blocks()


def gone(report: dict[str, object]) -> None:
    """Assert that the server of ``report`` and its queue are gone."""
    with pytest.raises(ProcessLookupError):
        os.killpg(int(report["pid"]), 0)  # type: ignore[call-overload]
    connection = pika.BlockingConnection(pika.URLParameters(str(report["url"])))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as missing:
            connection.channel().queue_declare(str(report["queue"]), passive=True)
        assert missing.value.reply_code == 404
    finally:
        connection.close()


def test_the_documented_examples_are_found():
    assert len(EXAMPLES) >= 2, EXAMPLES


@pytest.mark.broker
@pytest.mark.parametrize(("where", "code"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_an_applications_documented_tests_pass_with_no_fibrpc_code_of_their_own(
    pytester, where, code
):
    pytester.makeini(INI)
    pytester.makepyfile(test_app=code)
    result = run(pytester, "-v")
    outcomes = result.parseoutcomes()
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert outcomes["passed"] >= 3 and set(outcomes) <= {"passed"}, outcomes


@pytest.mark.broker
def test_the_server_and_its_queue_are_gone_after_failed_tests_and_a_crashed_server(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(
        report=REPORT,
        test_app="""
import os, signal
from report import report


def test_fails_with_the_session_server(fibrpc_server, fibrpc_client):
    report(fibrpc_server, "session")
    assert fibrpc_client.call(30) == 832040
    assert False, "a failing test"


def test_crashes_a_server_of_its_own_and_fails(fibrpc_serve):
    server = fibrpc_serve("--naive-max-n", "25")
    report(server, "crashed")
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert False, "a failing test after a crash"


def test_errors_in_the_middle(fibrpc_serve):
    report(fibrpc_serve(workers=2), "errored")
    raise RuntimeError("an error")
""",
    )
    result = run(pytester)
    result.assert_outcomes(failed=3)
    for name in ("session", "crashed", "errored"):
        gone(json.loads((pytester.path / f"{name}.json").read_text()))


@pytest.mark.broker
def test_a_crashed_session_server_fails_the_next_client_with_its_log(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(
        test_app="""
import os, signal


def test_crash(fibrpc_server):
    os.kill(fibrpc_server.pid, signal.SIGKILL)
    fibrpc_server.proc.wait(10)


def test_next(fibrpc_client):
    pass
"""
    )
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fibrpc serve on queue 'fibrpc-test-*' exited with code -9*"])
    result.stdout.fnmatch_lines(["*ready: 1 worker(s) consuming*"])  # its log


@pytest.mark.broker
def test_fibrpc_url_is_the_broker_of_the_fixtures(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(
        report=REPORT,
        test_app="""
from report import report


def test_served_there(fibrpc_broker_url, fibrpc_server, fibrpc_client):
    assert fibrpc_server.url == fibrpc_broker_url
    assert fibrpc_client.url == fibrpc_broker_url
    assert fibrpc_client.call(90, algo="iter") == 2880067194370816120
    report(fibrpc_server, "served")
""",
    )
    run(pytester).assert_outcomes(passed=1)
    assert json.loads((pytester.path / "served.json").read_text())["url"] == URL
    # Nothing answers there: the test errors at once, saying so.
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "--fibrpc-url=amqp://guest:guest@127.0.0.1:1/%2F", timeout=INNER_TIMEOUT
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*No fibrpc server could be started*127.0.0.1:1*"])
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("option", "ini", "env", "expected"),
    [
        ("amqp://option/%2F", "amqp://ini/%2F", "amqp://env/%2F", "amqp://option/%2F"),
        (None, "amqp://ini/%2F", "amqp://env/%2F", "amqp://ini/%2F"),
        (None, None, "amqp://env/%2F", "amqp://env/%2F"),
        (None, None, None, "amqp://guest:guest@127.0.0.1:5672/%2F"),
    ],
    ids=["option", "ini", "env", "default"],
)
def test_the_broker_url_comes_from_the_option_the_ini_the_environment_or_the_default(
    pytester, monkeypatch, option, ini, env, expected
):
    pytester.makeini(INI + (f"fibrpc_url = {ini}\n" if ini else ""))
    pytester.makepyfile(
        f"""
def test_url(fibrpc_broker_url):
    assert fibrpc_broker_url == {expected!r}
"""
    )
    if env:
        monkeypatch.setenv("FIBRPC_URL", env)
    else:
        monkeypatch.delenv("FIBRPC_URL", raising=False)
    args = [f"--fibrpc-url={option}"] if option else []
    pytester.runpytest_subprocess(*args, timeout=INNER_TIMEOUT).assert_outcomes(passed=1)


@pytest.mark.broker
def test_a_conftest_may_name_the_broker_by_overriding_the_fixture(pytester):
    pytester.makeini(INI)
    pytester.makeconftest(
        f"""
import pytest


@pytest.fixture(scope="session")
def fibrpc_broker_url():
    return {URL!r}
"""
    )
    pytester.makepyfile(
        """
def test_there(fibrpc_server, fibrpc_client):
    assert fibrpc_client.call(30) == 832040
"""
    )
    pytester.runpytest_subprocess(timeout=INNER_TIMEOUT).assert_outcomes(passed=1)


def test_a_session_that_uses_no_fixture_pays_nothing_and_sees_no_warning(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(
        """
import sys


def test_nothing_heavy():
    assert "fibrpc.pytest_plugin" in sys.modules  # loaded from the entry point
    heavy = {"pika", "numba", "gmpy2", "fibrpc.client", "fibrpc.testing", "fibrpc.handler"}
    assert not heavy & set(sys.modules)
"""
    )
    result = pytester.runpytest_subprocess("-W", "error", timeout=INNER_TIMEOUT)
    result.assert_outcomes(passed=1, warnings=0)
    helped = pytester.runpytest_subprocess("--help", timeout=INNER_TIMEOUT)
    assert helped.ret == pytest.ExitCode.OK, helped.stderr.str()
    helped.stdout.fnmatch_lines(["*--fibrpc-url=URL*", "*127.0.0.1:5672/%2F*", "*fibrpc_url*"])
    left_out = pytester.runpytest_subprocess("-p", "no:fibrpc", timeout=INNER_TIMEOUT)
    left_out.assert_outcomes(failed=1)  # no plugin: not in sys.modules
