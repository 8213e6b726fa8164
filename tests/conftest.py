"""Fixtures: real PostgreSQL and a real Redis-protocol broker, started once per test session
(embedded, or DATABASE_URL / BROKER_URL when set), a fresh database per session, cleanup
between tests, and real Celery worker and relay processes for end-to-end tests.

Unit tests (tests/unit) use none of this and need no I/O. (~460 lines: pytest finds shared
fixtures only here or in plugins; each fixture is short.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Settings every process of the test session shares: quick retries so that "retries ran out"
# happens within a test, and a short visibility timeout so a killed worker's message returns.
TEST_ENV = {
    "TASK_MAX_RETRIES": "3",
    "TASK_RETRY_BACKOFF_MAX": "2",
    "BROKER_VISIBILITY_TIMEOUT": "20",
    "WORKER_CONCURRENCY": "2",
    "CALLBACK_SIGNING_SECRET": "test-secret",
    # Retries due at once, then 1.7 s and 3.5 s after the first failure.
    "PAYMENT_RETRY_DAYS": "0,0.00002,0.00004",
    # A message naming a missing invoice waits this long for it (out of order across queues).
    "INVOICE_WAIT_SECONDS": "2",
    # Workers of parallel tests would fight over 9808; a test of the endpoint gives its own port.
    "METRICS_PORT": "0",
    # No console from `run` on 8808 (test runs beside each other would collide); a test that wants
    # one gives a free port (tests/console, test_run_command).
    "CONSOLE_PORT": "0",
}
# How the tests start Python processes of the project: SQLAlchemy's warnings are errors there too.
STRICT_PYTHON = [sys.executable, "-m", "tests.strict"]
TABLES = ("refunds", "payments", "line_items", "invoices", "inbox", "outbox", "dead_letters",
          "invoice_number_sequences", "deleted_invoices", "invoice_waits", "delivery_counts", "invoice_history")


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; fail the test with `what` when it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def urls() -> Iterator[dict[str, str]]:
    """DATABASE_URL and BROKER_URL of this session: a fresh database on the given or embedded server."""
    import psycopg
    from sqlalchemy.engine import make_url

    servers = None
    database_url, broker_url = os.environ.get("DATABASE_URL"), os.environ.get("BROKER_URL")
    if not database_url or not broker_url:
        from worker.local.embedded import EmbeddedServers

        servers = EmbeddedServers(Path(tempfile.mkdtemp(prefix="invoice-test-")), ephemeral=True)
        database_url = database_url or servers.start_postgres()
        broker_url = broker_url or servers.start_broker()
    base = make_url(database_url)
    name = f"invoice_test_{uuid.uuid4().hex[:10]}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    test_url = base.set(database=name).render_as_string(hide_password=False)
    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "BROKER_URL", *TEST_ENV)}
    os.environ.update({"DATABASE_URL": test_url, "BROKER_URL": broker_url, **TEST_ENV})
    _reload_settings()
    from worker.storage.migrate import upgrade

    upgrade(test_url)
    try:
        yield {"DATABASE_URL": test_url, "BROKER_URL": broker_url}
    finally:
        from worker.storage import db

        db.reset()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if servers is not None:
            servers.stop()


def _reload_settings() -> None:
    from worker.celery_app import app
    from worker.config import settings
    from worker.storage import db

    settings.cache_clear()
    db.reset()
    from worker.brokers import topology
    from worker.brokers.topology import QUEUES

    topology.configure(app, tuple(QUEUES), os.environ["BROKER_URL"], settings().max_deliveries)


@pytest.fixture
def database(urls: dict[str, str]) -> Iterator[str]:
    """A clean database for one test (every table emptied), as its SQLAlchemy URL."""
    from sqlalchemy import text

    from worker.storage import db

    with db.engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield urls["DATABASE_URL"]


@pytest.fixture
def session(database: str) -> Iterator[Any]:
    from worker.storage import db

    with db.sessions()() as s:
        yield s


@pytest.fixture
def broker(urls: dict[str, str]) -> Iterator[str]:
    """The broker URL, with the worker's queues emptied before the test."""
    from kombu import Connection

    from worker.brokers.topology import QUEUES

    with Connection(urls["BROKER_URL"]) as conn:
        channel = conn.default_channel
        for name in QUEUES:
            try:
                channel.queue_purge(name)
            except Exception:
                pass
    yield urls["BROKER_URL"]


class Processes:
    """Worker and relay subprocesses of one test or session, stopped at the end."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None) -> tuple[subprocess.Popen, Path]:
        log = self.logdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **self.env, **(extra_env or {})},
                                stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def worker(self, *, concurrency: int = 2, queues: str | None = None, name: str | None = None,
               extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        from worker.brokers.topology import QUEUES

        node = name or f"test-{uuid.uuid4().hex[:6]}@localhost"
        proc, log = self._spawn("worker", [
            *STRICT_PYTHON, "celery", "-A", "worker", "worker", "-Q", queues or ",".join(QUEUES),
            "-c", str(concurrency), "-n", node, "--loglevel", "INFO", "--without-mingle", "--without-gossip",
            "--without-heartbeat",
        ], extra_env)
        wait_for(lambda: b" ready." in log.read_bytes() or proc.poll() is not None, 60, what="the worker to start")
        if proc.poll() is not None:
            raise AssertionError(f"worker exited at start:\n{log.read_text()[-3000:]}")
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def relay(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        proc, log = self._spawn("relay", [*STRICT_PYTHON, "worker.cli", "relay"], extra_env)
        wait_for(lambda: b"relay: publishing" in log.read_bytes() or proc.poll() is not None, 30,
                 what="the relay to start")
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def beat(self, schedule: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        proc, log = self._spawn("beat", [*STRICT_PYTHON, "celery", "-A", "worker", "beat", "--loglevel", "INFO",
                                         "-s", str(schedule)], extra_env)
        proc.log = log  # type: ignore[attr-defined]
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # pool children left behind
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def processes(urls: dict[str, str], tmp_path: Path) -> Iterator[Processes]:
    """Start worker and relay processes of this test's own; all are stopped afterwards."""
    procs = Processes(dict(urls), tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="session")
def _shared_processes(urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processes]:
    procs = Processes(dict(urls), tmp_path_factory.mktemp("shared-processes"))
    procs.worker(name="shared@localhost")
    procs.relay()
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def running(_shared_processes: Processes, database: str, broker: str) -> Processes:
    """A real Celery worker (2 processes) and the event relay, shared by the session's end-to-end
    tests, over a clean database."""
    for proc in _shared_processes.procs:
        assert proc.poll() is None, f"a shared process died: {proc.args}"
    return _shared_processes


def isolated_broker_url(broker_url: str) -> str:
    """A broker of its own on the same server, for a worker that must not share the session's
    queues: Redis database 7, or the vhost `isolated` (made by worker/local/rabbitmq_node.py)."""
    from worker.brokers.topology import is_amqp

    if is_amqp(broker_url):
        scheme, rest = broker_url.split("://", 1)
        return f"{scheme}://{rest.split('/', 1)[0]}/isolated"
    return broker_url.rsplit("/", 1)[0] + "/7"


def publisher_app(broker_url: str) -> Any:
    """A Celery app of an upstream service: JSON, and the worker's queue declarations for this
    broker (RabbitMQ refuses a queue declared with other arguments than the worker's)."""
    from celery import Celery

    from worker.brokers import topology
    from worker.brokers.topology import QUEUES
    from worker.config import settings

    app = Celery("publisher")
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True,
                    broker_transport_options={"confirm_publish": True},
                    **topology.broker_settings(tuple(QUEUES), broker_url, settings().max_deliveries))
    return app


def send(task: str, body: Any) -> str:
    """Publish a task as any upstream service would; returns the body's messageId."""
    from worker.brokers.topology import queue_for
    from worker.celery_app import app

    app.send_task(task, args=[body], queue=queue_for(task))
    return body.get("messageId") if isinstance(body, dict) else None


def outcome_of(tenant_id: str, message_id: str) -> dict[str, Any] | None:
    from worker.storage import db
    from worker.storage.records import InboxMessage

    with db.sessions()() as s:
        row = s.get(InboxMessage, (tenant_id, message_id))
        if row is None:
            return None
        return {"outcome": row.outcome, "reason": row.reason, "detail": row.detail,
                "invoiceNumber": row.invoice_number, "invoiceId": row.invoice_id}


def wait_outcome(tenant_id: str, message_id: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: outcome_of(tenant_id, message_id), timeout, what=f"the outcome of {message_id}")


def dead_letters_of(message_id: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from worker.delivery import dead_letters
    from worker.storage import db
    from worker.storage.records import DeadLetter

    with db.sessions()() as s:
        query = select(DeadLetter).order_by(DeadLetter.id)
        if message_id is not None:
            query = query.where(DeadLetter.message_id == message_id)
        if task is not None:
            query = query.where(DeadLetter.task_name == task)
        return [dead_letters.to_json(r) for r in s.scalars(query)]


def invoice_json(tenant_id: str, reference: str) -> dict[str, Any] | None:
    from models.queries import get_invoice
    from worker.storage import db

    with db.sessions()() as s:
        found = get_invoice(s, reference, tenant_id)
        return found.to_json() if found else None


def order_body(tenant: str = "acme", **overrides: Any) -> dict[str, Any]:
    """The sample order_shipped body of examples/, with a fresh messageId and orderId."""
    body = json.loads((ROOT / "examples" / "order_shipped.json").read_text())
    body.update({"tenantId": tenant, "messageId": f"m-{uuid.uuid4()}", "orderId": f"ORD-{uuid.uuid4().hex[:8]}"})
    body.update(overrides)
    return body


class EventCollector:
    """A plain kombu consumer on its own queue bound to invoices.events (no project code)."""

    def __init__(self, broker_url: str, routing_key: str = "#", queue_name: str | None = None,
                 durable: bool = False) -> None:
        from kombu import Connection, Exchange, Queue

        self.conn = Connection(broker_url)
        self.exchange = Exchange("invoices.events", type="topic", durable=True)
        # durable: kept across a broker restart (RabbitMQ drops a non-durable queue then; Redis keeps it)
        self.queue = Queue(queue_name or f"test-events-{uuid.uuid4().hex[:8]}", self.exchange, routing_key=routing_key,
                           durable=durable)
        self.queue(self.conn.default_channel).declare()
        self.events: list[dict[str, Any]] = []

    def drain(self, until: Callable[[list[dict[str, Any]]], bool] = lambda e: False, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        bound = self.queue(self.conn.default_channel)
        while time.monotonic() < deadline:
            message = bound.get(no_ack=True, accept=["json"])
            if message is None:
                if until(self.events):
                    break
                time.sleep(0.02)
                continue
            assert message.content_type == "application/json"
            self.events.append(message.decode())
        return self.events

    def wait(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30,
             what: str = "the events") -> list[dict[str, Any]]:
        """Read until predicate(every event read so far) holds; fail the test when it never does."""
        self.drain(predicate, timeout)
        if not predicate(self.events):
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; read {len(self.events)} events")
        return self.events

    def of(self, tenant_id: str) -> list[dict[str, Any]]:
        """The events read so far of one tenant."""
        return [e for e in self.events if e["tenantId"] == tenant_id]

    def close(self) -> None:
        try:
            self.queue(self.conn.default_channel).delete()
        finally:
            self.conn.release()


@pytest.fixture
def events(broker: str) -> Iterator[EventCollector]:
    collector = EventCollector(broker)
    try:
        yield collector
    finally:
        collector.close()


def new_tenant(prefix: str = "t") -> str:
    """A tenant of one test's own: what the test reads (invoices, outcomes, events) is what it caused."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# A broker database no other test's process consumes from (redis:// URLs end with the database).
OWN_BROKER_DATABASE = 9


class OwnWorker:
    """A worker of one test's own: one pool process on a broker database of its own. The messages
    the test sends it run one after another in the order sent, so the outcome of a later marker
    message proves the earlier ones were handled; its log holds only what this test caused."""

    def __init__(self, processes: Processes, broker_url: str, extra_env: dict[str, str] | None = None) -> None:
        self.broker_url = broker_url
        self.publisher = publisher_app(broker_url)
        self.proc = processes.worker(concurrency=1, name=f"own-{uuid.uuid4().hex[:6]}@localhost",
                                     extra_env={"BROKER_URL": broker_url, **(extra_env or {})})

    def send(self, task: str, body: dict[str, Any]) -> str:
        from worker.brokers.topology import queue_for

        self.publisher.send_task(task, args=[body], queue=queue_for(task))
        return body["messageId"]

    @property
    def log(self) -> str:
        return self.proc.log.read_text()  # type: ignore[attr-defined]

    def close(self) -> None:
        self.publisher.close()


def _flush_broker_database(url: str) -> None:
    """Empty the own worker's broker: its Redis database, or its vhost's worker queues."""
    from kombu import Connection

    from worker.brokers.topology import QUEUES, is_amqp

    with Connection(url) as conn:
        if not is_amqp(url):
            conn.default_channel.client.flushdb()
            return
        for name in QUEUES:
            channel = conn.channel()  # a channel each: a purge of a queue not declared yet closes its channel
            try:
                channel.queue_purge(name)
            except Exception:  # not declared yet in this vhost: nothing to empty
                pass
            finally:
                try:
                    channel.close()
                except Exception:
                    pass


def own_broker_url(broker: str) -> str:
    """Redis: a database of its own; RabbitMQ: the `isolated` vhost (no test uses both at once)."""
    from worker.brokers.topology import is_amqp

    return isolated_broker_url(broker) if is_amqp(broker) else f"{broker.rsplit('/', 1)[0]}/{OWN_BROKER_DATABASE}"


@pytest.fixture
def own_worker(processes: Processes, database: str, broker: str) -> Iterator[OwnWorker]:
    url = own_broker_url(broker)
    _flush_broker_database(url)
    own = OwnWorker(processes, url)
    try:
        yield own
    finally:
        own.close()
        processes.stop(own.proc)
        _flush_broker_database(url)
