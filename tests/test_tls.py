"""TLS for real: a throwaway CA, a private RabbitMQ node with only a TLS listener, and
``fibrpc serve`` and ``fibrpc call`` talking through it over ``amqps://``.

The node (``privatenode.py``, of the broker under test's version) listens on 127.0.0.1
(and 127.0.0.2 where that is a local address) on a spare port, with a server certificate
for ``localhost`` and 127.0.0.1 signed by the test CA. It asks clients for a certificate
and checks any it gets against the same CA, but does not require one. A second, unrelated
CA signs nothing the node trusts.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import NODE_CONFIG, NODE_VERSION, Server, run_cli, start_server
from privatenode import (
    PrivateNode,
    can_bind,
    issue_certificate,
    make_ca,
    private_node,
    spare_ports,
)

from fibrpc import BrokerUnreachableError, Client, ConfigError
from fibrpc.exitcodes import ExitCode
from fibrpc.tls import TLSOptions

#: A second loopback address, for a host the server certificate does not name.
OTHER_ADDRESS = "127.0.0.2"


@dataclasses.dataclass(frozen=True)
class TLSBroker:
    """The private node and the files a client needs to reach it."""

    node: PrivateNode
    port: int
    password: str
    ca: str  #: the CA that signed the node's certificate
    client_cert: str  #: signed by ``ca``
    client_key: str
    other_ca: str  #: an unrelated CA
    stranger_cert: str  #: a client certificate signed by ``other_ca``
    stranger_key: str
    other_address: bool  #: whether the node also listens on OTHER_ADDRESS

    def url(self, host: str = "localhost") -> str:
        return f"amqps://fibrpc:{self.password}@{host}:{self.port}/%2F"


#: Every test here talks to a private RabbitMQ node.
pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def tls_broker() -> Iterator[TLSBroker]:
    with tempfile.TemporaryDirectory(prefix="fibrpc-tls-", ignore_cleanup_errors=True) as tmp:
        yield from _tls_broker(Path(tmp))


def _tls_broker(top: Path) -> Iterator[TLSBroker]:
    # The certificates live in the node's own directory: a RabbitMQ 4 node runs in a root
    # of its own, where it sees that directory and nothing else of the host's.
    root = top / "node" / "tls"
    root.mkdir(parents=True)
    ca = make_ca(root, "fibrpc-test-ca")
    other_ca = make_ca(root, "unrelated-ca")
    server = issue_certificate(
        root, "localhost", ca, usage="serverAuth", alt_names="DNS:localhost,IP:127.0.0.1"
    )
    client = issue_certificate(root, "fibrpc-test-client", ca, usage="clientAuth")
    stranger = issue_certificate(root, "stranger", other_ca, usage="clientAuth")
    (port,) = spare_ports(1)
    other_address = can_bind(OTHER_ADDRESS)
    config = "\n".join(
        [
            "listeners.tcp = none",
            f"listeners.ssl.1 = 127.0.0.1:{port}",
            *([f"listeners.ssl.2 = {OTHER_ADDRESS}:{port}"] if other_address else []),
            f"ssl_options.cacertfile = {ca[0]}",
            f"ssl_options.certfile = {server[0]}",
            f"ssl_options.keyfile = {server[1]}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = false",
            "",
        ]
    )
    with private_node(
        top / "node", NODE_CONFIG + config, prefix="fibrpc-tls", version=NODE_VERSION
    ) as node:
        password = secrets.token_hex(8)
        for args in [
            ("add_user", "fibrpc", password),
            ("set_permissions", "-p", "/", "fibrpc", ".*", ".*", ".*"),
        ]:
            done = node.ctl(*args)
            assert done.returncode == 0, done.stderr
        yield TLSBroker(
            node=node,
            port=port,
            password=password,
            ca=str(ca[0]),
            client_cert=str(client[0]),
            client_key=str(client[1]),
            other_ca=str(other_ca[0]),
            stranger_cert=str(stranger[0]),
            stranger_key=str(stranger[1]),
            other_address=other_address,
        )


@pytest.fixture(scope="module")
def tls_queue(tls_broker: TLSBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A queue on the private node served by ``fibrpc serve`` over amqps://, presenting the
    client certificate."""
    queue = f"fibrpc-tls-{uuid.uuid4().hex[:8]}"
    # A --url of its own: start_server then passes no other.
    server: Server = start_server(
        queue,
        tmp_path_factory.mktemp("tls-serve"),
        "--url",
        tls_broker.url(),
        "--tls-ca-file",
        tls_broker.ca,
        "--tls-cert-file",
        tls_broker.client_cert,
        "--tls-key-file",
        tls_broker.client_key,
        workers=1,
    )
    try:
        yield queue
    finally:
        server.stop()


def _assert_one_line_without_password(stderr: str, broker: TLSBroker) -> None:
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert broker.password not in stderr
    assert "fibrpc:***@" in stderr


def test_fibrpc_call_through_amqps_with_the_ca_file_prints_832040(tls_broker, tls_queue):
    result = run_cli(
        "call", "30", "--url", tls_broker.url(), "--queue", tls_queue,
        "--tls-ca-file", tls_broker.ca,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"


def test_the_client_calls_through_amqps_by_host_name_or_by_ip_address(tls_broker, tls_queue):
    tls = TLSOptions(ca_file=tls_broker.ca)
    for host in ["localhost", "127.0.0.1"]:  # the certificate names both
        with Client(tls_broker.url(host), queue=tls_queue, timeout=10, tls=tls) as client:
            assert client.call(30) == 832040


def test_the_tls_options_can_come_from_the_environment(tls_broker, tls_queue):
    env = {
        "FIBRPC_URL": tls_broker.url(),
        "FIBRPC_QUEUE": tls_queue,
        "FIBRPC_TLS_CA_FILE": tls_broker.ca,
        "FIBRPC_TLS_CERT_FILE": tls_broker.client_cert,
        "FIBRPC_TLS_KEY_FILE": tls_broker.client_key,
    }
    result = run_cli("call", "30", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"


def test_certificates_are_checked_by_default_so_a_private_ca_is_refused(tls_broker):
    with pytest.raises(BrokerUnreachableError, match="certificate verify failed"):
        Client(tls_broker.url())
    result = run_cli("call", "30", "--url", tls_broker.url())
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert "TLS handshake" in result.stderr
    assert "certificate verify failed" in result.stderr
    _assert_one_line_without_password(result.stderr, tls_broker)


def test_a_server_certificate_the_ca_did_not_sign_is_refused(tls_broker):
    result = run_cli("call", "30", "--url", tls_broker.url(), "--tls-ca-file", tls_broker.other_ca)
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert "certificate verify failed" in result.stderr
    _assert_one_line_without_password(result.stderr, tls_broker)


def test_a_server_certificate_that_does_not_name_the_host_is_refused(tls_broker):
    if not tls_broker.other_address:
        pytest.skip(f"{OTHER_ADDRESS} is not a local address on this machine")
    url = tls_broker.url(OTHER_ADDRESS)  # the same node, at an address its certificate lacks
    result = run_cli("call", "30", "--url", url, "--tls-ca-file", tls_broker.ca)
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    assert f"IP address mismatch, certificate is not valid for '{OTHER_ADDRESS}'" in result.stderr
    _assert_one_line_without_password(result.stderr, tls_broker)


def test_the_client_certificate_is_presented_and_verified_by_the_broker(tls_broker, tls_queue):
    tls = TLSOptions(
        ca_file=tls_broker.ca, cert_file=tls_broker.client_cert, key_file=tls_broker.client_key
    )
    with Client(tls_broker.url(), queue=tls_queue, timeout=10, tls=tls) as client:
        assert client.call(30) == 832040
        certificates = _peer_certificates(tls_broker.node)
    presented = ("CN=fibrpc-test-client", "CN=fibrpc-test-ca")  # subject, issuer
    assert presented in certificates["fibrpc-client"]
    worker = next(name for name in certificates if name.startswith("fibrpc-worker-"))
    assert certificates[worker] == {presented}  # `fibrpc serve --tls-cert-file` too
    result = run_cli(
        "call", "30", "--url", tls_broker.url(), "--queue", tls_queue,
        "--tls-ca-file", tls_broker.ca,
        "--tls-cert-file", tls_broker.client_cert, "--tls-key-file", tls_broker.client_key,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"


def _peer_certificates(node: PrivateNode) -> dict[str, set[tuple[str, str]]]:
    """The (subject, issuer) of the client certificate of each connection to ``node``,
    by connection name, as the broker saw them."""
    listed = node.ctl(
        "-q", "list_connections", "--formatter", "json",
        "client_properties", "peer_cert_subject", "peer_cert_issuer",
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    certificates: dict[str, set[tuple[str, str]]] = {}
    for connection in json.loads(listed.stdout):
        properties = {key: value for key, _, value in connection["client_properties"]}
        certificates.setdefault(properties.get("connection_name", ""), set()).add(
            (connection["peer_cert_subject"], connection["peer_cert_issuer"])
        )
    return certificates


def _call_with_the_strangers_certificate(broker: TLSBroker) -> str:
    result = run_cli(
        "call", "30", "--url", broker.url(), "--tls-ca-file", broker.ca,
        "--tls-cert-file", broker.stranger_cert, "--tls-key-file", broker.stranger_key,
    )  # fmt: skip
    assert result.returncode == ExitCode.BROKER_UNREACHABLE, result.stderr
    _assert_one_line_without_password(result.stderr, broker)
    return result.stderr


def test_a_client_certificate_from_another_ca_is_refused_by_the_broker(tls_broker):
    # With TLS 1.3 the broker checks the client's certificate after the client has
    # finished its handshake: the client sees the "unknown ca" alert or, if the broker
    # closed the socket first, only an EOF. The broker's log says which.
    refusal = "generated SERVER ALERT: Fatal - Unknown CA"
    before = tls_broker.node.log.count(refusal)
    _call_with_the_strangers_certificate(tls_broker)
    deadline = time.monotonic() + 10
    while tls_broker.node.log.count(refusal) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tls_broker.node.log.count(refusal) > before


def test_a_refused_client_certificate_is_reported_as_a_tls_failure(tls_broker):
    stderr = _call_with_the_strangers_certificate(tls_broker)
    assert "TLS" in stderr
    assert "Is the broker running" not in stderr


def test_tls_no_verify_connects_without_checking_the_certificate(tls_broker, tls_queue):
    result = run_cli(
        "call", "30", "--url", tls_broker.url(), "--queue", tls_queue, "--tls-no-verify"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "832040\n"


def test_tls_options_with_a_plain_amqp_url_are_a_config_error(tls_broker):
    url = f"amqp://fibrpc:{tls_broker.password}@127.0.0.1:{tls_broker.port}/%2F"
    with pytest.raises(ConfigError, match=r"TLS options need an amqps:// URL"):
        Client(url, tls=TLSOptions(ca_file=tls_broker.ca))
    result = run_cli("call", "30", "--url", url, "--tls-ca-file", tls_broker.ca)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "amqps://" in result.stderr
    _assert_one_line_without_password(result.stderr, tls_broker)


def test_a_tls_file_that_is_not_what_it_claims_is_a_config_error(tls_broker):
    # A key given as the CA bundle: nothing in it to trust, refused before connecting.
    url, key = tls_broker.url(), tls_broker.client_key
    result = run_cli("call", "30", "--url", url, "--tls-ca-file", key)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert f"Cannot load the CA file {key!r}" in result.stderr  # names the bad file
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_client_key_without_its_certificate_is_a_config_error(tls_broker):
    with pytest.raises(ConfigError):
        TLSOptions(ca_file=tls_broker.ca, key_file=tls_broker.client_key).context()
