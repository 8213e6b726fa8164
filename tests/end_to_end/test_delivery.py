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
    dead_letters_of,
    invoice_json,
    new_tenant,
    order_body,
    outcome_of,
    send,
    wait_for,
    wait_outcome,
)
from worker.endpoints import libpq_url
from worker.storage import db
from worker.storage.records import InboxMessage, OutboxEvent


def issued_invoice(tenant: str, **overrides) -> dict:
    body = order_body(tenant=tenant, autoIssue=True, **overrides)
    send("invoices.order_shipped", body)
    outcome = wait_outcome(tenant, body["messageId"])
    assert outcome["outcome"] == "applied", outcome
    return invoice_json(tenant, outcome["invoiceNumber"])


def payment(tenant: str, number: str, amount: str | float, **extra) -> dict:
    return {"messageId": f"pay-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": number, "amount": amount,
            "currency": "USD", "paymentMethod": "EFT", "occurredAt": "2026-11-24T10:15:02.120+01:00", **extra}


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


def test_the_same_message_three_times_changes_the_invoice_once(running, own_worker):
    tenant = new_tenant("t-dup")
    invoice = issued_invoice(tenant)
    body = payment(tenant, invoice["invoiceNumber"], "10.00")
    for _ in range(3):
        own_worker.send("invoices.record_payment", body)
    # One process takes its messages in the order sent: once the marker has its outcome, all three
    # copies were handled. (Its amount is a JSON number, which the contract accepts.)
    marker = payment(tenant, invoice["invoiceNumber"], 1.5)
    own_worker.send("invoices.record_payment", marker)
    assert wait_outcome(tenant, marker["messageId"])["outcome"] == "applied"
    assert outcome_of(tenant, body["messageId"])["outcome"] == "applied"
    after = invoice_json(tenant, invoice["invoiceNumber"])
    assert after["amountPaid"] == "11.50" and len(after["payments"]) == 2
    assert [e["type"] for e in events_of(invoice["id"])].count("payment.recorded") == 2
    assert own_worker.log.count("'outcome': 'duplicate'") == 2  # this test's worker saw only this test's messages


def test_two_hundred_payments_from_two_worker_processes_give_exact_totals(running, processes):
    processes.worker(name="second@localhost")
    tenant = new_tenant("t-conc")
    invoice = issued_invoice(tenant, lineItems=[{"quantity": "1", "unitPrice": "5000.00"}], discount=None,
                             taxAmount="0")
    assert invoice["balance"] == "5000.00"
    rng = random.Random(7)
    amounts = [Decimal(rng.randint(1, 2000)) / 100 for _ in range(200)]
    bodies = [payment(tenant, invoice["invoiceNumber"], str(a)) for a in amounts]
    for body in bodies:
        send("invoices.record_payment", body)
    for body in bodies:
        assert wait_outcome(tenant, body["messageId"], timeout=120)["outcome"] == "applied"
    after = invoice_json(tenant, invoice["invoiceNumber"])
    assert len(after["payments"]) == 200
    assert Decimal(after["amountPaid"]) == sum(amounts)
    assert Decimal(after["balance"]) == Decimal("5000.00") - sum(amounts)
    assert after["status"] == "PartiallyPaid"
    sequences = [e["sequence"] for e in events_of(invoice["id"])]
    assert sequences == list(range(1, len(sequences) + 1))  # no gaps, no repeats under concurrency


def test_a_pool_process_killed_mid_task_has_its_message_redelivered_and_applied_once(running, own_worker):
    tenant = new_tenant("t-kill")
    invoice = issued_invoice(tenant)
    body = payment(tenant, invoice["invoiceNumber"], "25.00")
    # Hold the invoice's row lock so that the task stops in the middle of its transaction.
    with psycopg.connect(database_conninfo()) as blocker:
        blocker.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (invoice["id"],))
        own_worker.send("invoices.record_payment", body)
        wait_for(lambda: waiting_on_locks() >= 1, 20, what="the task to block on the invoice lock")
        pool = psutil.Process(own_worker.proc.pid).children(recursive=True)
        assert len(pool) == 1  # the one pool process, running the task
        pool[0].kill()
        pool[0].wait(10)
        blocker.rollback()
    outcome = wait_outcome(tenant, body["messageId"], timeout=60)
    assert outcome["outcome"] == "applied"
    after = invoice_json(tenant, invoice["invoiceNumber"])
    assert after["amountPaid"] == "25.00" and len(after["payments"]) == 1
    assert "WorkerLostError" in own_worker.log  # the process that ran the message died; another applied it


def blocked_on_a_lock(pids: list[int]) -> bool:
    """Whether one of these processes has a database connection waiting for a lock (it is mid-task)."""
    from tests.faults.conftest import backends_of

    backends = list(backends_of(pids))
    with psycopg.connect(database_conninfo(), autocommit=True) as conn:
        return bool(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 "AND pid = ANY(%s)", (backends,)).fetchone()[0])


def due_for_restore(redis_url: str, visibility: float) -> bool:
    """Every message registered as delivered on this Redis database is older than the visibility timeout."""
    import time

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        scores = [score for _, score in client.zrange("unacked_index", 0, -1, withscores=True)]
    finally:
        client.close()
    return bool(scores) and max(scores) < time.time() - visibility


def test_a_worker_killed_outright_loses_nothing(processes, database, broker):
    """SIGKILL of the whole worker while a task holds its message: the broker hands the message to
    the next worker and it is applied once. The workers consume a broker database (a vhost) of
    their own, so the session's shared worker cannot take the message, and the kill is shown to hit
    the worker whose pool process is blocked in the task."""
    from tests.conftest import TEST_ENV, _flush_broker_database, own_broker_url, publisher_app
    from worker.brokers.topology import is_amqp, queue_for

    url = own_broker_url(broker)
    _flush_broker_database(url)
    publisher = publisher_app(url)

    def worker(name: str, **kwargs):
        return processes.worker(name=name, extra_env={"BROKER_URL": url}, **kwargs)

    def publish(task: str, body: dict) -> None:
        publisher.send_task(task, args=[body], queue=queue_for(task))

    first = worker("doomed@localhost")
    tenant = new_tenant("t-crash")
    order = order_body(tenant=tenant, autoIssue=True)
    publish("invoices.order_shipped", order)
    number = wait_outcome(tenant, order["messageId"])["invoiceNumber"]
    body = payment(tenant, number, "30.00")
    invoice = invoice_json(tenant, number)
    try:
        with psycopg.connect(database_conninfo()) as blocker:
            blocker.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (invoice["id"],))
            publish("invoices.record_payment", body)
            pool = [child.pid for child in psutil.Process(first.pid).children(recursive=True)]
            wait_for(lambda: blocked_on_a_lock(pool), 20, what="the doomed worker's task to block")
            processes.stop(first, sig=9)
            blocker.rollback()
        assert outcome_of(tenant, body["messageId"]) is None  # nothing applied it while the worker was down
        if not is_amqp(url):
            # Redis keeps it in `unacked` until its visibility timeout passes; kombu 5.7's sweep runs at a
            # consumer's start-up and then once in ten 10-s ticks (~100 s): the successor starts when
            # the message is due, so that its first sweep hands it back.
            visibility = float(TEST_ENV["BROKER_VISIBILITY_TIMEOUT"])
            wait_for(lambda: due_for_restore(url, visibility), visibility + 30, what="the visibility timeout")
        processes.worker(name="successor@localhost", extra_env={"BROKER_URL": url})
        outcome = wait_outcome(tenant, body["messageId"], timeout=90)
        assert outcome["outcome"] == "applied"
        after = invoice_json(tenant, number)
        assert after["amountPaid"] == "30.00" and len(after["payments"]) == 1
    finally:
        publisher.close()
        _flush_broker_database(url)


def malformed_bodies(tenant: str) -> dict[str, dict]:
    """Bodies of every malformed kind, with messageIds of this tenant's own."""
    ids = {n: f"bad-{n}-{tenant}" for n in range(1, 10)}
    return {
        "missing fields": {"messageId": ids[1], "tenantId": tenant},
        "wrong types": {"messageId": ids[2], "tenantId": tenant, "invoiceNumber": "INV-00001", "amount": {"x": 1},
                        "currency": "USD"},
        "float that hurts": {"messageId": ids[3], "tenantId": tenant, "invoiceNumber": "INV-00001",
                             "amount": 0.30000000000000004, "currency": "USD"},
        "huge string": {"messageId": ids[4], "tenantId": tenant, "invoiceNumber": "INV-" + "9" * 100_000,
                        "amount": "1.00", "currency": "USD"},
        "unknown currency": {"messageId": ids[5], "tenantId": tenant, "invoiceNumber": "INV-00001",
                             "amount": "1.00", "currency": "XYZ"},
        "negative amount": {"messageId": ids[6], "tenantId": tenant, "invoiceNumber": "INV-00001",
                            "amount": "-5.00", "currency": "USD"},
        "too many decimals for JPY": {"messageId": ids[7], "tenantId": tenant, "invoiceNumber": "INV-00001",
                                      "amount": "1.5", "currency": "JPY"},
        "unknown field": {"messageId": ids[8], "tenantId": tenant, "invoiceNumber": "INV-00001", "amount": "1.00",
                          "currency": "USD", "ammount": "2.00"},
        "occurredAt without an offset": {"messageId": ids[9], "tenantId": tenant, "invoiceNumber": "INV-00001",
                                         "amount": "1.00", "currency": "USD", "occurredAt": "2026-11-24T10:15:02"},
    }


def bodies_without_a_usable_message_id(tenant: str) -> dict[str, dict]:
    good = {"tenantId": tenant, "invoiceNumber": "INV-00001", "amount": "1.00", "currency": "USD"}
    return {"no messageId": {**good, "notes": tenant}, "empty messageId": {**good, "messageId": ""},
            "messageId over 200 characters": {**good, "messageId": "m" * 201}}


def test_malformed_bodies_of_every_kind_are_dead_lettered_whole_and_the_worker_keeps_going(running):
    tenant = new_tenant("t-bad")
    malformed = malformed_bodies(tenant)
    for body in malformed.values():
        send("invoices.record_payment", body)
    not_an_object = f"not an object ({tenant})"
    send("invoices.record_payment", not_an_object)
    without_id = bodies_without_a_usable_message_id(tenant)
    for body in without_id.values():
        send("invoices.record_payment", body)
    stored = {}
    for kind, body in malformed.items():
        letter = wait_for(lambda: dead_letters_of(message_id=body["messageId"]), 30, what=f"the {kind} dead letter")[0]
        assert letter["reason"] == "malformed", kind
        assert letter["body"] == body, f"{kind}: the body is kept whole"
        stored[kind] = letter
    assert "amount" in stored["missing fields"]["error"] and "currency" in stored["missing fields"]["error"]
    assert "more decimals than USD allows" in stored["float that hurts"]["error"]
    assert "XYZ" in stored["unknown currency"]["error"]
    negative = stored["negative amount"]["error"]
    assert "may not be negative" in negative or "greater than zero" in negative
    assert "JPY" in stored["too many decimals for JPY"]["error"]
    assert "ammount" in stored["unknown field"]["error"]
    assert "occurredAt" in stored["occurredAt without an offset"]["error"]
    for kind, body in without_id.items():
        letter = wait_for(lambda: [d for d in dead_letters_of(task="invoices.record_payment") if d["body"] == body], 30,
                          what=f"the dead letter of a body with {kind}")[0]
        assert letter["reason"] == "malformed" and "messageId" in letter["error"], (kind, letter["error"])
    letters = wait_for(lambda: [d for d in dead_letters_of(task="invoices.record_payment") if d["body"] == not_an_object],
                       30, what="the dead letter of a body that is not an object")
    assert "must be a JSON object" in letters[0]["error"]
    # nothing of a dead-lettered message reached the inbox, and the worker still applies good messages
    with db.sessions()() as s:
        assert s.scalar(select(func.count()).select_from(InboxMessage).where(InboxMessage.tenant_id == tenant)) == 0
    issued_invoice(new_tenant("t-after-bad"))


def test_an_unknown_task_is_dead_lettered_whole(running):
    from worker.celery_app import app

    tenant = new_tenant("t-unknown")
    body = {"messageId": f"u-{tenant}", "tenantId": tenant, "anything": [1, 2]}
    app.send_task("invoices.no_such_task", args=[body], queue="invoices.commands")
    letters = wait_for(lambda: dead_letters_of(message_id=body["messageId"]), 20, what="the dead letter")
    assert letters[0]["reason"] == "unknown-task" and letters[0]["taskName"] == "invoices.no_such_task"
    assert letters[0]["body"] == body
    issued_invoice(new_tenant("t-after-unknown"))  # the worker keeps going


def test_a_message_of_tenant_b_naming_tenant_a_invoice_is_rejected_not_found(running, events):
    tenant_a, tenant_b = new_tenant("tenant-a"), new_tenant("tenant-b")
    invoice = issued_invoice(tenant_a)
    body = payment(tenant_b, invoice["invoiceNumber"], "5.00")
    send("invoices.record_payment", body)
    outcome = wait_outcome(tenant_b, body["messageId"])
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "invoice-not-found")
    assert invoice_json(tenant_a, invoice["invoiceNumber"])["amountPaid"] == "0.00"
    by_id = {**payment(tenant_b, invoice["invoiceNumber"], "5.00"), "invoiceId": invoice["id"]}
    by_id.pop("invoiceNumber")
    send("invoices.record_payment", by_id)
    assert wait_outcome(tenant_b, by_id["messageId"])["reason"] == "invoice-not-found"
    events.wait(lambda e: {by_id["messageId"], body["messageId"]} <= {x["causationId"] for x in e},
                what="both rejections")
    rejected = [e for e in events.events if e["type"] == "command.rejected"]
    assert [(e["causationId"], e["data"]["reason"]) for e in rejected] == [
        (body["messageId"], "invoice-not-found"), (by_id["messageId"], "invoice-not-found")]
    assert all(e["tenantId"] == tenant_b for e in rejected)
    assert [e["type"] for e in events.of(tenant_a)] == ["invoice.created", "invoice.status_changed"]


def test_a_forbidden_command_is_rejected_with_its_reason_and_not_retried(running, own_worker, events):
    tenant = new_tenant("t-rej")
    invoice = issued_invoice(tenant)
    before = invoice_json(tenant, invoice["invoiceNumber"])
    too_much = payment(tenant, invoice["invoiceNumber"], "999999.00")
    own_worker.send("invoices.record_payment", too_much)
    outcome = wait_outcome(tenant, too_much["messageId"])
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "amount-exceeds-balance")
    assert "balance is 142.60 USD" in outcome["detail"]
    own_worker.send("invoices.record_payment", too_much)  # a second copy yields the first copy's outcome
    # A marker after the copy, on the same one-process worker: once its rejection is published, the
    # copy was handled and any event of it published before (the relay publishes in commit order).
    marker = payment(tenant, invoice["invoiceNumber"], "999998.00")
    own_worker.send("invoices.record_payment", marker)
    events.wait(lambda e: any(x["causationId"] == marker["messageId"] for x in e), what="the marker's rejection")
    mine = [e for e in events.of(tenant) if e["type"] == "command.rejected" and e["causationId"] == too_much["messageId"]]
    assert len(mine) == 1
    assert mine[0]["data"]["reason"] == "amount-exceeds-balance"
    assert mine[0]["invoiceId"] == invoice["id"] and mine[0]["sequence"] is None
    assert outcome_of(tenant, too_much["messageId"])["outcome"] == "rejected"
    assert own_worker.log.count("'outcome': 'duplicate'") == 1
    assert dead_letters_of(message_id=too_much["messageId"]) == []
    # nothing changed: the invoice as it was (status, amounts, payments, its event sequence), and the
    # rejection's only event is command.rejected
    assert invoice_json(tenant, invoice["invoiceNumber"]) == before
    assert {e["type"] for e in events.of(tenant) if e["causationId"] in (too_much["messageId"], marker["messageId"])} \
        == {"command.rejected"}


def test_a_pickled_message_is_refused_and_dead_lettered(running):
    """JSON only: a message in another content type never runs, and is kept for an operator."""
    import pickle

    from kombu import Connection

    from worker.celery_app import app

    tenant = new_tenant("t-pickle")
    body = {"messageId": f"p-{tenant}", "tenantId": tenant}
    delivery = f"pickled-{tenant}"
    with Connection(app.conf.broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            pickle.dumps(([body], {}, {})), routing_key="invoices.commands", exchange="invoices.commands",
            content_type="application/x-python-serialize", content_encoding="binary",
            headers={"task": "invoices.issue", "id": delivery, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    letters = wait_for(lambda: [d for d in dead_letters_of() if d["deliveryId"] == delivery], 20,
                       what="the pickled message to be dead-lettered")
    assert letters[0]["reason"] in ("not-a-message", "invalid-task")
    assert letters[0]["taskName"] == "invoices.issue"
    issued_invoice(new_tenant("t-after-pickle"))


# CONTRACT.md section 2, written out here rather than taken from the product's routing table.
CONTRACT_QUEUES = {
    "invoices.orders": ("invoices.order_shipped",),
    "invoices.payments": ("invoices.payment_callback", "invoices.start_hosted_payment",
                          "invoices.complete_hosted_payment", "invoices.fail_payment", "invoices.record_payment",
                          "invoices.refund_payment"),
    "invoices.commands": ("invoices.create", "invoices.update", "invoices.issue", "invoices.apply_discount",
                          "invoices.remove_discount", "invoices.void", "invoices.cancel", "invoices.delete"),
    "invoices.imports": ("invoices.bulk_import",),
}


def test_every_task_of_the_contract_is_consumed_from_its_queue(running):
    """Any Celery-protocol client (here a bare Celery app, JSON only) publishing a task to the queue the
    contract names reaches the worker: each body below lacks required fields, so each is dead-lettered
    `malformed` under its task's name. (invoices.retry_failed_payments goes through invoices.maintenance
    in test_payment_retries.py, sent by beat.)"""
    from celery import Celery

    tenant = new_tenant("t-routes")
    client = Celery("contract-client", broker=running.env["BROKER_URL"])
    client.conf.update(task_serializer="json", accept_content=["json"])
    sent = {}
    try:
        for queue, tasks in CONTRACT_QUEUES.items():
            for task in tasks:
                body = {"messageId": f"route-{task}-{tenant}", "tenantId": tenant}
                client.send_task(task, args=[body], queue=queue)
                sent[task] = body
    finally:
        client.close()
    for task, body in sent.items():
        letter = wait_for(lambda: dead_letters_of(message_id=body["messageId"]), 30, what=f"{task} to be consumed")[0]
        assert (letter["taskName"], letter["body"]) == (task, body)
        assert letter["reason"] in ("malformed", "bad-signature"), letter
