"""Configuration: every option of every command has a FIBRPC_* environment variable, says
so in its --help, and docs/configuration.md's table lists them all, with the
commands that read each and its default. No broker needed."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fibrpc import status
from fibrpc.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "docs" / "configuration.md").read_text()

#: Options that are about the command line itself, not configuration.
NOT_CONFIGURATION = {"help", "version"}


def options() -> list[tuple[str, click.Option]]:
    """(command name, option) for every configurable option of every command."""
    found = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in NOT_CONFIGURATION:
                found.append((name, param))
    return found


OPTIONS = options()
IDS = [f"{name} {option.opts[0]}" for name, option in OPTIONS]


@functools.cache
def configuration_table() -> dict[str, dict[str, str]]:
    """docs/configuration.md's table: variable -> {option, commands, default, meaning}."""
    section = README.split("\n## Configuration\n", 1)
    assert len(section) == 2, "docs/configuration.md has no '## Configuration' section"
    body = section[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    header = [cell.strip().lower() for cell in rows[0].strip("|").split("|")]
    assert header == ["variable", "option", "commands", "default", "meaning"], header
    assert set(rows[1].replace("|", "").strip()) <= {"-", ":", " "}  # the separator row
    table: dict[str, dict[str, str]] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 5, (
            f"a row of README's configuration table has {len(cells)} cells: {row}"
        )
        variable = cells[0].strip("`")
        assert variable not in table, f"{variable} is in the table twice"
        table[variable] = dict(zip(header[1:], cells[1:], strict=True))
    return table


def shown_in(cell: str, default: object) -> bool:
    """Whether a default is written in a table cell (thousands separators allowed; 30.0
    may be written 30; a flag is 'off'; an option without a default needs some text)."""
    text = cell.replace("`", "").replace(",", "")
    if isinstance(default, bool):
        return "off" in text
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    if isinstance(default, int | float):
        return re.search(rf"(?<![\w.]){re.escape(str(default))}(?![\w.])", text) is not None
    if isinstance(default, str):
        return default in text
    return text.strip() not in ("", "-")  # no default: the cell says what happens instead


# -- the options ---------------------------------------------------------------------------


def test_the_walk_finds_the_options_of_every_command():
    assert {name for name, _ in OPTIONS} >= {"serve", "call", "status", "bench"}
    assert len(OPTIONS) > 40


@pytest.mark.parametrize(("command", "option"), OPTIONS, ids=IDS)
def test_every_option_has_a_fibrpc_environment_variable(command, option):
    assert isinstance(option.envvar, str), f"`fibrpc {command} {option.opts[0]}` has no envvar"
    assert re.fullmatch(r"FIBRPC_[A-Z0-9_]+", option.envvar), option.envvar


def test_one_variable_means_one_option_wherever_it_is_read():
    names: dict[str, set[str]] = {}
    for _, option in OPTIONS:
        names.setdefault(option.envvar, set()).add(option.name or "")
    assert {var: n for var, n in names.items() if len(n) > 1} == {}


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_commands_help_shows_the_variable_of_each_option(command):
    result = CliRunner().invoke(main, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    missing = [
        option.envvar
        for name, option in OPTIONS
        if name == command and f"[env: {option.envvar}" not in " ".join(result.output.split())
    ]
    assert missing == []


def test_an_environment_variable_sets_its_option(monkeypatch):
    monkeypatch.setenv("FIBRPC_METRICS_PORT", "9123")
    monkeypatch.setenv("FIBRPC_LOG_FORMAT", "json")
    ctx = main.commands["serve"].make_context("serve", [])
    assert ctx.params["metrics_port"] == 9123
    assert ctx.params["log_format"] == "json"


# -- README.md's table ---------------------------------------------------------------------


@pytest.mark.parametrize(("command", "option"), OPTIONS, ids=IDS)
def test_readme_lists_each_option_with_its_command_and_default(command, option):
    row = configuration_table().get(str(option.envvar))
    assert row is not None, f"docs/configuration.md has no row for {option.envvar}"
    assert option.opts[0] in row["option"].replace("`", "")
    assert command in re.findall(r"`(\w+)`", row["commands"])
    default = option.get_default(click.Context(main.commands[command]), call=False)
    assert shown_in(row["default"], default), (
        f"{option.envvar}: the default of `fibrpc {command}` is {default!r}; README says "
        f"{row['default']!r}"
    )
    assert row["meaning"], f"{option.envvar} has no meaning in docs/configuration.md"


def test_readme_lists_no_variable_that_no_option_reads_and_no_command_twice():
    variables = {str(option.envvar) for _, option in OPTIONS}
    table = configuration_table()
    assert set(table) - variables == set()
    for variable, row in table.items():
        listed = re.findall(r"`(\w+)`", row["commands"])
        actual = sorted(c for c, o in OPTIONS if o.envvar == variable)
        assert sorted(listed) == actual, variable


# -- values checked before anything starts -------------------------------------------------


@pytest.mark.parametrize("queue", ["", "q" * 256, "é" * 128])
@pytest.mark.parametrize("command", ["serve", "status", "call", "bench"])
def test_a_queue_name_no_broker_would_keep_is_a_usage_error_of_every_command(command, queue):
    # An empty name is one the broker makes up: a server would consume queues no client
    # can find, and leave them behind; past 255 bytes, pika fails deep inside.
    args = [command, *(["30"] if command == "call" else []), "--queue", queue]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "queue must be a queue's name, 1 to 255 bytes" in result.output


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("notaurl", "is not an http:// or https:// URL with a host"),
        ("ftp://127.0.0.1/", "is not an http:// or https:// URL with a host"),
        ("127.0.0.1:15672", "is not an http:// or https:// URL with a host"),
        ("http://127.0.0.1:abc", "cannot be read"),
        ("http://127.0.0.1:99999", "cannot be read"),
        ("http://[::1", "cannot be read"),
        ("http://admin:secret@:15672", "is not an http:// or https:// URL with a host"),
    ],
)
def test_a_management_url_that_names_no_api_is_a_usage_error_of_status(url, says):
    result = CliRunner().invoke(main, ["status", "--management-url", url])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "secret" not in result.output
    assert "Traceback" not in result.output


def test_management_stats_says_a_bad_management_url_in_its_error_and_never_raises():
    found = status.management_stats("http://[::1", "amqp://127.0.0.1/%2F", "q")
    assert found["reachable"] is False
    assert "cannot be read" in found["error"]
