"""Logging: `--log-format json` writes one JSON object a line, for log collectors, from the
supervisor and every worker; `--log-level` filters; no line carries a password."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
from conftest import URL

from fibrpc import Client
from fibrpc.logs import JSONFormatter, setup
from fibrpc.status import queue_counts


def record(message: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("fibrpc.test", logging.WARNING, __file__, 1, message, args, exc_info)


def test_a_json_line_has_time_level_logger_pid_and_the_formatted_message():
    line = json.loads(JSONFormatter().format(record("worker %d (pid %d) died", 0, 123)))
    assert set(line) == {"time", "level", "logger", "pid", "message"}
    assert line["level"] == "WARNING"
    assert line["logger"] == "fibrpc.test"
    assert line["message"] == "worker 0 (pid 123) died"
    assert isinstance(line["pid"], int)
    assert line["time"].endswith("Z") and "T" in line["time"]


def test_a_json_line_carries_the_traceback_and_stays_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        text = JSONFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert "\n" not in text
    line = json.loads(text)
    assert "Traceback" in line["exc_info"]
    assert "ValueError: bad\nvalue" in line["exc_info"]


def test_setup_refuses_an_unknown_format_or_level():
    with pytest.raises(ValueError, match="'xml' is not a log format"):
        setup("info", "xml")
    with pytest.raises(ValueError, match="'loud' is not a log level"):
        setup("loud", "text")


def test_serve_logs_json_lines_from_the_supervisor_and_its_workers(serve, queue):
    server = serve("--log-format", "json", workers=2)
    with Client(URL, queue=queue) as client:
        client.call(30)
    assert server.stop() == 0
    lines = [json.loads(line) for line in server.text.splitlines() if line.strip()]
    loggers = {line["logger"] for line in lines}
    assert {"fibrpc.supervisor", "fibrpc.server"} <= loggers
    assert len({line["pid"] for line in lines}) == 3  # the supervisor and two workers
    assert any(line["message"].startswith("ready: 2 worker(s)") for line in lines)
    assert "guest:guest" not in server.text
    assert "amqp://guest:***@" in server.text


def test_log_level_warning_keeps_info_lines_out(serve, queue):
    server = serve("--log-level", "warning", workers=1, wait=False)  # no "ready:" to wait for
    deadline = time.monotonic() + 60
    while queue_counts([URL], queue)[1] in (None, (0, 0)) and time.monotonic() < deadline:
        time.sleep(0.1)
    with Client(URL, queue=queue, timeout=60) as client:
        assert client.call(30) == 832040  # served, so every worker was up
    assert server.stop() == 0
    assert " INFO " not in server.text
