"""The ``fibrpc`` command: a thin click layer over the supervisor and the client.

Every option has an environment variable (``FIBRPC_<OPTION>``); every failure has its own
exit code (``fibrpc.exitcodes.ExitCode``), and its message goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fibrpc import amqp, config
from fibrpc.client import Client
from fibrpc.errors import FibrpcError
from fibrpc.exitcodes import ExitCode, for_error
from fibrpc.kernels import ALGORITHMS, DEFAULT_ALGORITHM

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr with the process id in every line; pika's own loggers turned down."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    amqp.quiet_pika()


def broker_options(func: F) -> F:
    """``--url`` and ``--queue``, shared by every command that talks to the broker."""
    func = click.option(
        "--queue",
        envvar="FIBRPC_QUEUE",
        default=config.DEFAULT_QUEUE,
        show_default=True,
        help="Request queue.  [env: FIBRPC_QUEUE]",
    )(func)
    func = click.option(
        "--url",
        envvar="FIBRPC_URL",
        default=config.DEFAULT_URL,
        show_default=True,
        help="Broker URL (amqp:// or amqps://).  [env: FIBRPC_URL]",
    )(func)
    return func


def _fail(error: BaseException) -> None:
    """Print ``error`` as one line on stderr and exit with its code."""
    click.echo(f"fibrpc: {error}", err=True)
    sys.exit(int(for_error(error)))


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  fibrpc serve --workers auto        # one worker per CPU, on the local broker
  fibrpc call 30                     # 832040
  fibrpc call 30 --algo naive        # the tutorial's recursion
  fibrpc call 1000000 | wc -c        # F(10^6): 208,988 digits
""",
)
@click.version_option(package_name="fibrpc")
def main() -> None:
    """fibrpc: Fibonacci as a service over RabbitMQ."""


@main.command(
    epilog="""\b
Examples:
  fibrpc serve                                  # one worker per CPU
  fibrpc serve --workers 2 --prefetch 128
  FIBRPC_URL=amqp://user:pw@broker/%2F fibrpc serve
"""
)
@broker_options
@click.option(
    "--workers",
    envvar="FIBRPC_WORKERS",
    default="auto",
    show_default=True,
    help="Worker processes: a number, or 'auto' for one per CPU.  [env: FIBRPC_WORKERS]",
)
@click.option(
    "--prefetch",
    envvar="FIBRPC_PREFETCH",
    type=click.IntRange(1, 65535),
    default=config.DEFAULT_PREFETCH,
    show_default=True,
    help="Unacked requests per worker.  [env: FIBRPC_PREFETCH]",
)
@click.option(
    "--queue-type",
    envvar="FIBRPC_QUEUE_TYPE",
    default="classic",
    type=click.Choice(["classic", "quorum"]),
    show_default=True,
    help="classic: as the tutorial declares it; quorum: durable and replicated.  "
    "[env: FIBRPC_QUEUE_TYPE]",
)
@click.option(
    "--heartbeat",
    envvar="FIBRPC_HEARTBEAT",
    type=click.IntRange(0),
    default=config.DEFAULT_HEARTBEAT,
    show_default=True,
    help="AMQP heartbeat in seconds.  [env: FIBRPC_HEARTBEAT]",
)
@click.option(
    "--naive-max-n",
    envvar="FIBRPC_NAIVE_MAX_N",
    type=click.IntRange(1, 92),
    default=config.DEFAULT_NAIVE_MAX_N,
    show_default=True,
    help="Largest n for 'naive'.  [env: FIBRPC_NAIVE_MAX_N]",
)
@click.option(
    "--fast-max-n",
    envvar="FIBRPC_FAST_MAX_N",
    type=click.IntRange(93),
    default=config.DEFAULT_FAST_MAX_N,
    show_default=True,
    help="Largest n for 'fast'.  [env: FIBRPC_FAST_MAX_N]",
)
@click.option(
    "--max-body-bytes",
    envvar="FIBRPC_MAX_BODY_BYTES",
    type=click.IntRange(64),
    default=config.DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    help="Largest request body.  [env: FIBRPC_MAX_BODY_BYTES]",
)
@click.option(
    "--max-batch",
    envvar="FIBRPC_MAX_BATCH",
    type=click.IntRange(1),
    default=config.DEFAULT_MAX_BATCH,
    show_default=True,
    help="Most values of n in one request.  [env: FIBRPC_MAX_BATCH]",
)
@click.option(
    "--max-reply-bytes",
    envvar="FIBRPC_MAX_REPLY_BYTES",
    type=click.IntRange(64),
    default=config.DEFAULT_MAX_REPLY_BYTES,
    show_default=True,
    help="Largest reply body.  [env: FIBRPC_MAX_REPLY_BYTES]",
)
@click.option(
    "--memo-bytes",
    envvar="FIBRPC_MEMO_BYTES",
    type=click.IntRange(0),
    default=config.DEFAULT_MEMO_BYTES,
    show_default=True,
    help="Bytes of large results each worker remembers.  [env: FIBRPC_MEMO_BYTES]",
)
@click.option(
    "--drain-timeout",
    envvar="FIBRPC_DRAIN_TIMEOUT",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds a worker may take to finish its requests on SIGTERM.  "
    "[env: FIBRPC_DRAIN_TIMEOUT]",
)
@click.option(
    "--log-level",
    envvar="FIBRPC_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    help="[env: FIBRPC_LOG_LEVEL]",
)
def serve(
    url: str,
    queue: str,
    workers: str,
    prefetch: int,
    queue_type: str,
    heartbeat: int,
    naive_max_n: int,
    fast_max_n: int,
    max_body_bytes: int,
    max_batch: int,
    max_reply_bytes: int,
    memo_bytes: int,
    drain_timeout: float,
    log_level: str,
) -> None:
    """Serve Fibonacci requests from QUEUE with a supervised pool of workers.

    SIGTERM or Ctrl-C drains: workers answer what they hold and exit 0; a second signal
    stops at once (exit 10).
    """
    from fibrpc.server import WorkerSettings  # noqa: PLC0415 - keeps `call` light
    from fibrpc.supervisor import Supervisor, cpu_count  # noqa: PLC0415

    setup_logging(log_level)
    count = _parse_workers(workers, cpu_count())
    try:
        amqp.parameters(url)
    except FibrpcError as exc:
        _fail(exc)
    limits = config.Limits(
        naive_max_n=naive_max_n,
        fast_max_n=fast_max_n,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        max_reply_bytes=max_reply_bytes,
    )
    settings = WorkerSettings(
        url=url,
        queue=queue,
        queue_type=queue_type,
        prefetch=prefetch,
        heartbeat=heartbeat,
        memo_bytes=memo_bytes,
        drain_timeout=drain_timeout,
        limits=limits,
    )
    sys.exit(Supervisor(settings, count).run())


def _parse_workers(value: str, cpus: int) -> int:
    if value == "auto":
        return cpus
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise click.BadParameter(
            f"{value!r} is not 'auto' or a number of 1 or more.", param_hint="--workers"
        )
    return count


@main.command(
    epilog="""\b
Examples:
  fibrpc call 30                  # 832040
  fibrpc call 30 --algo naive     # the same, by the tutorial's recursion
  fibrpc call 90 --algo iter --json
  fibrpc call 1000000 > f1e6.txt  # 208,988 digits
"""
)
@click.argument("n", type=int)
@broker_options
@click.option(
    "--algo",
    envvar="FIBRPC_ALGO",
    type=click.Choice(ALGORITHMS),
    default=DEFAULT_ALGORITHM,
    show_default=True,
    help="Algorithm.  [env: FIBRPC_ALGO]",
)
@click.option(
    "--timeout",
    envvar="FIBRPC_TIMEOUT",
    type=click.FloatRange(0, min_open=True),
    default=config.DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the reply.  [env: FIBRPC_TIMEOUT]",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"n", "algo", "result", "seconds"}; the result as a string.',
)
def call(n: int, url: str, queue: str, algo: str, timeout: float, as_json: bool) -> None:
    """Compute F(N) on a running server and print it.

    Exit codes: 3 refused, 4 timeout, 5 no server, 6 broker unreachable, 7 access refused.
    """
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    amqp.quiet_pika()
    started = time.perf_counter()
    try:
        with Client(url, queue=queue, timeout=timeout) as client:
            text = client.call_text(n, algo, timeout)
    except FibrpcError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    if as_json:
        seconds = round(time.perf_counter() - started, 6)
        click.echo(json.dumps({"n": n, "algo": algo, "result": text, "seconds": seconds}))
    else:
        click.echo(text)
