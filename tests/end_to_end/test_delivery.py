"""At-least-once delivery through a real broker and real worker processes: duplicates,
concurrency, crashes, bad input and tenant isolation (CONTRACT.md sections 3 and 4)."""

from __future__ import annotations

import random
import uuid
from decimal import Decimal

import psutil
import psycopg
from sqlalchemy import func, select

from tests.conftest import (
    dead_letters_of, invoice_json, order_body, send, wait_for, wait_outcome,
)
from worker import db
from worker.records import InboxMessage, OutboxEvent
from worker.relay import libpq_url


def issued_invoice(tenant: str, **overrides) -> dict:
    body = order_body(tenant=tenant, autoIssue=True, **overrides)
    send("invoices.order_shipped", body)
    outcome = wait_outcome(tenant, body["messageId"])
    assert outcome["outcome"] == "applied", outcome
    return invoice_json(tenant, outcome["invoiceNumber"])


def payment(tenant: str, number: str, amount: str, **extra) -> dict:
    return {"messageId": f"pay-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": number, "amount": amount,
            "currency": "USD", "paymentMethod": "EFT", **extra}


def database_conninfo() -> str:
    return libpq_url(db.engine().url.render_as_string(hide_password=False))


def waiting_on_locks() -> int:
    """Backends waiting for a lock (read outside any transaction: statistics are snapshotted per transaction)."""
    with psycopg.connect(database_conninfo(), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]


def events_of(invoice_id: str) -> list[dict]:
    with db.sessions()() as s:
        rows = s.scalars(select(OutboxEvent).where(OutboxEvent.invoice_id == uuid.UUID(invoice_id))
                         .order_by(OutboxEvent.sequence)).all()
        return [r.payload for r in rows]


def test_the_same_message_three_times_changes_the_invoice_once(running):
    invoice = issued_invoice("t-dup")
    body = payment("t-dup", invoice["invoiceNumber"], "10.00")
    for _ in range(3):
        send("invoices.record_payment", body)
    wait_outcome("t-dup", body["messageId"])
    # the two later copies are handled too: wait until the worker has consumed all three
    wait_for(lambda: running.procs[0].log.read_text().count(body["messageId"]) >= 3, 20,
             what="all three copies to be handled")
    after = invoice_json("t-dup", invoice["invoiceNumber"])
    assert after["amountPaid"] == "10.00" and len(after["payments"]) == 1
    assert [e["type"] for e in events_of(invoice["id"])].count("payment.recorded") == 1
    log = running.procs[0].log.read_text()
    assert log.count("'outcome': 'duplicate'") >= 2


def test_two_hundred_payments_from_two_worker_processes_give_exact_totals(running, processes):
    processes.worker(name="second@localhost")
    invoice = issued_invoice("t-conc", lineItems=[{"quantity": "1", "unitPrice": "5000.00"}], discount=None,
                             taxAmount="0")
    assert invoice["balance"] == "5000.00"
    rng = random.Random(7)
    amounts = [Decimal(rng.randint(1, 2000)) / 100 for _ in range(200)]
    bodies = [payment("t-conc", invoice["invoiceNumber"], str(a)) for a in amounts]
    for body in bodies:
        send("invoices.record_payment", body)
    for body in bodies:
        assert wait_outcome("t-conc", body["messageId"], timeout=120)["outcome"] == "applied"
    after = invoice_json("t-conc", invoice["invoiceNumber"])
    assert len(after["payments"]) == 200
    assert Decimal(after["amountPaid"]) == sum(amounts)
    assert Decimal(after["balance"]) == Decimal("5000.00") - sum(amounts)
    assert after["status"] == "PartiallyPaid"
    sequences = [e["sequence"] for e in events_of(invoice["id"])]
    assert sequences == list(range(1, len(sequences) + 1))  # no gaps, no repeats under concurrency


def test_a_pool_process_killed_mid_task_has_its_message_redelivered_and_applied_once(running):
    invoice = issued_invoice("t-kill")
    body = payment("t-kill", invoice["invoiceNumber"], "25.00")
    worker = running.procs[0]
    # Hold the invoice's row lock so that the task stops in the middle of its transaction.
    with psycopg.connect(database_conninfo()) as blocker:
        blocker.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (invoice["id"],))
        send("invoices.record_payment", body)
        wait_for(lambda: waiting_on_locks() >= 1, 20, what="the task to block on the invoice lock")
        for child in psutil.Process(worker.pid).children(recursive=True):
            child.kill()  # SIGKILL the pool processes, one of which runs the task
        blocker.rollback()
    outcome = wait_outcome("t-kill", body["messageId"], timeout=60)
    assert outcome["outcome"] == "applied"
    after = invoice_json("t-kill", invoice["invoiceNumber"])
    assert after["amountPaid"] == "25.00" and len(after["payments"]) == 1
    assert "WorkerLostError" in worker.log.read_text() or "exited" in worker.log.read_text()


def test_a_worker_killed_outright_loses_nothing(processes, database, broker):
    """SIGKILL of the whole worker while a task holds its message: the broker hands the
    message to the next worker after the visibility timeout and it is applied once."""
    first = processes.worker(name="doomed@localhost")
    helper = processes.worker(name="helper@localhost", queues="invoices.orders")
    tenant = "t-crash"
    order = order_body(tenant=tenant, autoIssue=True)
    send("invoices.order_shipped", order)
    number = wait_outcome(tenant, order["messageId"])["invoiceNumber"]
    processes.stop(helper)
    body = payment(tenant, number, "30.00")
    invoice = invoice_json(tenant, number)
    with psycopg.connect(database_conninfo()) as blocker:
        blocker.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (invoice["id"],))
        send("invoices.record_payment", body)
        wait_for(lambda: waiting_on_locks() >= 1, 20, what="the task to block")
        processes.stop(first, sig=9)
        blocker.rollback()
    processes.worker(name="successor@localhost")
    outcome = wait_outcome(tenant, body["messageId"], timeout=90)
    assert outcome["outcome"] == "applied"
    after = invoice_json(tenant, number)
    assert after["amountPaid"] == "30.00" and len(after["payments"]) == 1


MALFORMED = {
    "missing fields": {"messageId": "bad-1", "tenantId": "t-bad"},
    "wrong types": {"messageId": "bad-2", "tenantId": "t-bad", "invoiceNumber": "INV-00001", "amount": {"x": 1},
                    "currency": "USD"},
    "float that hurts": {"messageId": "bad-3", "tenantId": "t-bad", "invoiceNumber": "INV-00001",
                         "amount": 0.30000000000000004, "currency": "USD"},
    "huge string": {"messageId": "bad-4", "tenantId": "t-bad", "invoiceNumber": "INV-" + "9" * 100_000,
                    "amount": "1.00", "currency": "USD"},
    "unknown currency": {"messageId": "bad-5", "tenantId": "t-bad", "invoiceNumber": "INV-00001", "amount": "1.00",
                         "currency": "XYZ"},
    "negative amount": {"messageId": "bad-6", "tenantId": "t-bad", "invoiceNumber": "INV-00001", "amount": "-5.00",
                        "currency": "USD"},
    "too many decimals for JPY": {"messageId": "bad-7", "tenantId": "t-bad", "invoiceNumber": "INV-00001",
                                  "amount": "1.5", "currency": "JPY"},
    "unknown field": {"messageId": "bad-8", "tenantId": "t-bad", "invoiceNumber": "INV-00001", "amount": "1.00",
                      "currency": "USD", "ammount": "2.00"},
}


def test_malformed_bodies_of_every_kind_are_dead_lettered_whole_and_the_worker_keeps_going(running):
    for body in MALFORMED.values():
        send("invoices.record_payment", body)
    send("invoices.record_payment", "not an object")
    wait_for(lambda: len(dead_letters_of(task="invoices.record_payment")) >= len(MALFORMED) + 1, 30,
             what="every malformed body to be dead-lettered")
    stored = {d["messageId"]: d for d in dead_letters_of(task="invoices.record_payment")}
    for kind, body in MALFORMED.items():
        letter = stored[body["messageId"]]
        assert letter["reason"] == "malformed", kind
        assert letter["body"] == body, f"{kind}: the body is kept whole"
    assert "amount" in stored["bad-1"]["error"] and "currency" in stored["bad-1"]["error"]
    assert "more decimals than USD allows" in stored["bad-3"]["error"]
    assert "XYZ" in stored["bad-5"]["error"]
    assert "may not be negative" in stored["bad-6"]["error"] or "greater than zero" in stored["bad-6"]["error"]
    assert "JPY" in stored["bad-7"]["error"]
    assert "ammount" in stored["bad-8"]["error"]
    assert any("must be a JSON object" in d["error"] for d in dead_letters_of(task="invoices.record_payment"))
    # nothing of a dead-lettered message reached the inbox, and the worker still applies good messages
    with db.sessions()() as s:
        assert s.scalar(select(func.count()).select_from(InboxMessage).where(InboxMessage.tenant_id == "t-bad")) == 0
    issued_invoice("t-after-bad")


def test_an_unknown_task_is_dead_lettered_whole(running):
    from worker.celery_app import app

    body = {"messageId": "u-1", "tenantId": "t-unknown", "anything": [1, 2]}
    app.send_task("invoices.no_such_task", args=[body], queue="invoices.commands")
    letters = wait_for(lambda: dead_letters_of(task="invoices.no_such_task"), 20, what="the dead letter")
    assert letters[0]["reason"] == "unknown-task"
    assert letters[0]["body"] == body
    issued_invoice("t-after-unknown")  # the worker keeps going


def test_a_message_of_tenant_b_naming_tenant_a_invoice_is_rejected_not_found(running, events):
    invoice = issued_invoice("tenant-a")
    body = payment("tenant-b", invoice["invoiceNumber"], "5.00")
    send("invoices.record_payment", body)
    outcome = wait_outcome("tenant-b", body["messageId"])
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "invoice-not-found")
    assert invoice_json("tenant-a", invoice["invoiceNumber"])["amountPaid"] == "0.00"
    by_id = {**payment("tenant-b", invoice["invoiceNumber"], "5.00"), "invoiceId": invoice["id"]}
    by_id.pop("invoiceNumber")
    send("invoices.record_payment", by_id)
    assert wait_outcome("tenant-b", by_id["messageId"])["reason"] == "invoice-not-found"
    rejected = events.drain(lambda e: sum(x["type"] == "command.rejected" for x in e) >= 2)
    reasons = [e["data"]["reason"] for e in rejected if e["type"] == "command.rejected"]
    assert reasons == ["invoice-not-found", "invoice-not-found"]
    assert all(e["tenantId"] == "tenant-b" for e in rejected if e["type"] == "command.rejected")


def test_a_forbidden_command_is_rejected_with_its_reason_and_not_retried(running, events):
    invoice = issued_invoice("t-rej")
    too_much = payment("t-rej", invoice["invoiceNumber"], "999999.00")
    send("invoices.record_payment", too_much)
    outcome = wait_outcome("t-rej", too_much["messageId"])
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "amount-exceeds-balance")
    assert "balance is 142.60 USD" in outcome["detail"]
    send("invoices.record_payment", too_much)  # a second copy yields the first copy's outcome
    rejected = events.drain(lambda e: any(x["type"] == "command.rejected" for x in e))
    mine = [e for e in rejected if e["type"] == "command.rejected"]
    assert len(mine) == 1
    assert mine[0]["causationId"] == too_much["messageId"]
    assert mine[0]["data"]["reason"] == "amount-exceeds-balance"
    assert mine[0]["invoiceId"] == invoice["id"] and mine[0]["sequence"] is None
    assert dead_letters_of(message_id=too_much["messageId"]) == []


def test_a_pickled_message_is_refused_and_dead_lettered(running):
    """JSON only: a message in another content type never runs, and is kept for an operator."""
    import pickle

    from kombu import Connection

    from worker.celery_app import app

    body = {"messageId": "p-1", "tenantId": "t-pickle"}
    with Connection(app.conf.broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            pickle.dumps(([body], {}, {})), routing_key="invoices.commands", exchange="invoices.commands",
            content_type="application/x-python-serialize", content_encoding="binary",
            headers={"task": "invoices.issue", "id": "pickled-delivery", "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    letters = wait_for(lambda: [d for d in dead_letters_of() if d["deliveryId"] == "pickled-delivery"], 20,
                       what="the pickled message to be dead-lettered")
    assert letters[0]["reason"] in ("undecodable", "invalid-task")
    assert letters[0]["taskName"] == "invoices.issue"
    issued_invoice("t-after-pickle")
