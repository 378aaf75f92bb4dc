"""``fibrpc status``: the queue as RabbitMQ sees it, and the servers on this machine.

Three sources, each optional but the first:

* the broker, over AMQP (a passive ``queue_declare``): the messages waiting in the queue
  and its consumers. When the broker cannot be reached, the command says so and exits
  ``BROKER_UNREACHABLE`` after showing what it learned elsewhere;
* RabbitMQ's management API (HTTP, with the AMQP URL's user unless the management URL
  names one): message rates. It is a plugin that is often off; then the report says
  where it looked and how to turn it on, and everything else still works;
* every server on the queue, on any machine, as it describes itself
  (``Client.describe``: a describe on the request queue's path, with the client's
  permissions): version, workers, per-algorithm counts, and a sign on a stuck worker;
* the state files of the servers on this machine (``fibrpc.state``): each worker's pid,
  uptime, requests served, errors and restarts.

``gather`` collects a plain dict (what ``--json`` prints), ``render`` turns it into text.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from fibrpc import amqp, refusals, state
from fibrpc.config import MANAGEMENT_PORT, MANAGEMENT_TIMEOUT
from fibrpc.errors import AccessRefusedError, ConfigError, FibrpcError
from fibrpc.exitcodes import ExitCode, for_error
from fibrpc.tls import TLSOptions
from fibrpc.urls import check_management_url, redact

#: The management API's rate fields, as reported here.
_RATES: Final = {
    "publish": "publish_details",
    "deliver": "deliver_get_details",
    "ack": "ack_details",
    "redeliver": "redeliver_details",
}


def default_management_url(url: str) -> str:
    """``http://HOST:15672``, HOST being the broker's host in the AMQP ``url``."""
    try:
        host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    except ValueError:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{MANAGEMENT_PORT}"


def queue_counts(
    urls: Sequence[str],
    queue: str,
    tls: TLSOptions | None = None,
    timeout: float = amqp.CONNECT_TIMEOUT,
) -> tuple[str, tuple[int, int] | None]:
    """The node that answered (the first of ``urls`` that did), and the messages ready in
    ``queue`` and its consumers there (None if it does not exist). ``timeout`` (seconds)
    bounds the opening of each connection.

    Raises ``BrokerUnreachableError``, ``AccessRefusedError`` (naming the permission to
    add when the passive declare itself was refused) or ``ConfigError``.
    """
    conn, node = amqp.connect_any(urls, name="fibrpc-status", tls=tls, connect_timeout=timeout)
    url = urls[node]
    try:
        try:
            with amqp.translating(url):
                return url, amqp.queue_counts(conn, queue)
        except AccessRefusedError as exc:
            # The passive declare itself was refused (RabbitMQ 4.2.6 and later want a
            # permission on the queue): say which one to add.
            code = getattr(exc.__cause__, "reply_code", None)
            if not isinstance(code, int):
                raise
            text = str(getattr(exc.__cause__, "reply_text", ""))
            raise AccessRefusedError(
                refusals.probe_refused(queue, code, text), url=redact(url)
            ) from exc
    finally:
        amqp.close_within(conn)


def management_stats(
    management_url: str, url: str, queue: str, timeout: float = MANAGEMENT_TIMEOUT
) -> dict[str, Any]:
    """What the management API says of ``queue``: ``{"url", "reachable", "error",
    "rates", "messages_unacknowledged"}``. Never raises: a failure is in ``error``."""
    result: dict[str, Any] = {
        "url": redact(management_url),
        "reachable": False,
        "error": None,
        "rates": None,
        "messages_unacknowledged": None,
    }
    try:
        check_management_url(management_url)
    except ConfigError as exc:
        result["error"] = exc.message
        return result
    base, user, password = _management_target(management_url, url)
    result["url"] = redact(base)
    vhost = _vhost(url)
    address = (
        f"{base.rstrip('/')}/api/queues/"
        f"{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(queue, safe='')}"
    )
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    request = urllib.request.Request(
        address, headers={"Authorization": f"Basic {token}", "Accept": "application/json"}
    )
    shown = result["url"]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        result["reachable"] = True
        if exc.code in (401, 403):
            result["error"] = (
                f"the management API at {shown} refused user {user!r} (HTTP {exc.code}); it "
                "needs a user with the 'monitoring' or 'management' tag"
            )
        elif exc.code == 404:
            result["error"] = (
                f"the management API at {shown} does not know queue {queue!r} in vhost "
                f"{vhost!r} (HTTP 404)"
            )
        else:
            result["error"] = f"the management API at {shown} answered HTTP {exc.code}"
        return result
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        result["error"] = (
            f"management API not reachable at {shown} ({reason}); enable the "
            "rabbitmq_management plugin, or point --management-url at it"
        )
        return result
    except ValueError:
        result["reachable"] = True
        result["error"] = f"the management API at {shown} did not answer with JSON"
        return result
    result["reachable"] = True
    return {**result, **parse_queue_stats(body)}


def parse_queue_stats(body: Any) -> dict[str, Any]:
    """The rates (messages per second) and unacked messages in a management API queue
    object (``GET /api/queues/VHOST/NAME``); 0.0 for a rate the broker has not measured
    (a queue with no traffic yet has no ``message_stats``)."""
    stats = body.get("message_stats") if isinstance(body, dict) else None
    stats = stats if isinstance(stats, dict) else {}
    rates: dict[str, float] = {}
    for name, field in _RATES.items():
        details = stats.get(field)
        rate = details.get("rate") if isinstance(details, dict) else None
        rates[name] = float(rate) if isinstance(rate, int | float) else 0.0
    unacked = body.get("messages_unacknowledged") if isinstance(body, dict) else None
    return {
        "rates": rates,
        "messages_unacknowledged": unacked if isinstance(unacked, int) else None,
    }


def gather(
    urls: str | Sequence[str],
    queue: str,
    *,
    tls: TLSOptions | None = None,
    management_url: str | None = None,
    state_dir: Path | None = None,
    now: float | None = None,
    timeout: float = amqp.CONNECT_TIMEOUT,
    describe_wait: float = 0.0,
) -> tuple[dict[str, Any], FibrpcError | None]:
    """Everything ``fibrpc status`` reports, as a JSON-ready dict, and the broker error
    that stopped it from counting the queue (None when it could). ``urls``: the broker's
    nodes; the first that answers is asked, and ``report["url"]`` names it.
    ``describe_wait``: seconds to wait for the servers' descriptions (0: none asked)."""
    now = time.time() if now is None else now
    nodes = (urls,) if isinstance(urls, str) else tuple(urls)
    url = nodes[0]
    report: dict[str, Any] = {
        "queue": queue,
        "url": redact(url),
        "exists": None,
        "messages": None,
        "consumers": None,
        "broker_error": None,
    }
    error: FibrpcError | None = None
    try:
        url, counts = queue_counts(nodes, queue, tls, timeout)
    except FibrpcError as exc:
        error = exc
        report["broker_error"] = str(exc)
    else:
        report["url"] = redact(url)
        report["exists"] = counts is not None
        if counts is not None:
            report["messages"], report["consumers"] = counts
    if error is None:
        report["management"] = management_stats(
            management_url or default_management_url(url), url, queue
        )
    else:
        report["management"] = None
    report["described"] = []
    if error is None and report["consumers"] and describe_wait > 0:
        report["described"] = described(nodes, queue, tls, timeout, describe_wait)
    servers = state.read_servers(state_dir or state.default_dir(), queue)
    for server in servers:
        server["uptime"] = round(now - float(server.get("started", now)), 3)
        for worker in server.get("workers", []):
            worker["uptime"] = round(now - float(worker.get("started", now)), 3)
    report["servers"] = servers
    return report, error


def described(
    urls: Sequence[str], queue: str, tls: amqp.TLSOptions | None, timeout: float, wait: float
) -> list[dict[str, Any]]:
    """The descriptions of the servers on ``queue`` that answered within ``wait`` seconds,
    as dicts (``describe.Description``, its ``stuck`` workers named); none when the
    client cannot connect (the error is the queue count's to report)."""
    from fibrpc.client import Client  # noqa: PLC0415 - `status` alone needs a client

    try:
        with Client(list(urls), queue=queue, timeout=timeout, tls=tls) as client:
            found = client.describe(wait)
    except FibrpcError:
        return []
    out = []
    for description in found:
        data = dataclasses.asdict(description)
        data["stuck"] = [w.index for w in description.stuck]
        out.append(data)
    return out


def exit_code(report: dict[str, Any], error: FibrpcError | None) -> ExitCode:
    """``OK`` when some server consumes the queue; ``NO_SERVER`` when the queue is missing
    or has no consumer; the broker error's code when it could not be asked."""
    if error is not None:
        return for_error(error)
    if not report["consumers"]:
        return ExitCode.NO_SERVER
    return ExitCode.OK


def render(report: dict[str, Any]) -> str:
    """The text form of ``report``."""
    lines = [f"queue {report['queue']!r} at {report['url']}"]
    if report["broker_error"] is not None:
        lines.append("  broker:          not reached (the error is on stderr)")
    elif not report["exists"]:
        lines.append(
            "  the queue does not exist: no server has declared it. Start one with: "
            f"fibrpc serve --queue {report['queue']}"
        )
    else:
        lines.append(f"  messages ready:  {report['messages']:,}")
        consumers = report["consumers"]
        note = "" if consumers else "  (no server consumes the queue)"
        lines.append(f"  consumers:       {consumers:,}{note}")
    management = report.get("management")
    if management is not None:
        if management["error"] is not None:
            # One short line: without the plugin (Debian's default) this shows on every
            # run; the JSON form has the whole reason.
            lines.append(
                f"  message rates:   none (no management API at {management['url']}: "
                "rabbitmq-plugins enable rabbitmq_management)"
            )
        else:
            rates = management["rates"]
            lines.append(
                "  message rates:   "
                + ", ".join(f"{name} {rate:,.1f}/s" for name, rate in rates.items())
            )
            if management["messages_unacknowledged"] is not None:
                lines.append(f"  unacked:         {management['messages_unacknowledged']:,}")
    described = report.get("described") or []
    for server in described:
        lines.extend(_render_described(server))
    servers = report["servers"]
    if not servers:
        lines.append(f"no server for {report['queue']!r} runs on this machine")
    for server in servers:
        extra = f", metrics at {server['metrics']}" if server.get("metrics") else ""
        lines.append(
            f"server pid {server['pid']} on this machine, up {_duration(server['uptime'])}, "
            f"{len(server.get('workers', []))} worker(s){extra}"
        )
        rows = [("worker", "pid", "uptime", "served", "errors", "restarts")]
        for worker in server.get("workers", []):
            rows.append(
                (
                    str(worker.get("index", "?")),
                    str(worker.get("pid", "?")),
                    _duration(worker.get("uptime", 0.0)),
                    _count(worker.get("served")),
                    _count(worker.get("errors")),
                    _count(worker.get("restarts")),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
            cells[0] = row[0].ljust(widths[0])
            lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def _render_described(server: dict[str, Any]) -> list[str]:
    """A described server: one line for it, one per algorithm it has counts for, and one
    per worker (a stuck one marked ``STUCK``, saying why)."""
    stuck = server.get("stuck") or []
    sign = f", {len(stuck)} STUCK" if stuck else ""
    lines = [
        f"server {server['id']} on {server['host']} (pid {server['pid']}, fibrpc "
        f"{server['version']}), up {_duration(server['uptime'])}, "
        f"{len(server['workers'])} worker(s){sign}"
    ]
    for algo, counts in sorted(server["counts"].items()):
        refused = sum(counts["refused"].values())
        mean = counts["compute_seconds"] / counts["computed"] if counts["computed"] else 0.0
        lines.append(
            f"  {algo:<8} served {counts['served']:,}, refused {refused:,}, abandoned "
            f"{counts['abandoned']:,}, expired {counts['expired']:,}, poison "
            f"{counts['poison']:,}; compute mean {mean * 1000:,.1f} ms, max "
            f"{counts['compute_max_seconds'] * 1000:,.1f} ms"
        )
    for worker in server["workers"]:
        why = []
        if worker["late"]:
            why.append("held one request past its expected time")
        if worker["silent"]:
            why.append("stopped answering")
        busy = worker["busy_seconds"]
        doing = f", computing for {busy:,.1f} s" if busy is not None else ""
        mark = f"  STUCK: {', '.join(why)}" if why else ""
        lines.append(
            f"  #{worker['index']} pid {worker['pid']}, restarts {worker['restarts']}{doing}{mark}"
        )
    return lines


def _management_target(management_url: str, url: str) -> tuple[str, str, str]:
    """The management base URL without credentials, and the user and password to send:
    the management URL's own, else the AMQP URL's (else RabbitMQ's default, guest)."""
    parts = urllib.parse.urlsplit(management_url)
    source = parts if parts.username is not None else urllib.parse.urlsplit(url)
    user = urllib.parse.unquote(source.username or "guest")
    password = urllib.parse.unquote(source.password or "guest")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), user, password


def _vhost(url: str) -> str:
    """The virtual host of an AMQP URL, as pika reads it ('/' when the path is empty)."""
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _duration(seconds: Any) -> str:
    total = int(seconds) if isinstance(seconds, int | float) else 0
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"
