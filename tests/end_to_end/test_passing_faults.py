"""Passing faults: PostgreSQL unreachable for a while. The message is retried with back-off and
applied once when the database returns, even when the worker restarts meanwhile."""

from __future__ import annotations

import os
import re
import socket
import threading

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import invoice_json, isolated_broker_url, new_tenant, publisher_app, wait_for, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice, payment


class DatabaseProxy:
    """A TCP front for the test database that the test can take down and bring back."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        host = url.query.get("host")
        if host and host.startswith("/"):
            self.target = (socket.AF_UNIX, f"{host}/.s.PGSQL.{url.port or 5432}")
        else:
            self.target = (socket.AF_INET, (url.host or "127.0.0.1", url.port or 5432))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = url.set(host="127.0.0.1", port=self.port, query={}).render_as_string(hide_password=False)
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                try:  # wakes the accepting thread (close alone does not, on Linux)
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.socket(self.target[0], socket.SOCK_STREAM)
            server.connect(self.target[1])
            with self._lock:
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
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture
def proxy(database):
    front = DatabaseProxy(database)
    front.up()
    yield front
    front.down()


def test_database_away_then_back_the_message_is_retried_and_applied_once(running, processes, proxy):
    tenant = new_tenant("t-fault")
    invoice = issued_invoice(tenant)
    # A broker database of its own, so that only the worker behind the proxy takes the message.
    broker = isolated_broker_url(os.environ["BROKER_URL"])
    env = {"DATABASE_URL": proxy.url, "BROKER_URL": broker, "TASK_MAX_RETRIES": "12", "TASK_RETRY_BACKOFF_MAX": "8"}
    first = processes.worker(name="behind-proxy@localhost", queues="invoices.payments", extra_env=env)
    proxy.down()
    body = payment(tenant, invoice["invoiceNumber"], "15.00")
    publisher = publisher_app(broker)
    publisher.send_task("invoices.record_payment", args=[body], queue="invoices.payments")
    wait_for(lambda: first.log.read_text().count("Retry in") >= 4, 60, what="retries while the database is away")
    # Back-off: the n-th retry waits between half of and all of 2^n seconds (at least 1 s, at most
    # TASK_RETRY_BACKOFF_MAX): it grows. A batched first delivery that meets the outage leaves its
    # batch as retry 1, sent again at once; Celery's own retries, logged, then start at n = 1.
    log = first.log.read_text()
    delays = [float(d) for d in re.findall(r"Retry in ([0-9.]+)s", log)][:4]
    offset = 1 if "sent again as a retry" in log else 0
    for k, delay in enumerate(delays):
        ceiling = min(8, 2 ** (k + offset))
        assert max(1.0, ceiling / 2) <= delay <= max(1.0, ceiling), (offset, delays)
    assert delays[3] > delays[1] > delays[0], delays
    # The worker restarts while the message waits for its next try: nothing is lost.
    processes.stop(first)
    second = processes.worker(name="behind-proxy-2@localhost", queues="invoices.payments", extra_env=env)
    proxy.up()
    assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
    after = invoice_json(tenant, invoice["invoiceNumber"])
    assert after["amountPaid"] == "15.00" and len(after["payments"]) == 1
    assert "OperationalError" in (first.log.read_text() + second.log.read_text())
