"""A throwaway RabbitMQ node, for tests that need a broker set up unlike the shared one.

The node is a real ``rabbitmq-server`` started in the foreground as a child of the test,
in its own process group, with everything of its own: node name, ports (found free),
configuration, enabled-plugins file, data and log directories, and Erlang cookie (its
``HOME`` is the node's directory, so ``rabbitmqctl`` reaches it and nothing else). It
reads nothing from ``/etc/rabbitmq`` and never touches the shared node's data.
``private_node`` stops it, and kills whatever is left of it, however the test ends.

Also here: ``make_ca`` and ``issue_certificate``, a throwaway certificate authority in
a few ``openssl`` commands.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Where the real scripts live: on Debian, /usr/sbin/rabbitmq-* are wrappers that switch
#: to the rabbitmq user (whose HOME and cookie are the shared node's).
_SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin")
BOOT_TIMEOUT = 90.0


def spare_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (held open together while
    they are chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def can_bind(address: str) -> bool:
    """Whether a listener can bind ``address`` (127.0.0.2 works on Linux, not macOS)."""
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def _script(name: str) -> str:
    for folder in _SCRIPT_DIRS:
        path = Path(folder, name)
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed (apt-get install rabbitmq-server); the TLS tests start "
            "a private RabbitMQ node of their own.",
            pytrace=False,
        )
    return found


class PrivateNode:
    """One private RabbitMQ node living in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, config: str, *, prefix: str = "fibrpc-test") -> None:
        self.root = root
        self.name = f"{prefix}-{secrets.token_hex(4)}@localhost"
        self.dist_port, self.node_port = spare_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "rabbitmq.conf").write_text(config)
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        cookie = root / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(root),  # the cookie above, for the node and for rabbitmqctl
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.node_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "node.pid"),
            # Distribution on loopback only, like the shared node.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def log(self) -> str:
        """The node's console output and log, for failure messages."""
        texts = [p.read_text(errors="replace") for p in sorted(self.root.glob("*.log"))]
        texts += [p.read_text(errors="replace") for p in sorted(self.root.glob("log/*.log"))]
        return "\n".join(texts)

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node (not checked)."""
        return subprocess.run(
            [_script("rabbitmqctl"), "-n", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=self.env,
            check=False,
        )

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start the node and wait until it has booted; a test failure with its log if it
        dies or does not come up within ``timeout`` seconds."""
        with (self.root / "console.log").open("wb") as out:
            self.proc = subprocess.Popen(
                [_script("rabbitmq-server")],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            # await_startup fails at once while the node is not yet registered with epmd.
            seconds = max(1, int(left))
            waited = self.ctl("await_startup", "--timeout", str(seconds), timeout=seconds + 15)
            if waited.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                state = f"(it exited with code {code})" if code is not None else "in time"
                pytest.fail(
                    f"The private RabbitMQ node {self.name} did not start {state} "
                    f"({timeout:.0f} s allowed):\n{waited.stderr[-2000:]}\n{self.log[-4000:]}",
                    pytrace=False,
                )
            time.sleep(0.25)

    def stop(self) -> None:
        """Stop the node politely, then kill its process group whatever remains."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.ctl("stop", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        # Erlang's helpers (erl_child_setup, inet_gethost) share the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


@contextlib.contextmanager
def private_node(root: Path, config: str, *, prefix: str = "fibrpc-test") -> Iterator[PrivateNode]:
    """A started ``PrivateNode`` in ``root``, stopped (and its remains killed) afterwards.
    ``root`` belongs to the caller, who removes it."""
    node = PrivateNode(root, config, prefix=prefix)
    try:
        node.start()
        yield node
    finally:
        node.stop()


# -- a throwaway certificate authority ------------------------------------------------------

#: A new, unencrypted P-256 key: quick to make, and both OpenSSL and Erlang speak it.
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{result.stderr}", pytrace=False)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA named ``name``: (certificate, key), valid for two days."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", *_NEW_KEY, "-days", "2", "-subj", f"/CN={name}",
        "-keyout", key, "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def issue_certificate(
    folder: Path,
    name: str,
    ca: tuple[Path, Path],
    *,
    usage: str,
    alt_names: str | None = None,
) -> tuple[Path, Path]:
    """A certificate for CN=``name`` signed by ``ca``: (certificate, key). ``usage`` is
    ``serverAuth`` or ``clientAuth``; ``alt_names`` an openssl subjectAltName value."""
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    extensions = folder / f"{name}.ext"
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if alt_names:
        lines.append(f"subjectAltName={alt_names}")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl("req", *_NEW_KEY, "-subj", f"/CN={name}", "-keyout", key, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-days", "2",
        "-set_serial", str(secrets.randbits(63)), "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return cert, key
