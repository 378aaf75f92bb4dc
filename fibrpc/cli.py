"""The ``fibrpc`` command: a thin click layer over the supervisor and the client.

Every option has an environment variable (``FIBRPC_<OPTION>``); every failure has its own
exit code (``fibrpc.exitcodes.ExitCode``), and its message goes to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fibrpc import config, logs
from fibrpc.client import Client, check_queue, check_timeout
from fibrpc.errors import ConfigError, FibrpcError
from fibrpc.exitcodes import ExitCode, for_error
from fibrpc.numbers import ALGORITHMS, DEFAULT_ALGORITHM
from fibrpc.tls import TLSOptions
from fibrpc.urls import check_management_url, split_urls

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMAT = logs.TEXT_FORMAT


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr with the process id in every line, as text or JSON lines; pika's own
    loggers turned down."""
    logs.setup(level, fmt)


def option(*decls: str, env: str, help: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option read from the environment variable ``env`` too, which its help
    names: every option of every command is declared through here."""
    return click.option(*decls, envvar=env, help=f"{help}  [env: {env}]", **kwargs)


def log_options(default_level: str) -> Callable[[F], F]:
    """``--log-level`` (default ``default_level``) and ``--log-format``."""

    def decorate(func: F) -> F:
        func = option(
            "--log-format",
            env="FIBRPC_LOG_FORMAT",
            default=config.DEFAULT_LOG_FORMAT,
            show_default=True,
            type=click.Choice(logs.FORMATS),
            help="text, or json: one JSON object a line (time, level, logger, pid, message, "
            "exc_info) for log collectors.",
        )(func)
        func = option(
            "--log-level",
            env="FIBRPC_LOG_LEVEL",
            default=default_level,
            show_default=True,
            type=click.Choice(logs.LEVELS, case_sensitive=False),
            help="Least severe level logged to stderr.",
        )(func)
        return func

    return decorate


def state_dir_option(func: F) -> F:
    """``--state-dir``: where servers on this machine report to ``fibrpc status``."""
    return option(
        "--state-dir",
        env="FIBRPC_STATE_DIR",
        type=click.Path(file_okay=False),
        default=None,
        help="Where servers on this machine report to `fibrpc status` (default: "
        "$XDG_RUNTIME_DIR/fibrpc, else /tmp/fibrpc-UID).",
    )(func)


def broker_options(func: F) -> F:
    """``--url`` and ``--queue``, shared by every command that talks to the broker."""
    func = option(
        "--queue",
        env="FIBRPC_QUEUE",
        default=config.DEFAULT_QUEUE,
        show_default=True,
        callback=_checked(check_queue),
        help="Request queue.",
    )(func)
    func = option(
        "--url",
        "urls",
        env="FIBRPC_URL",
        multiple=True,
        default=[config.DEFAULT_URL],
        show_default=True,
        callback=_checked(split_urls),  # one URL or more, each perhaps several
        help="Broker URL (amqp:// or amqps://); the nodes of a cluster: give it again for "
        "each, or separate them with commas (a comma in a password is %2C).",
    )(func)
    return func


def _checked(check: Callable[[Any], Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback: the option's value through ``check`` (None, an option not given,
    as it is); the ``ConfigError`` it raises is a usage error (exit 2) with its message.
    Checked here, before anything starts: an empty ``--queue`` is a name the broker makes
    up (a server would consume queues no client can find), and a bad ``--management-url``
    failed deep in urllib."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return None if value is None else check(value)
        except ConfigError as exc:
            raise click.BadParameter(exc.message) from None

    return callback


def tls_options(func: F) -> F:
    """``--tls-ca-file``, ``--tls-cert-file``, ``--tls-key-file`` and ``--tls-no-verify``,
    handed to the command as one ``tls: TLSOptions`` argument."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["tls"] = TLSOptions(
            ca_file=kwargs.pop("tls_ca_file"),
            cert_file=kwargs.pop("tls_cert_file"),
            key_file=kwargs.pop("tls_key_file"),
            verify=not kwargs.pop("tls_no_verify"),
        )
        return func(*args, **kwargs)

    path = click.Path(exists=True, dir_okay=False)
    for name, help_text in [
        ("--tls-key-file", "Private key of the client certificate."),
        ("--tls-cert-file", "Client certificate (PEM), for brokers that require one."),
        ("--tls-ca-file", "CA bundle (PEM) that signed the broker's certificate."),
    ]:
        env = "FIBRPC_" + name[2:].upper().replace("-", "_")
        wrapper = option(name, env=env, type=path, help=help_text)(wrapper)
    wrapper = option(
        "--tls-no-verify",
        env="FIBRPC_TLS_NO_VERIFY",
        is_flag=True,
        help="Do not check the broker's certificate (testing only).",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


def _seconds(ctx: click.Context, param: click.Parameter, value: object) -> float:
    """``--timeout``: any positive number of seconds, ``inf`` for none; zero, negatives
    and ``nan`` are usage errors (``fibrpc.client.check_timeout``)."""
    try:
        return check_timeout(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, ConfigError):
        raise click.BadParameter(
            f"{value!r} is not a number of seconds above 0 (or inf)."
        ) from None


def timeout_option(env: str, help_text: str) -> Callable[[F], F]:
    """``--timeout``, read from ``env`` too."""
    return option(
        "--timeout",
        env=env,
        callback=_seconds,
        metavar="SECONDS",
        default=config.DEFAULT_TIMEOUT,
        show_default=True,
        help=help_text,
    )


def reply_queue_option(func: F) -> F:
    """``--reply-queue``: where a client takes its replies."""
    return option(
        "--reply-queue",
        env="FIBRPC_REPLY_QUEUE",
        type=click.Choice(config.REPLY_QUEUES),
        default=config.DEFAULT_REPLY_QUEUE,
        show_default=True,
        help="Where replies come: 'direct' (RabbitMQ's direct reply-to) or 'exclusive' (a "
        "server-named exclusive queue of the client's own: for clusters of RabbitMQ 3.10, "
        "and many replies a second; see docs/client.md).",
    )(func)


def _fail(error: BaseException) -> NoReturn:
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
  fibrpc status                      # the queue, its rates, and this machine's workers
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
@tls_options
@option(
    "--workers",
    env="FIBRPC_WORKERS",
    default="auto",
    show_default=True,
    help="Worker processes: a number, or 'auto' for one per CPU this process may use "
    "(a container's CPU quota included).",
)
@option(
    "--prefetch",
    env="FIBRPC_PREFETCH",
    type=click.IntRange(1, 65535),
    default=config.DEFAULT_PREFETCH,
    show_default=True,
    help="Unacked requests per worker.",
)
@option(
    "--queue-type",
    env="FIBRPC_QUEUE_TYPE",
    default="classic",
    type=click.Choice(["classic", "quorum"]),
    show_default=True,
    help="classic: a durable classic queue, for one broker node; quorum: replicated "
    "over a RabbitMQ cluster.",
)
@option(
    "--heartbeat",
    env="FIBRPC_HEARTBEAT",
    type=click.IntRange(0, 65535),
    default=config.DEFAULT_HEARTBEAT,
    show_default=True,
    help="AMQP heartbeat in seconds.",
)
@option(
    "--naive-max-n",
    env="FIBRPC_NAIVE_MAX_N",
    type=click.IntRange(1, 92),
    default=config.DEFAULT_NAIVE_MAX_N,
    show_default=True,
    help="Largest n for 'naive'.",
)
@option(
    "--fast-max-n",
    env="FIBRPC_FAST_MAX_N",
    type=click.IntRange(93),
    default=config.DEFAULT_FAST_MAX_N,
    show_default=True,
    help="Largest n for 'fast'.",
)
@option(
    "--max-body-bytes",
    env="FIBRPC_MAX_BODY_BYTES",
    type=click.IntRange(64),
    default=config.DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    help="Largest request body.",
)
@option(
    "--max-batch",
    env="FIBRPC_MAX_BATCH",
    type=click.IntRange(1),
    default=config.DEFAULT_MAX_BATCH,
    show_default=True,
    help="Most values of n in one request.",
)
@option(
    "--max-reply-bytes",
    env="FIBRPC_MAX_REPLY_BYTES",
    type=click.IntRange(64),
    default=config.DEFAULT_MAX_REPLY_BYTES,
    show_default=True,
    help="Largest reply body, estimated before computing. Keep it under the broker's "
    "max_message_size (16 MiB on RabbitMQ 4): a worker that meets a lower one limits "
    "replies to it.",
)
@option(
    "--memo-bytes",
    env="FIBRPC_MEMO_BYTES",
    type=click.IntRange(0),
    default=config.DEFAULT_MEMO_BYTES,
    show_default=True,
    help="Bytes of large fast results the server remembers, in one memo its workers share "
    "(on /dev/shm); 0: no memo.",
)
@option(
    "--drain-timeout",
    env="FIBRPC_DRAIN_TIMEOUT",
    type=click.FloatRange(0),
    default=config.DEFAULT_DRAIN_TIMEOUT,
    show_default=True,
    help="Seconds a worker may take to finish its requests on SIGTERM.",
)
@option(
    "--max-deliveries",
    env="FIBRPC_MAX_DELIVERIES",
    type=click.IntRange(1),
    default=config.DEFAULT_MAX_DELIVERIES,
    show_default=True,
    help="Deliveries of one request before it is refused as poison.",
)
@option(
    "--metrics-port",
    env="FIBRPC_METRICS_PORT",
    type=click.IntRange(0, 65535),
    default=config.DEFAULT_METRICS_PORT,
    show_default=True,
    help="Serve Prometheus metrics of all workers at http://METRICS_HOST:PORT/metrics; 0: none.",
)
@option(
    "--metrics-host",
    env="FIBRPC_METRICS_HOST",
    default=config.DEFAULT_METRICS_HOST,
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0: every interface).",
)
@state_dir_option
@log_options(config.DEFAULT_LOG_LEVEL)
def serve(
    urls: tuple[str, ...],
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
    max_deliveries: int,
    metrics_port: int,
    metrics_host: str,
    state_dir: str | None,
    log_level: str,
    log_format: str,
    tls: TLSOptions,
) -> None:
    """Serve Fibonacci requests from QUEUE with a supervised pool of workers.

    SIGTERM or Ctrl-C drains: workers answer what they hold and exit 0; a second signal
    stops at once (exit 10).
    """
    from fibrpc import state  # noqa: PLC0415 - keeps `call` light
    from fibrpc.supervisor import Supervisor, cpu_count  # noqa: PLC0415
    from fibrpc.workerstate import WorkerSettings  # noqa: PLC0415

    setup_logging(log_level, log_format)
    count = _parse_workers(workers, cpu_count())
    limits = config.Limits(
        naive_max_n=naive_max_n,
        fast_max_n=fast_max_n,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        max_reply_bytes=max_reply_bytes,
    )
    settings = WorkerSettings(
        urls=urls,
        queue=queue,
        queue_type=queue_type,
        prefetch=prefetch,
        heartbeat=heartbeat,
        memo_bytes=memo_bytes,
        drain_timeout=drain_timeout,
        max_deliveries=max_deliveries,
        limits=limits,
        tls=tls,
        state_dir=state_dir or str(state.default_dir()),
    )
    supervisor = Supervisor(settings, count, metrics_port=metrics_port, metrics_host=metrics_host)
    try:
        code = supervisor.run()
    except FibrpcError as exc:
        _fail(exc)
    sys.exit(code)


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
    # ``fibrpc call -5`` is a negative n (refused by the server, exit 3), not an option.
    context_settings={"ignore_unknown_options": True},
    epilog="""\b
Examples:
  fibrpc call 30                  # 832040
  fibrpc call 30 --algo naive     # the same, by the tutorial's recursion
  fibrpc call 90 --algo iter --json
  fibrpc call 1000000 > f1e6.txt  # 208,988 digits
""",
)
@click.argument("n", type=int)
@broker_options
@tls_options
@option(
    "--algo",
    env="FIBRPC_ALGO",
    type=click.Choice(ALGORITHMS),
    default=DEFAULT_ALGORITHM,
    show_default=True,
    help="Algorithm.",
)
@timeout_option("FIBRPC_TIMEOUT", "Seconds to wait for the reply (inf: no limit).")
@reply_queue_option
@option(
    "--json",
    "as_json",
    env="FIBRPC_CALL_JSON",
    is_flag=True,
    help='Print {"n", "algo", "result", "seconds"}; the result as a string.',
)
@log_options(config.DEFAULT_CLIENT_LOG_LEVEL)
def call(
    n: int,
    urls: tuple[str, ...],
    queue: str,
    algo: str,
    timeout: float,
    reply_queue: str,
    as_json: bool,
    log_level: str,
    log_format: str,
    tls: TLSOptions,
) -> None:
    """Compute F(N) on a running server and print it.

    Exit codes: 3 refused, 4 timeout, 5 no server, 6 broker unreachable, 7 access refused,
    11 broker refused.
    """
    setup_logging(log_level, log_format)
    started = time.perf_counter()
    try:
        with Client(urls, queue=queue, timeout=timeout, tls=tls, reply_queue=reply_queue) as client:
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


@main.command(
    epilog="""\b
Examples:
  fibrpc status                                  # the queue, its rates, local workers
  fibrpc status --queue jobs --json | jq .servers
  fibrpc status --management-url http://admin:pw@broker:15672
  fibrpc status --watch                          # refreshed in place until Ctrl-C
"""
)
@broker_options
@tls_options
@option(
    "--management-url",
    env="FIBRPC_MANAGEMENT_URL",
    default=None,
    callback=_checked(check_management_url),
    help="RabbitMQ management API, for message rates (default: http://HOST:15672, HOST "
    "from --url; the user and password from --url unless this URL has its own).",
)
@state_dir_option
@option(
    "--json",
    "as_json",
    env="FIBRPC_STATUS_JSON",
    is_flag=True,
    help="Print one JSON object instead of text.",
)
@option(
    "--describe-wait",
    env="FIBRPC_DESCRIBE_WAIT",
    type=click.FloatRange(min=0.0),
    default=config.DEFAULT_DESCRIBE_WAIT,
    show_default=True,
    help="Seconds to wait for the servers to describe themselves (0: ask none).",
)
@option(
    "--watch",
    env="FIBRPC_STATUS_WATCH",
    type=click.FloatRange(min=0.5),
    default=None,
    is_flag=False,
    flag_value=2.0,
    help="Refresh in place every SECONDS (2 when given alone) until Ctrl-C.",
)
@timeout_option("FIBRPC_TIMEOUT", "Seconds to wait for the broker to answer.")
@log_options(config.DEFAULT_CLIENT_LOG_LEVEL)
def status(
    urls: tuple[str, ...],
    queue: str,
    timeout: float,
    management_url: str | None,
    state_dir: str | None,
    as_json: bool,
    describe_wait: float,
    watch: float | None,
    log_level: str,
    log_format: str,
    tls: TLSOptions,
) -> None:
    """Show QUEUE's depth, consumers and message rates; every server on the queue, on
    any machine, as it describes itself (version, workers, counts per algorithm, a STUCK
    sign on a worker that held one request past its expected time or stopped answering);
    and the servers on this machine that did not answer: each worker's pid, uptime,
    requests served, errors and restarts.

    Message rates come from RabbitMQ's management API; without it the rest still works.
    Exit codes: 0 a server consumes the queue, 5 none does (or the queue does not exist),
    6 broker unreachable, 7 access refused, 11 broker refused.
    """
    from fibrpc import status as _status  # noqa: PLC0415 - keeps `call` light

    setup_logging(log_level, log_format)

    def look() -> tuple[dict[str, Any], FibrpcError | None]:
        return _status.gather(
            urls,
            queue,
            tls=tls,
            management_url=management_url,
            state_dir=Path(state_dir) if state_dir else None,
            timeout=timeout,
            describe_wait=describe_wait,
        )

    if watch is not None and not as_json:
        try:
            while True:
                report, error = look()
                shown = _status.render(report)
                if error is not None:
                    shown += f"\nfibrpc: {error}"
                click.echo(f"\x1b[H\x1b[2J{shown}\n(every {watch:g} s; Ctrl-C ends)")
                time.sleep(watch)
        except KeyboardInterrupt:
            sys.exit(int(ExitCode.OK))
    report, error = look()
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(_status.render(report))
    if error is not None:  # on stderr, once: the text form leaves it out
        click.echo(f"fibrpc: {error}", err=True)
    sys.exit(int(_status.exit_code(report, error)))


# -- fibrpc bench --------------------------------------------------------------------------


@main.command(
    epilog="""\b
Examples:
  fibrpc bench --spawn 2                         # all three scenarios on a private server
  fibrpc bench --scenario pipelined --window 64  # against the server on rpc_queue
  fibrpc bench --spawn 2 --json > run.json       # machine-readable
  fibrpc bench --spawn 1 --calls 200 --algo iter # a quick smoke run
  FIBRPC_BENCH_CALLS=100000 fibrpc bench --scenario batched --batch-size 10000
"""
)
@broker_options
@tls_options
@option(
    "--scenario",
    "scenarios",
    env="FIBRPC_BENCH_SCENARIO",
    multiple=True,
    type=click.Choice(config.BENCH_ALL_SCENARIOS),
    help="Scenario to run; repeat for several (default: sequential, pipelined, batched, "
    "in this order; 'asyncio' is pipelined through fibrpc.aio.AsyncClient; 'tasks' and "
    "'threads' are independent callers, 2,000 asyncio tasks or 32 threads each awaiting "
    "single calls); the variable takes them space-separated.",
)
@option(
    "--calls",
    env="FIBRPC_BENCH_CALLS",
    type=click.IntRange(1),
    default=None,
    help="Calls per scenario (default: sequential 3,000, pipelined and asyncio 20,000, "
    "tasks 100,000, threads 50,000, batched 2,000,000).",
)
@option(
    "--algo",
    env="FIBRPC_BENCH_ALGO",
    type=click.Choice(ALGORITHMS),
    default=DEFAULT_ALGORITHM,
    show_default=True,
    help="Algorithm.",
)
@option(
    "--max-n",
    env="FIBRPC_BENCH_MAX_N",
    type=click.IntRange(0),
    default=config.BENCH_MAX_N,
    show_default=True,
    help="n is drawn uniformly from 0..MAX_N.",
)
@option(
    "--seed",
    env="FIBRPC_BENCH_SEED",
    type=int,
    default=config.BENCH_SEED,
    show_default=True,
    help="Seed of the values of n.",
)
@option(
    "--window",
    env="FIBRPC_BENCH_WINDOW",
    type=click.IntRange(1),
    default=config.BENCH_WINDOW,
    show_default=True,
    help="Calls in flight in 'pipelined' and 'asyncio'.",
)
@option(
    "--batch-window",
    env="FIBRPC_BENCH_BATCH_WINDOW",
    type=click.IntRange(1),
    default=config.BENCH_BATCH_WINDOW,
    show_default=True,
    help="Batch messages in flight in 'batched'.",
)
@option(
    "--batch-size",
    env="FIBRPC_BENCH_BATCH_SIZE",
    type=click.IntRange(1),
    default=config.BENCH_BATCH_SIZE,
    show_default=True,
    help="Values of n per message in 'batched'.",
)
@timeout_option("FIBRPC_BENCH_TIMEOUT", "Seconds each call may wait for its reply.")
@reply_queue_option
@option(
    "--spawn",
    env="FIBRPC_BENCH_SPAWN",
    type=click.IntRange(1),
    default=None,
    help="Start 'fibrpc serve --workers SPAWN' on a private queue (--queue is then "
    "ignored), and stop it afterwards.",
)
@option(
    "--json",
    "as_json",
    env="FIBRPC_BENCH_JSON",
    is_flag=True,
    help='Print {"scenarios": [{"name", "calls", "seconds", "calls_per_s", "p50_ms", '
    '"p99_ms", "errors"}, ...], ...} instead of a table.',
)
@option(
    "--progress/--no-progress",
    env="FIBRPC_BENCH_PROGRESS",
    default=None,
    help="Draw a counter on stderr while running (default: when stderr is a terminal).",
)
def bench(
    urls: tuple[str, ...],
    queue: str,
    scenarios: tuple[str, ...],
    calls: int | None,
    algo: str,
    max_n: int,
    seed: int,
    window: int,
    batch_window: int,
    batch_size: int,
    timeout: float,
    reply_queue: str,
    spawn: int | None,
    as_json: bool,
    progress: bool | None,
    tls: TLSOptions,
) -> None:
    """Measure calls/s and latency of a fibrpc server, with every result checked.

    Scenarios: 'sequential' (one call at a time, like the tutorial), 'pipelined' (one
    message per call, WINDOW in flight), 'batched' (BATCH_SIZE values per message,
    BATCH_WINDOW in flight), 'asyncio' (pipelined through the asyncio client: WINDOW
    tasks calling at once), 'tasks' and 'threads' (independent callers: 2,000 asyncio
    tasks or 32 threads each awaiting single calls). Exit code 1 when any call failed or
    gave a wrong result; the first failure of each kind is shown ('failures' in --json).
    """
    from fibrpc import bench as _bench  # noqa: PLC0415 - keeps `call` light

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logs.quiet_pika()
    settings = _bench.BenchSettings(
        urls=urls,
        queue=queue,
        scenarios=tuple(dict.fromkeys(scenarios)) or config.BENCH_SCENARIOS,
        calls=calls,
        algo=algo,
        max_n=max_n,
        seed=seed,
        window=window,
        batch_window=batch_window,
        batch_size=batch_size,
        timeout=timeout,
        tls=tls,
        reply_queue=reply_queue,
    )
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        report = _bench.run(settings, spawn=spawn, progress=progress)
    except FibrpcError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        click.echo(report.table())
    if report.errors:
        click.echo(f"fibrpc: {report.errors:,} call(s) failed or were wrong.", err=True)
        for kind, message in report.why().items():
            click.echo(f"  {kind}, the first of them: {message}", err=True)
        sys.exit(int(ExitCode.FAILURE))
