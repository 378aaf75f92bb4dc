"""Logging set-up for every command: human-readable text, or JSON lines for collectors.

Both formats carry the time, the level, the logger (named after its module) and the
process id, so that the lines of a supervisor and its workers can be told apart. ``json``
writes one object per line::

    {"time": "2024-05-01T12:00:00.123Z", "level": "INFO", "logger": "fibrpc.supervisor",
     "pid": 1234, "message": "ready: 4 worker(s) consuming 'rpc_queue' in 0.41 s ..."}

with ``exc_info`` (the formatted traceback) when a line has one. Messages never hold a
password: every URL is logged through ``fibrpc.urls.redact``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final

#: The text format: time, pid, level, logger, message.
TEXT_FORMAT: Final = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

FORMATS: Final = ("text", "json")
LEVELS: Final = ("debug", "info", "warning", "error")


class JSONFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (UTC time, millisecond precision)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line: time, level, logger, pid, message[, exc_info]."""
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, object] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send the root logger's records to stderr at ``level`` in format ``fmt``
    (``text`` or ``json``), replacing any handler set before; turn pika's loggers down.

    Raises ``ValueError`` for a level or format not in ``LEVELS`` or ``FORMATS``.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"{level!r} is not a log level; use one of {', '.join(LEVELS)}.")
    if fmt not in FORMATS:
        raise ValueError(f"{fmt!r} is not a log format; use one of {', '.join(FORMATS)}.")
    handler = logging.StreamHandler(sys.stderr)
    formatter = JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_pika()
    # numba logs every step of compiling at debug: thousands of lines that would bury a
    # worker's own debug lines (each request, by its correlation id).
    logging.getLogger("numba").setLevel(max(logging.INFO, root.level))


def quiet_pika() -> None:
    """Turn pika's own loggers down: they log every reconnect and close at ERROR."""
    logging.getLogger("pika").setLevel(logging.CRITICAL)
