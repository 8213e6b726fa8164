"""Servers, worker processes, memory sampling and waiting: what every benchmark part shares."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import psutil
import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
QUEUES = "invoices.orders,invoices.payments,invoices.commands,invoices.imports,invoices.maintenance"


class Environment:
    """Embedded PostgreSQL and Valkey in a temporary directory (or DATABASE_URL / BROKER_URL), a
    fresh database, migrated."""

    def __init__(self) -> None:
        from sqlalchemy.engine import make_url

        self.servers = None
        database, broker = os.environ.get("DATABASE_URL"), os.environ.get("BROKER_URL")
        if not database or not broker:
            from worker.local.embedded import EmbeddedServers

            self.servers = EmbeddedServers(Path(tempfile.mkdtemp(prefix="invoice-bench-")), ephemeral=True)
            database = database or self.servers.start_postgres()
            broker = broker or self.servers.start_broker()
        from worker.config import several_hosts
        from worker.endpoints import libpq_url

        base = make_url(several_hosts(database))  # several hosts (bench.standby_cost): SQLAlchemy's spelling
        self.admin = libpq_url(base.render_as_string(hide_password=False))
        self.name = f"invoice_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.database_url = base.set(database=self.name).render_as_string(hide_password=False)
        self.libpq = libpq_url(self.database_url)
        from worker.brokers.topology import is_amqp

        self.amqp = is_amqp(broker)
        # Redis: a database of its own; RabbitMQ: the given vhost, its queues purged below.
        self.broker_url = broker if self.amqp else broker.rsplit("/", 1)[0] + "/5"
        # Metrics off unless a part turns them on (bench.metrics_cost): parts stay comparable with earlier runs.
        os.environ.update({"DATABASE_URL": self.database_url, "BROKER_URL": self.broker_url, "METRICS_PORT": "0"})
        from worker.brokers import topology
        from worker.brokers.topology import QUEUES as NAMES
        from worker.celery_app import app
        from worker.config import settings
        from worker.storage import db
        from worker.storage.migrate import upgrade

        settings.cache_clear()
        db.reset()
        topology.configure(app, tuple(NAMES), self.broker_url, settings().max_deliveries)
        upgrade(self.database_url)
        if self.amqp:
            self.redis = None
            self._purge()
        else:
            self.redis = redis.Redis.from_url(self.broker_url)
            self.redis.flushdb()

    def broker_version(self) -> str:
        if self.amqp:
            from kombu import Connection

            with Connection(self.broker_url) as conn:
                props = conn.connection.server_properties
                return f"RabbitMQ {props.get('version')}"
        info = self.redis.info("server")
        return f"{'Valkey' if 'valkey_version' in info else 'Redis'} {info.get('valkey_version') or info.get('redis_version')}"

    def _depths(self) -> int:
        from kombu import Connection

        total = 0
        with Connection(self.broker_url) as conn:
            for name in QUEUES.split(","):
                channel = conn.channel()
                try:
                    total += channel.queue_declare(name, passive=True).message_count
                except conn.channel_errors:
                    pass  # not declared yet
                finally:
                    try:
                        channel.close()
                    except Exception:
                        pass
        return total

    def purge(self) -> None:
        """Empty the worker's queues (what a part published and no worker took)."""
        if self.amqp:
            self._purge()
        else:
            self.redis.delete(*QUEUES.split(","))

    def _purge(self) -> None:
        from kombu import Connection

        with Connection(self.broker_url) as conn:
            for name in QUEUES.split(","):
                channel = conn.channel()
                try:
                    channel.queue_purge(name)
                except conn.channel_errors:
                    pass

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.libpq, autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def settle(self) -> None:
        """The database as a timed part should find it: no vacuum owed by the rows an earlier part
        wrote or updated, no checkpoint owed for them (else autovacuum and the checkpointer do that
        work inside the next part's window, on the same two cores)."""
        self.sql("VACUUM (ANALYZE)")
        self.sql("CHECKPOINT")

    def queue_drained(self) -> bool:
        if self.amqp:
            # RabbitMQ counts delivered-but-unacknowledged messages only in its management API:
            # ask the workers instead whether they still hold any.
            if self._depths():
                return False
            from worker.celery_app import app

            inspect = app.control.inspect(timeout=0.5)
            held = [*(inspect.active() or {}).values(), *(inspect.reserved() or {}).values()]
            return not any(held)
        lengths = sum(self.redis.llen(q) for q in QUEUES.split(","))
        return lengths == 0 and self.redis.hlen("unacked") == 0

    def close(self) -> None:
        from worker.storage import db

        db.reset()
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.servers is not None:
            self.servers.stop()


class Process:
    def __init__(self, argv: list[str], env: dict[str, str], ready: bytes | None) -> None:
        self.log = Path(tempfile.mkstemp(prefix="bench-", suffix=".log")[1])
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if ready:
            wait(lambda: ready in self.log.read_bytes() or self.proc.poll() is not None, 60)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[3:5]} exited:\n{self.log.read_text()[-2000:]}")

    def memory(self) -> tuple[int, int]:
        """(PSS, RSS) summed over the process and its pool children. PSS counts a page shared by
        several processes (the pool children fork from the main process) once, split between them;
        the RSS sum counts it in every process, so it overstates what the worker holds."""
        try:
            me = psutil.Process(self.proc.pid)
            infos = [p.memory_full_info() for p in [me, *me.children(recursive=True)]]
        except psutil.Error:
            return 0, 0
        return sum(i.pss for i in infos), sum(i.rss for i in infos)

    def cpu_seconds(self) -> float:
        """CPU time (user and system) used so far by the process and its pool children."""
        try:
            me = psutil.Process(self.proc.pid)
            times = [p.cpu_times() for p in [me, *me.children(recursive=True)]]
        except psutil.Error:
            return 0.0
        return sum(t.user + t.system for t in times)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def worker(concurrency: int, env: dict[str, str] | None = None, include: str | None = None,
           name: str | None = None) -> Process:
    """A worker node of `concurrency` pool processes, returned once that node (not just any node)
    answers a ping."""
    name = name or f"bench-{uuid.uuid4().hex[:6]}@localhost"
    argv = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", QUEUES, "-c", str(concurrency),
            "-n", name, "--loglevel", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    if include:
        argv += ["--include", include]
    proc = Process(argv, env or {}, None)
    try:
        wait(lambda: _ready(proc, name), 60)
    except BaseException:
        proc.stop()
        raise
    return proc


def _ready(proc: Process, name: str) -> bool:
    from worker.celery_app import app

    if proc.proc.poll() is not None:
        raise RuntimeError(proc.log.read_text()[-2000:])
    try:
        return any(name in reply for reply in app.control.ping(destination=[name], timeout=0.5))
    except Exception:
        return False


def relay() -> Process:
    return Process([sys.executable, "-m", "worker.cli", "--log-level", "INFO", "relay"], {}, b"relay: publishing")


class EventsQueue:
    """A queue of the bench's own bound to invoices.events, declared now and deleted (with its
    binding) by delete(), both on one connection: on Redis kombu keeps a queue's bindings in the
    declaring connection's state, and a delete on another connection removed the list and left the
    binding. Every later part's relay then kept filling a list nobody read, one more per part, each
    event pushed to all of them (the relay's CPU per event 41 → 105 µs over the growth curve's three
    stages)."""

    def __init__(self, env: Environment, prefix: str, routing_key: str) -> None:
        from kombu import Connection, Exchange, Queue

        from worker.brokers.relay import EVENTS_EXCHANGE

        self.name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self._conn = Connection(env.broker_url)
        Queue(self.name, Exchange(EVENTS_EXCHANGE.name, type="topic", durable=True), routing_key=routing_key,
              durable=False)(self._conn.default_channel).declare()

    def delete(self) -> None:
        with self._conn:
            self._conn.default_channel.queue_delete(self.name)


class PeakMemory:
    """Samples the memory of processes (main and pool children) every `interval` seconds; keeps the
    peaks of the PSS sum (what the worker really holds) and of the RSS sum (shared pages counted
    again). A sample reads each process's smaps_rollup: 4.7 ms of this process's CPU for a worker
    of three pool processes and the relay (the kernel walks their page tables)."""

    def __init__(self, *procs: Process, interval: float = 0.1) -> None:
        self.procs = procs
        self.interval = interval
        self.peak = 0
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            samples = [p.memory() for p in self.procs]
            self.peak = max(self.peak, sum(pss for pss, _ in samples))
            self.peak_rss = max(self.peak_rss, sum(rss for _, rss in samples))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        """Peak PSS in MiB."""
        return self.peak / 2**20

    @property
    def rss_mb(self) -> float:
        return self.peak_rss / 2**20


def listening(port: int) -> psutil.Process | None:
    """The process listening on this TCP port of this machine (root sees every process's sockets)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def tree_cpu_seconds(root: psutil.Process | None) -> float:
    """CPU time of a server: its process, its children that exited (reaped: PostgreSQL's backends
    when their connection closes) and the ones still running."""
    if root is None:
        return 0.0
    try:
        own = root.cpu_times()
        total = own.user + own.system + own.children_user + own.children_system
        for child in root.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total
    except psutil.Error:
        return 0.0


class ServerCpu:
    """CPU seconds the broker server and PostgreSQL spend between enter and exit: beside the worker's
    own, where a message's CPU goes on this machine (they share its cores)."""

    def __init__(self, env: Environment) -> None:
        # PostgreSQL's postmaster: the first line of postmaster.pid in its data directory (the
        # embedded server listens on a Unix socket only). Valkey says its process id; RabbitMQ: the
        # AMQP listener.
        data = Path(env.sql("SHOW data_directory")[0][0])
        postmaster = psutil.Process(int((data / "postmaster.pid").read_text().split()[0]))
        if env.amqp:
            broker = listening(urlsplit(env.broker_url.split(";")[0]).port or 5672)
        else:
            broker = psutil.Process(env.redis.info("server")["process_id"])
        self.servers = {"broker": broker, "postgres": postmaster}
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> "ServerCpu":
        self._before = {name: tree_cpu_seconds(proc) for name, proc in self.servers.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = {name: tree_cpu_seconds(proc) - self._before[name] for name, proc in self.servers.items()}


def wait(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> float:
    """Poll until predicate() is true; return when it was (monotonic); raise on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark step did not finish within {timeout}s")
        time.sleep(interval)
    return time.monotonic()
