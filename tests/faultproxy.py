"""Network faults on loopback, for integration tests of an AMQP client or server.

``FaultProxy`` is a TCP proxy between the code under test and its broker: it listens on
127.0.0.1 (a free port) and forwards each connection it accepts to the target, bytes both
ways, until a test breaks the network in one of these ways (each applies to every current
and future connection):

* ``freeze()``: nothing moves either way, and nothing is lost: the proxy stops reading and
  writing, so the bytes it holds stay held and the senders' kernel buffers fill up. Both
  endpoints keep an open, silent connection, as with a paused VM or a network that stopped
  delivering. New connections complete in the kernel's backlog and wait there (they are not
  in ``connections`` yet). ``thaw()`` moves everything on, in order.
* ``blackhole()``: a network that drops every packet: the proxy reads whatever arrives,
  either way, and discards it (what it held too), keeping every socket open. New connections
  are accepted, and never dialled to the target. ``restore()`` serves new connections
  normally again; the blackholed ones stay dead (bytes were lost mid-stream, as they would
  be on a real network), until an endpoint closes them (heartbeat timeout, say).
* ``reset()``: every connection is aborted (SO_LINGER 0, so an RST) on both sides, and
  connections waiting in the backlog too.

One thread per proxy does all its I/O, on non-blocking sockets, with a selector. Controls
are commands run by that thread between two I/O operations, and return once done: after
``freeze()`` returns, not a byte more moves (a chunk already read is held until ``thaw()``,
then sent in order). A socket is only watched for what it may do now, so a frozen proxy, a
full buffer or a half-closed connection never spins the CPU. An error on one side of a
forwarded connection aborts the other side (an RST travels through); an EOF is passed on
as one once the bytes before it are.

``SilentListener`` accepts TCP connections and never sends a byte (it reads and discards
what arrives): a hung load balancer, or a broker that accepts TCP and never speaks AMQP.

``close()`` (or leaving the ``with`` block) stops the thread, joined with a timeout, and
closes every socket; every control waits a bounded time for the thread to answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

#: How long a control (freeze, reset...) may wait for the proxy's thread to run it.
CONTROL_TIMEOUT = 5.0
#: How long ``close()`` waits for the proxy's thread to end.
CLOSE_TIMEOUT = 5.0
#: Bytes read at once, and at most held for one direction before the proxy stops reading.
CHUNK = 65536
HELD_LIMIT = 4 * CHUNK
#: SO_LINGER on, 0 s: ``close()`` sends an RST instead of a FIN.
_LINGER_RST = struct.pack("ii", 1, 0)

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_WAKE, _LISTEN = "wake", "listen"  # selector data of the wake-up socket and the listener


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _abort(sock: socket.socket) -> None:
    """Close ``sock`` with an RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class _End:
    """One socket of a forwarded connection, and the bytes held for it."""

    __slots__ = ("connecting", "eof", "mask", "outbox", "shut", "sock")

    def __init__(self, sock: socket.socket, *, connecting: bool = False) -> None:
        self.sock = sock
        self.outbox = bytearray()  # read from the other end, to be written to this one
        self.eof = False  # this end sent its EOF (blackholed: or failed; it is not read)
        self.shut = False  # the other end's EOF was passed on to this one
        self.connecting = connecting  # a connect() to the target still in progress
        self.mask = 0  # the events the selector watches it for


class _Link:
    """An accepted connection and, unless it was blackholed then, its connection to the
    target. A ``dead`` (blackholed) link only reads and discards."""

    __slots__ = ("closed", "dead", "ends")

    def __init__(self, client: _End, upstream: _End | None) -> None:
        self.ends = [client] if upstream is None else [client, upstream]
        self.dead = upstream is None
        self.closed = False

    def other(self, end: _End) -> _End:
        return self.ends[1] if end is self.ends[0] else self.ends[0]


class _Command(Generic[T]):
    """A control to run on the proxy's thread, and its outcome."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()


class FaultProxy:
    """A TCP proxy from 127.0.0.1:``port`` to ``target_host``:``target_port`` that can
    freeze, blackhole and reset its connections (see the module docstring).
    ``blackholed=True`` starts it blackholed."""

    def __init__(self, target_host: str, target_port: int, *, blackholed: bool = False) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            target_host, target_port, type=socket.SOCK_STREAM
        )[0]
        self.target = (target_host, target_port)
        self._family, self._address = family, address
        self._lock = threading.Lock()  # guards _commands and _stopping
        self._commands: list[_Command[Any]] = []
        self._stopping = False
        self._closed = False
        self._error: BaseException | None = None
        # Owned by the proxy's thread once it runs:
        self._links: list[_Link] = []
        self._frozen = False
        self._blackholed = blackholed
        self._listener_mask = 0
        with contextlib.ExitStack() as stack:
            self._listener = stack.enter_context(socket.socket())
            self._listener.bind(("127.0.0.1", 0))
            self._listener.listen(128)
            self._listener.setblocking(False)
            self.port: int = self._listener.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            stack.enter_context(self._wake_r)
            stack.enter_context(self._wake_w)
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._selector = stack.enter_context(selectors.DefaultSelector())
            self._selector.register(self._wake_r, _READ, _WAKE)
            self._thread = threading.Thread(
                target=self._run, name=f"faultproxy-{self.port}", daemon=True
            )
            self._thread.start()
            stack.pop_all()  # from here on, the thread closes them

    def __repr__(self) -> str:
        host, port = self.target
        return f"<{type(self).__name__} 127.0.0.1:{self.port} -> {host}:{port}>"

    # -- for tests ----------------------------------------------------------------------

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's (user, password,
        vhost and query kept)."""
        parts = urlsplit(amqp_url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{self.port}"))

    @property
    def connections(self) -> int:
        """How many accepted connections are open now."""
        return len(self._links)

    def wait_connections(self, count: int, timeout: float = 10.0) -> None:
        """Wait until exactly ``count`` connections are open; TimeoutError if they are not
        within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.connections != count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self!r}: {self.connections} connections open, not {count}, after {timeout} s"
                )
            time.sleep(0.01)

    def freeze(self) -> None:
        """Stop moving bytes, either way; they are held, not dropped."""
        self._call(lambda: setattr(self, "_frozen", True))

    def thaw(self) -> None:
        """Move bytes again: the held ones first, in order."""
        self._call(lambda: setattr(self, "_frozen", False))

    def blackhole(self) -> None:
        """Read and discard everything, either way, on every connection; dial nothing."""
        self._call(self._blackhole)

    def restore(self) -> None:
        """Forward new connections again (blackholed ones stay dead)."""
        self._call(lambda: setattr(self, "_blackholed", False))

    def reset(self) -> int:
        """Abort (RST) every connection on both sides; how many there were."""
        count: int = self._call(self._reset)
        return count

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the proxy and close every socket: a FIN each (an RST, from the kernel,
        where bytes sent to the proxy were still unread). RuntimeError if its thread does
        not end within ``timeout`` seconds, or had failed."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self!r}: its thread did not end within {timeout} s")
        self._wake_w.close()
        if self._error is not None:
            raise RuntimeError(f"{self!r} failed: {self._error!r}") from self._error

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- controls, run on the proxy's thread ----------------------------------------------

    def _call(self, fn: Callable[[], T], timeout: float = CONTROL_TIMEOUT) -> T:
        command = _Command(fn)
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"{self!r} is closed") from self._error
            self._commands.append(command)
        self._wake()
        if not command.done.wait(timeout):
            raise RuntimeError(f"{self!r}: its thread did not answer within {timeout} s")
        if command.error is not None:
            raise command.error
        return command.result  # type: ignore[return-value]

    def _wake(self) -> None:
        # BlockingIOError: the socket is full of wake-ups already.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _blackhole(self) -> None:
        self._blackholed = True
        for link in self._links:
            link.dead = True
            for end in link.ends:
                end.outbox.clear()

    def _reset(self) -> int:
        count = 0
        while True:  # completed by the kernel but not accepted yet (while frozen, say)
            try:
                sock, _ = self._listener.accept()
            except ConnectionAbortedError:
                continue
            except OSError:  # BlockingIOError: none left
                break
            _abort(sock)
            count += 1
        for link in list(self._links):
            self._close_link(link, abort=True)
            count += 1
        return count

    # -- the proxy's thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._refresh()
                ready = self._selector.select()
                if any(key.data is _WAKE for key, _ in ready):
                    self._run_commands()
                    continue  # they may have changed what each socket is for: select again
                for key, mask in ready:
                    if key.data is _LISTEN:
                        self._accept()
                    else:
                        self._service(*key.data, mask)
        except BaseException as exc:
            self._error = exc
        finally:
            self._shut_down()

    def _run_commands(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            command.run()

    def _shut_down(self) -> None:
        with self._lock:
            self._stopping = True
            commands, self._commands = self._commands, []
        for command in commands:
            command.error = RuntimeError(f"{self!r} is closed")
            command.done.set()
        for link in self._links:  # a FIN each; the selector forgets them as it closes
            for end in link.ends:
                end.sock.close()
        self._links.clear()
        self._selector.close()
        self._listener.close()
        self._wake_r.close()

    def _watch(self, sock: socket.socket, old: int, new: int, data: object) -> int:
        """Have the selector watch ``sock`` for ``new`` events (it did for ``old``)."""
        if new != old:
            if not old:
                self._selector.register(sock, new, data)
            elif not new:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, new, data)
        return new

    def _refresh(self) -> None:
        self._listener_mask = self._watch(
            self._listener, self._listener_mask, 0 if self._frozen else _READ, _LISTEN
        )
        for link in self._links:
            for end in link.ends:
                end.mask = self._watch(end.sock, end.mask, self._wanted(link, end), (link, end))

    def _wanted(self, link: _Link, end: _End) -> int:
        if self._frozen:
            return 0
        if link.dead:
            return 0 if end.eof else _READ
        if end.connecting:
            return _WRITE
        mask = _WRITE if end.outbox else 0
        if not end.eof and len(link.other(end).outbox) < HELD_LIMIT:
            mask |= _READ
        return mask

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except ConnectionAbortedError:
                continue
            except OSError:  # BlockingIOError: none left
                return
            sock.setblocking(False)
            _nodelay(sock)
            if self._blackholed:
                self._links.append(_Link(_End(sock), None))
                continue
            upstream = socket.socket(self._family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            _nodelay(upstream)
            failed = upstream.connect_ex(self._address)
            if failed not in (0, errno.EINPROGRESS):
                upstream.close()
                _abort(sock)
                continue
            self._links.append(_Link(_End(sock), _End(upstream, connecting=True)))

    def _service(self, link: _Link, end: _End, mask: int) -> None:
        if link.closed:  # by an earlier event of the same select
            return
        if link.dead:
            self._discard(link, end)
            return
        try:
            if end.connecting:
                failed = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if failed:
                    raise OSError(failed, os.strerror(failed))
                end.connecting = False
            if mask & _READ:
                data = end.sock.recv(CHUNK)
                if data:
                    link.other(end).outbox += data
                else:
                    end.eof = True
            if mask & _WRITE and end.outbox:
                del end.outbox[: end.sock.send(end.outbox)]
            self._pass_eofs(link)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset, refused, broken pipe: abort the other side too
            self._close_link(link, abort=True)

    def _pass_eofs(self, link: _Link) -> None:
        for src in link.ends:
            dst = link.other(src)
            if src.eof and not dst.shut and not dst.outbox and not dst.connecting:
                dst.sock.shutdown(socket.SHUT_WR)
                dst.shut = True
        if all(end.shut for end in link.ends):
            self._close_link(link, abort=False)

    def _discard(self, link: _Link, end: _End) -> None:
        try:
            data = end.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            end.eof = True
            if all(e.eof for e in link.ends):
                self._close_link(link, abort=False)

    def _close_link(self, link: _Link, *, abort: bool) -> None:
        link.closed = True
        self._links.remove(link)
        for end in link.ends:
            end.mask = self._watch(end.sock, end.mask, 0, None)
            if abort:
                _abort(end.sock)
            else:
                end.sock.close()


class SilentListener:
    """Accepts TCP connections on 127.0.0.1:``port`` and never sends a byte."""

    def __init__(self) -> None:
        # A proxy blackholed from the start, never restored: it never dials its target.
        self._proxy = FaultProxy("127.0.0.1", 0, blackholed=True)
        self.port = self._proxy.port

    def __repr__(self) -> str:
        return f"<SilentListener 127.0.0.1:{self.port}>"

    def url(self) -> str:
        """An AMQP URL pointing at it."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return self._proxy.connections

    def wait_connections(self, count: int, timeout: float = 10.0) -> None:
        """As ``FaultProxy.wait_connections``."""
        self._proxy.wait_connections(count, timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop listening and close every connection."""
        self._proxy.close(timeout)

    def __enter__(self) -> SilentListener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
