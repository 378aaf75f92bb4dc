"""A throwaway RabbitMQ node, for tests that need a broker set up unlike the shared one.

The node is a real ``rabbitmq-server`` started in the foreground as a child of the test,
in its own process group, with everything of its own: node name, ports (found free),
configuration, enabled-plugins file, data and log directories, and Erlang cookie (its
``HOME`` is the node's directory, so ``rabbitmqctl`` reaches it and nothing else). It
reads nothing from ``/etc/rabbitmq`` and never touches the shared node's data.
``private_node`` stops it, and kills whatever is left of it, however the test ends.

By default the node is the machine's own RabbitMQ (Debian 12: 3.10). ``version`` names
another line of RabbitMQ by the Debian suite it comes from (``SUITES``): ``"trixie"``
(Debian 13: 4.0) or ``"sid"`` (Debian unstable: today's, 4.3.6 in December 2026; sid
moves, so ``PrivateNode.server_version`` says what ran). Its root is built once per
machine by ``scripts/rabbitmq-root.sh SUITE`` (see ``rabbitmq_root``): the node, and
``rabbitmqctl`` for it (the root's own), run chrooted in that root, each in a mount and
PID namespace of its own (``unshare``), with /proc, /dev and the node's directory (at the
same path) mounted inside. Those mounts vanish with the namespace, so nothing stays
mounted on the host, and killing the node's process group ends every process of the
namespace.

Also here: ``make_ca`` and ``issue_certificate``, a throwaway certificate authority in
a few ``openssl`` commands.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
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

#: Builds (once per machine) and prints the root that holds another line of RabbitMQ.
ROOT_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rabbitmq-root.sh"
#: How long building that root may take (debootstrap: ~40 s here, slower on a cold mirror).
ROOT_BUILD_TIMEOUT = 1200.0

#: The lines of RabbitMQ a private node can run besides the machine's own, by the Debian
#: suite whose ``rabbitmq-server`` package they come from.
SUITES = ("trixie", "sid")
#: ``version="4"``: the name of the trixie line before sid joined it.
_ALIASES = {"4": "trixie"}

#: rabbitmq.conf lines that deny every deprecated feature a line knows (as listed by
#: ``rabbitmqctl list_deprecated_features`` with no plugins enabled: on 4.0.5 for
#: trixie, on 4.3.6 for sid), so a node refuses what later releases will refuse by
#: default: e.g. declaring a non-durable, non-exclusive queue closes the connection with
#: 541 (transient_nonexcl_queues; still permitted by default on 4.3.6, whose other
#: deprecated features are denied or removed by default). Not all are refusals: with
#: global_qos denied, basic.qos global=true is accepted and silently applied per consumer
#: (global=false). A node boots with a name it does not know (it logs "Deprecated
#: features: `NAME`: undefined" and permits it), so a misspelt line is silently
#: ineffective: ``tests/test_rabbitmq4.py`` checks that the node under test denies every
#: feature it lists (a new one in a newer sid fails there). Not for the 3.10 node: it
#: does not know these keys and fails to boot (failed_to_prepare_configuration).
_DEPRECATED_FEATURES = {
    "trixie": (
        "amqp_address_v1",
        "classic_queue_mirroring",
        "global_qos",
        "queue_master_locator",
        "ram_node_type",
        "transient_nonexcl_queues",
    ),
    "sid": (
        "amqp_address_v1",
        "amqp_filter_set_bug",
        "classic_queue_mirroring",
        "global_qos",
        "queue_master_locator",
        "ram_node_type",
        "transient_nonexcl_queues",
    ),
}


def suite_of(version: str | None) -> str | None:
    """The Debian suite of a node's ``version`` (None: the machine's own RabbitMQ); a
    ``ValueError`` naming the bad value for any other."""
    if version is None:
        return None
    suite = _ALIASES.get(version, version)
    if suite not in SUITES:
        raise ValueError(
            f"version must be None (the machine's RabbitMQ) or one of {', '.join(SUITES)} "
            f"(a Debian suite), not {version!r}"
        )
    return suite


def deny_deprecated(version: str | None) -> str:
    """The rabbitmq.conf lines that deny every deprecated feature of ``version``'s line
    ("" for the machine's own 3.10, which knows none)."""
    suite = suite_of(version)
    if suite is None:
        return ""
    return "".join(
        f"deprecated_features.permit.{name} = false\n" for name in _DEPRECATED_FEATURES[suite]
    )


#: The 4.0 line's (kept for tests written before sid joined).
DENY_DEPRECATED = deny_deprecated("trixie")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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


@functools.cache
def rabbitmq_root(suite: str) -> Path:
    """The root holding the RabbitMQ of Debian ``suite``, built by
    ``scripts/rabbitmq-root.sh SUITE`` if it is not there yet (~40 s, once per machine); a
    test failure with the script's output if that fails. ``FIBRPC_RABBITMQ_ROOTS`` moves it
    (default /var/lib/fibrpc/rabbitmq-SUITE-root)."""
    try:
        result = subprocess.run(
            ["bash", str(ROOT_SCRIPT), suite],
            capture_output=True,
            text=True,
            timeout=ROOT_BUILD_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        output = "\n".join(
            (x.decode(errors="replace") if isinstance(x, bytes) else x or "")
            for x in (exc.stdout, exc.stderr)
        )
        pytest.fail(
            f"{ROOT_SCRIPT} {suite} did not finish in {ROOT_BUILD_TIMEOUT:.0f} s:\n"
            f"{output[-6000:]}",
            pytrace=False,
        )
    lines = result.stdout.strip().splitlines()
    path = Path(lines[-1]) if lines else None
    if result.returncode != 0 or path is None or not path.is_dir():
        pytest.fail(
            f"{ROOT_SCRIPT} {suite} failed (exit code {result.returncode}); a private node "
            f"of that line needs the root it builds:\n{result.stdout[-2000:]}\n"
            f"{result.stderr[-6000:]}",
            pytrace=False,
        )
    return path


def root_package(root: Path) -> str:
    """The Debian version of ``rabbitmq-server`` in ``root`` (e.g. ``4.3.6-1``), as the
    marker written by ``scripts/rabbitmq-root.sh`` records it ("" if it does not)."""
    marker = root / ".fibrpc-rabbitmq-root"
    for line in marker.read_text().splitlines() if marker.is_file() else ():
        key, _, value = line.partition("=")
        if key == "rabbitmq-server":
            return value
    return ""


#: Run inside a new mount (and PID) namespace by ``unshare``: mount what the node needs
#: into the root, then chroot into it and run the command. $1 the root, $2 the node's
#: directory, the rest the command. Under /tmp, the mount point for the node's directory
#: is made in a tmpfs private to the namespace, so the shared root gains nothing.
_ENTER_ROOT = r"""
set -eu
fs=$1 dir=$2
shift 2
mount -t proc -o nosuid,nodev,noexec proc "$fs/proc"
mount --rbind /dev "$fs/dev"
mount -t tmpfs -o mode=1777 tmpfs "$fs/tmp"
mkdir -p "$fs$dir"
mount --bind "$dir" "$fs$dir"
path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec chroot "$fs" /usr/bin/env PATH="$path" "$@"
"""


class PrivateNode:
    """One private RabbitMQ node living in ``root`` (see the module docstring).

    ``version`` (a Debian suite of ``SUITES``) runs that line of RabbitMQ from
    ``rabbitmq_root(version)`` (built if missing); ``root_fs`` names such a root
    explicitly. Neither: the machine's own RabbitMQ."""

    def __init__(
        self,
        root: Path,
        config: str,
        *,
        prefix: str = "fibrpc-test",
        version: str | None = None,
        root_fs: Path | None = None,
        cookie: str | None = None,
    ) -> None:
        """``cookie``: the Erlang cookie, shared by the nodes of a cluster (else new)."""
        self.suite = suite_of(version)
        if root_fs is None and self.suite is not None:
            root_fs = rabbitmq_root(self.suite)
        self.root_fs = root_fs
        root = Path(os.path.abspath(root))
        self.root = root
        self.name = f"{prefix}-{secrets.token_hex(4)}@localhost"
        self.dist_port, self.node_port = spare_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "rabbitmq.conf").write_text(config)
        (root / "enabled_plugins").write_text("[].\n")
        (root / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        cookie_file = root / ".erlang.cookie"
        if not cookie_file.exists():
            cookie_file.write_text(cookie or secrets.token_hex(16))
            cookie_file.chmod(0o400)
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

    def command(self, name: str, *args: str) -> list[str]:
        """The argv that runs RabbitMQ script ``name`` (rabbitmq-server, rabbitmqctl,
        rabbitmq-diagnostics...) for this node: the host's, or the root's inside it."""
        if self.root_fs is None:
            return [_script(name), *args]
        return [
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
            "--kill-child", "--", "/bin/sh", "-c", _ENTER_ROOT, "enter-root",
            str(self.root_fs), str(self.root), f"/usr/lib/rabbitmq/bin/{name}", *args,
        ]  # fmt: skip

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node (not checked)."""
        return subprocess.run(
            self.command("rabbitmqctl", "-n", self.name, *args),
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
                self.command("rabbitmq-server"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
                cwd=self.root,
                # A test process killed outright takes its nodes with it (unshare's
                # --kill-child then ends everything in the node's namespace).
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads of ours yet matter
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

    def url(self, user: str = "guest", password: str = "guest") -> str:
        """The node's AMQP URL (guest may log in: it is on localhost)."""
        return f"amqp://{user}:{password}@127.0.0.1:{self.node_port}/%2F"

    def server_version(self) -> str:
        """The RabbitMQ version the running node reports (``rabbitmqctl version``: e.g.
        ``4.3.6``); a test failure if it cannot say."""
        return self.checked("version").strip()

    def kill(self) -> None:
        """``kill -9`` the node and everything of it (a real crash: its data stays, and
        ``start`` brings it back as the node it was)."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def checked(self, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl ARGS`` on this node; a test failure with its output if it fails."""
        result = self.ctl(*args, timeout=timeout)
        if result.returncode != 0:
            pytest.fail(
                f"rabbitmqctl {' '.join(args)} on {self.name} failed:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}",
                pytrace=False,
            )
        return result.stdout

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
def private_node(
    root: Path,
    config: str,
    *,
    prefix: str = "fibrpc-test",
    version: str | None = None,
    root_fs: Path | None = None,
) -> Iterator[PrivateNode]:
    """A started ``PrivateNode`` in ``root``, stopped (and its remains killed) afterwards.
    ``root`` belongs to the caller, who removes it. ``version``: as ``PrivateNode``'s."""
    node = PrivateNode(root, config, prefix=prefix, version=version, root_fs=root_fs)
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


@contextlib.contextmanager
def private_cluster(
    root: Path, count: int, config: str, *, version: str | None = None
) -> Iterator[list[PrivateNode]]:
    """``count`` private nodes with one Erlang cookie, the second and later joined to the
    first: one RabbitMQ cluster, stopped and killed afterwards like ``private_node``.
    ``version``: as ``PrivateNode``'s (None, "trixie", "sid")."""
    cookie = secrets.token_hex(16)
    nodes = [
        PrivateNode(root / f"node{i + 1}", config, prefix="fibrpc-cluster", version=version,
                    cookie=cookie)
        for i in range(count)
    ]  # fmt: skip
    try:
        for node in nodes:
            node.start()
        for node in nodes[1:]:
            node.checked("stop_app")
            node.checked("join_cluster", nodes[0].name)
            node.checked("start_app")
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not all(n.name in nodes[0].checked("cluster_status") for n in nodes):
            if time.monotonic() > deadline:
                pytest.fail("The private cluster did not form in time.", pytrace=False)
            time.sleep(0.5)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
