"""Batched messages seen and controlled as any Celery task (issue #30), through real worker
processes and a real broker: their task events as Flower reads them (`app.events.Receiver` into
`app.events.State`), `celery inspect active` / `reserved` while a batch is in flight, and
`control.revoke`, batching on and off (worker/delivery/task_events.py, worker/delivery/revocation.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from typing import Any, Iterator

import psycopg
import pytest

from tests.conftest import (
    ROOT,
    Processes,
    dead_letters_of,
    invoice_json,
    new_tenant,
    outcome_of,
    publisher_app,
    wait_for,
    wait_outcome,
)
from tests.end_to_end.operator_endpoint import OwnBroker, free_port, metric_values, scraped
from tests.end_to_end.test_batching import BatchWorker, batch_worker, transactions_of  # noqa: F401 (a fixture)
from tests.end_to_end.test_delivery import database_conninfo, issued_invoice, payment, waiting_on_locks


class EventWatcher:
    """What Flower does: a Celery event receiver on the worker's broker, folding events into a State."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.events.State()
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        # Listening once an event of our own comes back (a receiver sees only what is sent after it subscribed).
        probe = app.events.Dispatcher(app.connection_for_write(), hostname="probe@test")

        def heard() -> bool:
            probe.send("probe-ping")
            return any(e["type"] == "probe-ping" for e in self.seen())

        try:
            wait_for(heard, 30, interval=0.2, what="the event receiver to listen")
        finally:
            probe.close()
            probe.connection.release()

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)
            self.state.event(event)

    def seen(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def of(self, task_id: str) -> list[str]:
        return [e["type"] for e in self.seen() if e.get("uuid") == task_id]

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)


@pytest.fixture
def watcher(batch_worker: BatchWorker) -> Iterator[EventWatcher]:
    watching = EventWatcher(batch_worker.publisher)
    try:
        yield watching
    finally:
        watching.close()


def test_a_receiver_sees_each_of_50_batched_payments_received_started_and_succeeded(running, batch_worker, watcher):
    tenant = new_tenant("t-events")
    invoice = issued_invoice(tenant)
    bodies = [batch_worker.send("invoices.record_payment", payment(tenant, invoice["invoiceNumber"], "1.00"))
              for _ in range(50)]
    batch_worker.start(WORKER_SEND_TASK_EVENTS="true")
    for body in bodies:
        assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    assert transactions_of(tenant, [b["messageId"] for b in bodies]) == 1  # one batch
    ids = {body["messageId"]: batch_worker.delivery_ids[body["messageId"]] for body in bodies}
    wait_for(lambda: all(watcher.state.tasks.get(i) is not None and watcher.state.tasks[i].state == "SUCCESS"
                         for i in ids.values()), 30, what="task-succeeded for every payment")

    for message_id, task_id in ids.items():
        assert sorted(watcher.of(task_id)) == ["task-received", "task-started", "task-succeeded"], task_id
        task = watcher.state.tasks[task_id]
        assert task.name == "invoices.record_payment"
        assert task.worker.hostname == batch_worker.name
        assert message_id in task.args and task.kwargs == "{}"  # the publisher's reprs, as Celery's events carry
        assert "'outcome': 'applied'" in task.result and message_id in task.result
        assert task.runtime > 0
        assert task.received <= task.started <= task.succeeded
    assert "(batched)" in batch_worker.log and "WARNING" not in batch_worker.log


def test_inspect_lists_a_batch_in_flight_as_active_and_what_gathers_behind_it_as_reserved(running, batch_worker):
    tenant = new_tenant("t-inspect")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    first = [batch_worker.send("invoices.record_payment", payment(tenant, number, "2.00")) for _ in range(5)]
    with psycopg.connect(database_conninfo()) as holder:
        # An uncommitted inbox row of the batch's first messageId: the batch's claim waits for it.
        holder.execute("INSERT INTO inbox (tenant_id, message_id, task, outcome) VALUES (%s, %s, %s, 'applied')",
                       (tenant, first[0]["messageId"], "invoices.record_payment"))
        batch_worker.start()
        wait_for(lambda: waiting_on_locks() >= 1, 30, what="the batch to wait on the held inbox row")
        behind = [batch_worker.send("invoices.record_payment", payment(tenant, number, "3.00")) for _ in range(3)]
        inspect = batch_worker.publisher.control.inspect(destination=[batch_worker.name], timeout=5)

        def listed(kind: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            tasks = (getattr(inspect, kind)() or {}).get(batch_worker.name) or []
            wanted = {batch_worker.delivery_ids[b["messageId"]] for b in bodies}
            found = [t for t in tasks if t["id"] in wanted]
            return found if len(found) == len(wanted) else None

        active = wait_for(lambda: listed("active", first), 30, interval=0.5, what="the batch listed as active")
        reserved = wait_for(lambda: listed("reserved", behind), 30, interval=0.5, what="the gathered ones as reserved")
        for task in active:
            assert task["name"] == "invoices.record_payment" and task["hostname"] == batch_worker.name
            assert task["worker_pid"] and task["time_start"]
            assert task["args"][0]["tenantId"] == tenant  # decoded, as Celery lists its own requests
        assert {t["id"] for t in reserved}.isdisjoint({t["id"] for t in active})
        holder.rollback()
    for body in first + behind:
        wait_outcome(tenant, body["messageId"])
    wait_for(lambda: not (inspect.active() or {}).get(batch_worker.name) and not
             (inspect.reserved() or {}).get(batch_worker.name), 30, interval=0.5, what="nothing in flight")
    assert invoice_json(tenant, number)["amountPaid"] == "19.00"
    assert "WARNING" not in batch_worker.log


def test_task_events_keep_coming_when_the_broker_restarts_under_a_worker(running, processes: Processes, tmp_path):
    """The pool process's dispatcher holds a connection of its own; a broker restart leaves it stale,
    and the next batch's events go out on a new one."""
    tenant = new_tenant("t-evrestart")
    number = issued_invoice(tenant)["invoiceNumber"]
    broker = OwnBroker(tmp_path / "valkey")
    publisher = publisher_app(broker.url)
    name = f"events-{uuid.uuid4().hex[:6]}@localhost"
    try:
        worker = processes.worker(concurrency=1, name=name, extra_env={
            "BROKER_URL": broker.url, "WORKER_SEND_TASK_EVENTS": "true"})

        def paid(amount: str) -> dict[str, str]:
            bodies = [payment(tenant, number, amount) for _ in range(3)]
            ids = {b["messageId"]: publisher.send_task("invoices.record_payment", args=[b], queue="invoices.payments").id
                   for b in bodies}
            for body in bodies:
                assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
            return ids

        paid("1.00")  # the pool process's dispatcher is made, and its connection opened
        broker.stop()
        broker.start()
        watcher = EventWatcher(publisher)
        try:
            ids = paid("2.00")
            wait_for(lambda: all("task-succeeded" in watcher.of(i) for i in ids.values()), 30,
                     what="task-succeeded of the batch after the restart")
        finally:
            watcher.close()
        assert invoice_json(tenant, number)["amountPaid"] == "9.00"
        assert "could not send the task events" not in worker.log.read_text()  # type: ignore[attr-defined]
    finally:
        publisher.close()
        broker.stop()


def test_a_batch_in_flight_when_the_broker_connection_is_lost_runs_to_its_end_uncancelled(running, processes,
                                                                                         tmp_path):
    """Celery cancels its active requests when the broker connection is lost; a batch's messages,
    listed as active, are not cancelled one by one (nor warned about): the batch commits, and each
    message is applied once."""
    tenant = new_tenant("t-evcut")
    number = issued_invoice(tenant)["invoiceNumber"]
    broker = OwnBroker(tmp_path / "valkey")
    publisher = publisher_app(broker.url)
    try:
        bodies = [payment(tenant, number, "1.50") for _ in range(4)]
        for body in bodies:
            publisher.send_task("invoices.record_payment", args=[body], queue="invoices.payments")
        with psycopg.connect(database_conninfo()) as holder:
            holder.execute("INSERT INTO inbox (tenant_id, message_id, task, outcome) VALUES (%s, %s, %s, 'applied')",
                           (tenant, bodies[0]["messageId"], "invoices.record_payment"))
            worker = processes.worker(concurrency=1, extra_env={
                "BROKER_URL": broker.url, "APPLY_BATCH_SIZE": "4", "APPLY_BATCH_WAIT_MS": "1000"})
            wait_for(lambda: waiting_on_locks() >= 1, 30, what="the batch to wait on the held inbox row")
            broker.stop()
            wait_for(lambda: "Connection to broker lost" in worker.log.read_text(), 30,  # type: ignore[attr-defined]
                     what="the worker to see the connection lost")
            broker.start()
            holder.rollback()
        for body in bodies:
            assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
        assert invoice_json(tenant, number)["amountPaid"] == "6.00"
        log = worker.log.read_text()  # type: ignore[attr-defined]
        assert "Terminating it instead" not in log and "Failed to cancel" not in log, log[-3000:]
    finally:
        publisher.close()
        broker.stop()


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env={**os.environ, "BROKER_URL": url},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("batch_size", ["100", "1"], ids=["batching-on", "batching-off"])
def test_a_revoked_payment_is_not_applied_and_is_dead_lettered_revoked_then_replayable(running, batch_worker,
                                                                                        batch_size, tmp_path):
    tenant = new_tenant("t-revoke")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    port = free_port()
    # The worker runs first: a revoke reaches the workers running when it is sent.
    batch_worker.start(APPLY_BATCH_SIZE=batch_size, APPLY_BATCH_WAIT_MS="5", METRICS_PORT=str(port),
                       PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
                       WORKER_SEND_TASK_EVENTS="true")
    revoked_id = str(uuid.uuid4())
    replies = batch_worker.publisher.control.revoke(revoked_id, destination=[batch_worker.name], reply=True, timeout=10)
    assert replies and revoked_id in str(replies)

    before = [payment(tenant, number, "4.00") for _ in range(5)]
    revoked = payment(tenant, number, "50.00")
    after = [payment(tenant, number, "6.00") for _ in range(5)]
    for body in before:
        batch_worker.send("invoices.record_payment", body)
    batch_worker.publisher.send_task("invoices.record_payment", args=[revoked], queue="invoices.payments",
                                     task_id=revoked_id)
    for body in after:
        batch_worker.send("invoices.record_payment", body)

    for body in before + after:
        assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    [letter] = wait_for(lambda: dead_letters_of(revoked["messageId"]), 30, what="the revoked payment's dead letter")
    assert letter["reason"] == "revoked" and letter["deliveryId"] == revoked_id and letter["body"] == revoked
    assert outcome_of(tenant, revoked["messageId"]) is None  # not applied, no outcome of its own
    assert invoice_json(tenant, number)["amountPaid"] == "50.00"  # 5 × 4.00 + 5 × 6.00, not the revoked 50.00
    assert wait_for(lambda: metric_values(scraped(port), "invoice_worker_messages_total",
                                          task="invoices.record_payment", outcome="dead_lettered"), 30,
                    what="the dead letter counted") == [1.0]

    replayed = cli(batch_worker.url, "dead-letters", "replay", str(letter["id"]))
    assert replayed.returncode == 0, replayed.stderr
    assert wait_outcome(tenant, revoked["messageId"])["outcome"] == "applied"  # under a new task id
    assert invoice_json(tenant, number)["amountPaid"] == "100.00"
    assert "Discarding revoked task: invoices.record_payment[" + revoked_id in batch_worker.log
    assert "WARNING" not in batch_worker.log, batch_worker.log
