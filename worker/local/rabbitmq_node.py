"""A throwaway RabbitMQ node for tests and local runs, from Debian's `rabbitmq-server` package:
its own port, node name, data and log folders, cookie and configuration, so that it touches
neither /var/lib/rabbitmq nor another node on the machine. Run as root, it runs as the
`rabbitmq` user (the package's own), and its folders belong to that user.

    python -m worker.local.rabbitmq_node start DIR   # prints the amqp:// URL once the node answers
    python -m worker.local.rabbitmq_node stop DIR
    python -m worker.local.rabbitmq_node test [PYTEST ARGS]   # make test-rabbitmq
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.local.hosts import Host

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
DIAGNOSTICS = Path("/usr/lib/rabbitmq/bin/rabbitmq-diagnostics")
INSTALL_HINT = "RabbitMQ is not installed: `apt-get install -y rabbitmq-server` (Debian/Ubuntu, as root)"
# The broker settings that matter for the worker (docs/brokers.md). consumer_timeout: a delivery
# left unacknowledged this long closes its channel and hands the message back. The worker holds a
# message only while it runs (a 10,000-entry import takes seconds); retry countdowns wait in the
# broker (native delayed delivery, worker/brokers/topology.py), so RabbitMQ's default of 30 minutes is kept,
# written down here.
CONFIG = """\
listeners.tcp.default = {port}
loopback_users.guest = true
consumer_timeout = 1800000
log.console = false
log.file.level = warning
definitions.import_backend = local_filesystem
definitions.local.path = {definitions}
"""
# The default vhost, and `isolated` for a test that needs a broker of its own beside the shared one
# (as Redis database numbers do on Redis).
VHOSTS = ("/", "isolated")
DEFINITIONS = {
    "users": [{"name": "guest", "password": "guest", "tags": ["administrator"]}],
    "vhosts": [{"name": name} for name in VHOSTS],
    "permissions": [{"user": "guest", "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
                    for name in VHOSTS],
}


def installed() -> bool:
    return SERVER.exists() and shutil.which("erl") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RabbitNode:
    """One node under `root`. start() and kill() may be called again (same port, same data).

    With a `host` (worker/local/hosts.py) the node runs in that host's network namespace as
    `rabbit@<address>` (an Erlang long name: no /etc/hosts needed), on the standard ports of its
    address, with `config` added to its rabbitmq.conf and the `cookie` its cluster shares
    (worker/local/cluster.py)."""

    def __init__(self, root: Path, port: int | None = None, *, host: "Host | None" = None,
                 config: str = "", cookie: str | None = None) -> None:
        self.root = Path(root)
        self.host = host
        self.extra_config = config
        self.cookie = cookie
        if host is None:
            self.address = "127.0.0.1"
            self.port = port or free_port()
            self.dist_port = free_port()
            self.name = f"invoice-{self.port}@localhost"
        else:
            self.address = host.address
            self.port = port or 5672
            self.dist_port = 25672
            self.name = f"rabbit@{host.address}"
        self.url = f"amqp://guest:guest@{self.address}:{self.port}//"
        self.process: subprocess.Popen | None = None
        self._user = pwd.getpwnam("rabbitmq") if os.geteuid() == 0 else None

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_NODE_IP_ADDRESS": self.address,
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"), "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            # The Erlang schedulers' busy waiting off (RabbitMQ's advice for a host it shares: its
            # docs, runtime, "Scheduler busy waiting"): an idle scheduler spins on a core before it
            # sleeps, the CPU the worker and PostgreSQL beside it on this machine need.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+sbwt none +sbwtdcpu none +sbwtdio none",
            **({"RABBITMQ_USE_LONGNAME": "true"} if self.host is not None else {}),
        }

    def _command(self, argv: list[str]) -> tuple[list[str], dict]:
        """argv and Popen's keywords to run it as the node's user (on its host)."""
        if self.host is None:
            return argv, self._run_as()
        # `ip netns exec` needs root; the user changes inside the namespace
        user = [] if self._user is None else ["setpriv", f"--reuid={self._user.pw_uid}",
                                                f"--regid={self._user.pw_gid}", "--clear-groups"]
        return self.host.argv([*user, *argv]), {}

    def _prepare(self) -> None:
        for folder in (self.root, self.root / "mnesia", self.root / "log"):
            folder.mkdir(parents=True, exist_ok=True)
        (self.root / "definitions.json").write_text(json.dumps(DEFINITIONS))
        config = CONFIG.format(port=self.port, definitions=self.root / "definitions.json")
        if self.host is not None:  # clients come from other hosts: guest may log in from anywhere
            config = config.replace("loopback_users.guest = true", "loopback_users.guest = false")
        (self.root / "rabbitmq.conf").write_text(config + self.extra_config)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("")
        cookie = self.root / ".erlang.cookie"
        if self.cookie is not None:
            cookie.unlink(missing_ok=True)
            cookie.write_text(self.cookie)
        elif not cookie.exists():
            cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        if self._user is not None:
            for path in (self.root, *self.root.rglob("*")):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _run_as(self) -> dict:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def start(self, timeout: float = 120) -> str:
        """Start the node and wait until it accepts AMQP connections; its URL."""
        if not installed():
            raise RuntimeError(INSTALL_HINT)
        self._prepare()
        log = (self.root / "server.out").open("ab")
        argv, user = self._command([str(SERVER)])
        self.process = subprocess.Popen(argv, env=self._env(), cwd=self.root, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, **user)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited ({self.process.returncode}); see {self.root}/server.out "
                                   f"and {self.root}/log")
            if self.answers():
                return self.url
            time.sleep(0.5)
        raise RuntimeError(f"rabbitmq-server did not answer within {timeout:.0f} s; see {self.root}/log")

    def answers(self) -> bool:
        """The node is up and its AMQP listener takes connections (`rabbitmq-diagnostics ping` only
        says that the Erlang node runs; the listener starts last)."""
        try:
            with socket.create_connection((self.address, self.port), timeout=1) as sock:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                return sock.recv(1)[:1] == b"\x01"  # the frame type of connection.start
        except OSError:
            return False

    def diagnostics(self, *args: str) -> subprocess.CompletedProcess:
        return self.cli(DIAGNOSTICS.name, *args)

    def cli(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """One of RabbitMQ's command-line tools (rabbitmqctl, rabbitmq-queues, ...) against this node."""
        argv, user = self._command([str(DIAGNOSTICS.parent / tool), "-q", *(["-l"] if self.host else []),
                                    "-n", self.name, *args])
        return subprocess.run(argv, env=self._env(), cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, **user)

    def kill(self) -> None:
        """SIGKILL the node: no shutdown; what quorum queues wrote to their log stays."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout: float = 60) -> None:
        self._signal(signal.SIGTERM, timeout)

    def _signal(self, sig: int, timeout: float = 30) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # erl_child_setup and friends
        except ProcessLookupError:
            pass


def install() -> None:
    """Install Debian's rabbitmq-server when missing (root and apt-get needed); RuntimeError with
    what to do when that cannot be done here."""
    if installed():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(INSTALL_HINT + "; this machine " +
                           ("has no apt-get" if shutil.which("apt-get") is None else "needs root for it"))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "rabbitmq-server"]
    if subprocess.run(command, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        if subprocess.run(command, env=env).returncode != 0:
            raise RuntimeError("apt-get could not install rabbitmq-server (see its output above)")
    if not installed():
        raise RuntimeError(f"rabbitmq-server installed, but {SERVER} or erl is missing")


def run_tests(pytest_args: list[str]) -> int:
    """`make test-rabbitmq`: install when missing, start a throwaway node, run pytest against it
    (BROKER_URL=amqp://…), stop the node; pytest's exit status."""
    try:
        install()
    except RuntimeError as exc:
        sys.stderr.write(f"make test-rabbitmq: {exc}\n")
        return 1
    import tempfile

    node = RabbitNode(Path(tempfile.mkdtemp(prefix="invoice-rabbitmq-")))
    started = time.monotonic()
    try:
        url = node.start()
        print(f"RabbitMQ node {node.name} answering at {url} after {time.monotonic() - started:.1f} s", flush=True)
        env = {**os.environ, "BROKER_URL": url}
        return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], env=env).returncode
    except RuntimeError as exc:
        sys.stderr.write(f"make test-rabbitmq: {exc}\n")
        return 1
    finally:
        node.stop()
        shutil.rmtree(node.root, ignore_errors=True)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["test"]:
        return run_tests(argv[1:])
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        sys.stderr.write("usage: python -m worker.local.rabbitmq_node start|stop DIR | test [PYTEST ARGS]\n")
        return 2
    root = Path(argv[1])
    if argv[0] == "start":
        try:
            install()
        except RuntimeError as exc:
            sys.stderr.write(f"{exc}\n")
            return 1
        node = RabbitNode(root)
        node.start()
        (root / "url").write_text(node.url)
        (root / "leader.pid").write_text(str(node.process.pid))
        print(node.url)
        return 0
    pid_file = root / "leader.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(120):
                os.killpg(pid, 0)
                time.sleep(0.5)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
