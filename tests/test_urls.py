"""Several broker URLs (the nodes of a cluster), everywhere a URL is taken: checked when
given, passwords never shown, the first node that answers used."""

from __future__ import annotations

import pytest
from conftest import URL, run_cli

from fibrpc import Client, ConfigError
from fibrpc.exitcodes import ExitCode
from fibrpc.urls import redact, split_urls

DEAD = "amqp://guest:s3cret-dead@127.0.0.1:1/%2F"  # nothing listens on port 1


def test_urls_come_as_one_several_separated_by_commas_or_a_list():
    a, b = "amqp://u:p@a/%2F", "amqps://u:p%2Cq@b:5671/v"
    assert split_urls(a) == (a,)
    assert split_urls(f"{a},{b}") == (a, b)
    assert split_urls(f" {a} , {b} ,") == (a, b)
    assert split_urls([a, f"{b}"]) == (a, b)
    assert split_urls((f"{a},{b}", a)) == (a, b, a)


@pytest.mark.parametrize(
    "bad",
    ["http://u:hunter2@h/", "localhost", "amqp://u:hunter2@/%2F", "amqp://u:hunter2@h:port/", ""],
)
def test_a_bad_url_is_a_config_error_naming_it_without_its_password(bad):
    with pytest.raises(ConfigError) as refused:
        split_urls(f"amqp://guest:guest@ok/%2F,{bad}" if bad else "")
    assert "hunter2" not in str(refused.value)
    if bad:
        assert "amqp://USER:PASSWORD@HOST:5672/VHOST" in str(refused.value) or "read" in str(
            refused.value
        )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:hunter2@h:5672/%2F", "amqp://guest:***@h:5672/%2F"),
        ("amqps://u%40x:hunter2@[::1]:5671/v", "amqps://u%40x:***@[::1]:5671/v"),
        ("amqp://u:hunter2@h:99999/", "amqp://u:***@h:99999/"),  # the port it is about
        ("amqp://u:hunter2@h:port/", "amqp://u:***@h:port/"),
        ("amqp://u:p@ss:hunter2@h/", "amqp://u:***@h/"),
        ("amqp://h/%2F", "amqp://h/%2F"),
    ],
)
def test_a_url_is_shown_as_written_but_its_password(url, shown):
    assert redact(url) == shown


def test_an_out_of_range_port_is_named_in_the_usage_error():
    result = run_cli("call", "30", "--url", "amqp://guest:hunter2@127.0.0.1:99999/")
    assert result.returncode == ExitCode.USAGE
    assert "amqp://guest:***@127.0.0.1:99999/" in result.stderr and "hunter2" not in result.stderr


def test_the_command_line_refuses_a_bad_url_in_a_list_as_a_usage_error():
    result = run_cli("call", "30", "--url", f"{URL},http://x:hunter2@h/")
    assert result.returncode == ExitCode.USAGE
    assert "http://x:***@h/" in result.stderr
    assert "hunter2" not in result.stderr


def test_the_client_and_the_command_line_use_the_first_node_that_answers(serve, queue):
    serve(workers=1)
    with Client([DEAD, URL], queue=queue, timeout=10) as client:
        assert client.call(30) == 832040
    with Client(f"{DEAD},{URL}", queue=queue, timeout=10) as client:
        assert client.call(31) == 1346269
    result = run_cli("call", "30", "--url", DEAD, "--url", URL, "--queue", queue)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"
    result = run_cli("call", "30", "--queue", queue, env={"FIBRPC_URL": f"{DEAD},{URL}"})
    assert result.returncode == 0, result.stderr
    status = run_cli("status", "--url", f"{DEAD},{URL}", "--queue", queue, "--json")
    assert status.returncode == 0, status.stderr
    assert f'"url": "{redact(URL)}"' in status.stdout
    assert "s3cret" not in status.stdout + status.stderr + result.stderr


def test_when_no_node_answers_each_is_named_and_no_password_shown():
    other = "amqp://guest:s3cret-too@127.0.0.1:2/%2F"
    result = run_cli("call", "30", "--url", f"{DEAD},{other}", "--timeout", "3")
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert "None of the 2 RabbitMQ nodes answered" in result.stderr
    assert "127.0.0.1:1" in result.stderr and "127.0.0.1:2" in result.stderr
    assert result.stderr.count("ConnectionRefusedError: Connection refused") == 2  # the why
    assert "s3cret" not in result.stderr


def test_a_server_spreads_its_workers_over_the_nodes_and_logs_where_each_is(serve, queue):
    server = serve("--url", DEAD, "--url", URL, workers=2)
    assert "s3cret" not in server.text
    assert server.text.count("fibrpc.server: consuming") == 2
    # The supervisor's check and worker 0 start at the first node, which does not answer;
    # worker 1 starts at the second (worker i at node i mod N), and goes straight in.
    assert server.text.count(f"{redact(URL)} (1 node(s) before it did not answer)") == 2
