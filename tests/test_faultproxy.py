"""The fault-injection helpers of ``tests/faultproxy.py``, with plain sockets to an echo
server of the test's own (no broker), and once with pika through the proxy to the local
broker. Each test says in its name what must hold."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest
from conftest import LOCAL_URL
from faultproxy import FaultProxy, SilentListener
from privatenode import spare_ports

#: How long the echo server waits for a byte before it gives a connection up.
ECHO_IDLE = 10.0


class _EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(ECHO_IDLE)
        self.server.count("accepted")
        try:
            while data := sock.recv(65536):
                self.server.count("received", len(data))
                sock.sendall(data)
        except ConnectionResetError:
            self.server.count("resets")
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back, on 127.0.0.1:``port``, a thread per connection (joined
    by ``close()``, each bounded by ``ECHO_IDLE``); counts what it saw."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.port: int = self.server_address[1]
        self.counts = {"accepted": 0, "received": 0, "resets": 0}
        self._counts_lock = threading.Lock()
        self._serving = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="echo", daemon=True
        )
        self._serving.start()

    def count(self, what: str, amount: int = 1) -> None:
        with self._counts_lock:
            self.counts[what] += amount

    def close(self) -> None:
        self.shutdown()
        self.server_close()  # joins the connections' threads
        self._serving.join(5)

    def __enter__(self) -> EchoServer:  # type: ignore[override]
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    """A proxy to ``echo`` (closed before it)."""
    with FaultProxy("127.0.0.1", echo.port) as fault_proxy:
        yield fault_proxy


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _recv_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < size:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def _drain(sock: socket.socket, seconds: float) -> bytes:
    """Whatever arrives within ``seconds``."""
    data = bytearray()
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError):
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return bytes(data)


def _assert_silent(sock: socket.socket, seconds: float) -> None:
    sock.settimeout(seconds)
    with pytest.raises(TimeoutError):
        sock.recv(1)


def _echoes(sock: socket.socket, payload: bytes = b"ping") -> None:
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bytes_are_forwarded_both_ways_in_order(proxy, echo):
    payload = random.Random(1).randbytes(2 * 1024 * 1024)  # past every buffer on the way
    with _connect(proxy.port) as sock:
        _echoes(sock)
        proxy.wait_connections(1)
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        try:
            assert _recv_exactly(sock, len(payload), timeout=20) == payload
        finally:
            sender.join(20)
    proxy.wait_connections(0)  # the client's EOF went through, and the echo's back
    assert echo.counts["received"] == 4 + len(payload)


def test_freeze_holds_bytes_without_spinning_and_thaw_delivers_them_in_order(proxy, echo):
    with _connect(proxy.port) as sock:
        _echoes(sock)
        proxy.freeze()
        for part in (b"one ", b"two ", b"three"):
            sock.sendall(part)
        with _connect(proxy.port) as late:  # waits in the backlog until the thaw
            late.sendall(b"late")
            cpu = time.process_time()
            _assert_silent(sock, 0.5)
            _assert_silent(late, 0.0001)
            assert time.process_time() - cpu < 0.2, "a frozen proxy busy-loops"
            assert echo.counts["received"] == 4
            assert proxy.connections == 1
            proxy.thaw()
            assert _recv_exactly(sock, 13) == b"one two three"
            assert _recv_exactly(late, 4) == b"late"


def test_freeze_is_race_free_with_bytes_in_flight(proxy):
    sent, got = bytearray(), bytearray()
    with _connect(proxy.port) as sock:
        for i in range(30):
            chunk = f"<{i}>".encode() * 500
            sock.sendall(chunk)
            sent += chunk
            proxy.freeze()  # whatever the proxy read already stays held
            got += _drain(sock, 0.01)
            proxy.thaw()
        got += _recv_exactly(sock, len(sent) - len(got))
        assert _drain(sock, 0.1) == b""
    assert got == sent  # nothing lost, doubled or reordered


def test_blackhole_drops_everything_and_restore_serves_only_new_connections(proxy, echo):
    with _connect(proxy.port) as old:
        _echoes(old)
        proxy.blackhole()
        old.sendall(b"dropped")
        with _connect(proxy.port) as new:  # accepted, never forwarded
            new.sendall(b"dropped too")
            proxy.wait_connections(2)
            _assert_silent(old, 0.3)
            _assert_silent(new, 0.01)
        proxy.restore()
        old.sendall(b"still dropped")
        _assert_silent(old, 0.3)
        assert echo.counts == {"accepted": 1, "received": 4, "resets": 0}
        with _connect(proxy.port) as fresh:
            _echoes(fresh)
        assert echo.counts["accepted"] == 2


def test_reset_aborts_both_sides_of_every_connection(proxy, echo):
    with _connect(proxy.port) as sock:
        _echoes(sock)
        assert proxy.reset() == 1
        sock.settimeout(5)
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        _wait_for(lambda: echo.counts["resets"] == 1, 5, "the echo server to see an RST")
        assert proxy.connections == 0
    proxy.freeze()
    with _connect(proxy.port) as waiting:  # in the backlog: reset too
        assert proxy.reset() == 1
        waiting.settimeout(5)
        with pytest.raises(ConnectionResetError):
            waiting.recv(1)


def test_a_target_that_refuses_resets_the_client():
    [port] = spare_ports(1)
    # The RST may come before connect() returns (it polls for the handshake), or after.
    with (
        FaultProxy("127.0.0.1", port) as proxy,
        pytest.raises(ConnectionResetError),
        _connect(proxy.port) as sock,
    ):
        sock.settimeout(5)
        sock.recv(1)


def test_silent_listener_accepts_and_never_answers():
    with SilentListener() as silent:
        assert silent.url() == f"amqp://guest:guest@127.0.0.1:{silent.port}/%2F"
        with _connect(silent.port) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            silent.wait_connections(1)
            _assert_silent(sock, 0.5)
        silent.wait_connections(0)


def test_url_keeps_all_but_host_and_port(proxy):
    at = f"127.0.0.1:{proxy.port}"
    assert proxy.url("amqp://u:p%40w@broker.example:5671/v%2Fh?heartbeat=5") == (
        f"amqp://u:p%40w@{at}/v%2Fh?heartbeat=5"
    )
    assert proxy.url("amqp://[::1]/%2F") == f"amqp://{at}/%2F"


def test_close_leaves_no_thread_and_no_socket():
    threads, fds = threading.active_count(), _open_fds()
    with EchoServer() as echo:
        proxy, silent = FaultProxy("127.0.0.1", echo.port), SilentListener()
        with _connect(proxy.port) as a, _connect(silent.port) as b, _connect(proxy.port) as c:
            _echoes(a)
            proxy.freeze()
            c.sendall(b"held")
            b.sendall(b"ignored")
            silent.wait_connections(1)
            proxy.close()
            silent.close()
            proxy.close()  # twice is fine
            for sock in (a, b):
                sock.settimeout(5)
                # A FIN; an RST if bytes sent were still unread (b's, perhaps).
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(1) == b""
        with pytest.raises(RuntimeError, match="closed"):
            proxy.thaw()
    assert threading.active_count() == threads
    assert _open_fds() == fds


@pytest.mark.broker
def test_pika_through_the_proxy_sees_its_connection_dropped_by_a_reset():
    target = urlsplit(LOCAL_URL)
    assert target.hostname is not None and target.port is not None
    with FaultProxy(target.hostname, target.port) as proxy:
        url = proxy.url(LOCAL_URL + "?connection_attempts=1&socket_timeout=5&heartbeat=30")
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            queue = conn.channel().queue_declare("", exclusive=True).method.queue
            assert queue.startswith("amq.gen-")
            assert proxy.connections == 1
            assert proxy.reset() == 1
            deadline = time.monotonic() + 5
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                while time.monotonic() < deadline:
                    conn.process_data_events(time_limit=0.05)
            assert conn.is_closed
        finally:
            if conn.is_open:
                conn.close()
