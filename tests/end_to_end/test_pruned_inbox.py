"""A copy of a message arriving after its inbox row was pruned (INBOX_RETENTION_DAYS) does not
apply twice: every task's natural key catches it, and the tasks that have none keep their inbox
rows (worker/storage/records.py INBOX_KEPT_TASKS). One set of invoices, every task's first copy, the rows
aged past the retention and pruned by invoices.prune_records through the worker, then every
pruned message sent again."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select, text

from tests.conftest import invoice_json, order_body, send, wait_for, wait_outcome
from tests.end_to_end.test_payments import SECRET, callback
from worker.storage import db
from worker.storage.records import INBOX_KEPT_TASKS, InboxMessage, InvoiceHistory

T = "t-pruned"


def body(**fields) -> dict:
    return {"messageId": f"p-{uuid.uuid4()}", "tenantId": T, **fields}


def created(**fields) -> dict:
    return body(currency="USD", customer={"customerId": "C-1"}, lineItems=[{"quantity": "1", "unitPrice": "50.00"}],
                **fields)


def applied(sent: list, task: str, message: dict) -> dict:
    send(task, message)
    outcome = wait_outcome(T, message["messageId"])
    assert outcome["outcome"] == "applied", (task, outcome)
    sent.append((task, message))
    return outcome


def changes() -> int:
    with db.sessions()() as s:
        return s.scalar(select(func.count()).select_from(InvoiceHistory).where(InvoiceHistory.tenant_id == T))


def test_every_task_copy_after_its_inbox_row_was_pruned_applies_once(running):
    assert SECRET == "test-secret"
    sent: list[tuple[str, dict]] = []
    a = applied(sent, "invoices.order_shipped", order_body(tenant=T, messageId=f"p-{uuid.uuid4()}", shipmentId="S1"))
    a_number = a["invoiceNumber"]
    address = {"invoiceNumber": a_number}
    applied(sent, "invoices.issue", body(**address))
    paid = applied(sent, "invoices.record_payment", body(**address, amount="10.00", currency="USD",
                                                         paymentMethod="EFT"))
    recorded_id = invoice_json(T, a_number)["payments"][0]["paymentId"]
    hosted = {name: str(uuid.uuid4()) for name in ("completed", "failed", "called-back")}
    for name in hosted:
        applied(sent, "invoices.start_hosted_payment", body(**address, paymentId=hosted[name], amount="5.00",
                                                            currency="USD"))
    applied(sent, "invoices.complete_hosted_payment", body(**address, paymentId=hosted["completed"]))
    applied(sent, "invoices.fail_payment", body(**address, paymentId=hosted["failed"], failureCode="51",
                                                failureReason="Insufficient funds"))
    applied(sent, "invoices.payment_callback", callback(T, a_number, hosted["called-back"], "Approved", "5.00"))
    applied(sent, "invoices.refund_payment", body(**address, paymentId=recorded_id, amount="3.00"))
    assert paid["outcome"] == "applied"
    b = {"invoiceNumber": "B-1"}
    applied(sent, "invoices.create", created(**b))
    applied(sent, "invoices.update", body(**b, notes="first"))
    applied(sent, "invoices.apply_discount", body(**b, discount={"code": "X", "type": "Percentage", "value": "10"}))
    applied(sent, "invoices.remove_discount", body(**b))
    applied(sent, "invoices.void", body(**b))
    applied(sent, "invoices.create", created(invoiceNumber="C-1"))
    applied(sent, "invoices.cancel", body(invoiceNumber="C-1"))
    d = applied(sent, "invoices.order_shipped", order_body(tenant=T, messageId=f"p-{uuid.uuid4()}"))
    applied(sent, "invoices.delete", body(invoiceNumber=d["invoiceNumber"]))
    applied(sent, "invoices.bulk_import", body(batchId="b-1", invoices=[
        {**created(invoiceNumber="IMP-1"), "importedInvoiceTotal": "50.00", "importedBalance": "20.00"}]))
    assert {task for task, _ in sent} >= {t for t in INBOX_KEPT_TASKS}
    numbers = (a_number, "B-1", "C-1", "IMP-1")
    before = {n: invoice_json(T, n) for n in numbers}
    history_before = changes()

    with db.engine().begin() as conn:  # every row past INBOX_RETENTION_DAYS (30 by default)
        conn.execute(text("UPDATE inbox SET processed_at = now() - interval '31 days' WHERE tenant_id = :t"), {"t": T})
    send("invoices.prune_records", {})
    kept = sum(1 for task, _ in sent if task in INBOX_KEPT_TASKS)

    def inbox_rows() -> list[str]:
        with db.sessions()() as s:
            return list(s.scalars(select(InboxMessage.task).where(InboxMessage.tenant_id == T)))

    left = wait_for(lambda: rows if len(rows := inbox_rows()) == kept else None, 30, what="the inbox pruned")
    assert set(left) == set(INBOX_KEPT_TASKS)

    pruned = [(task, message) for task, message in sent if task not in INBOX_KEPT_TASKS]
    for task, message in pruned:
        send(task, message)
    outcomes = {message["messageId"]: (task, wait_outcome(T, message["messageId"])) for task, message in pruned}
    expected = {
        "invoices.order_shipped": ("duplicate", "order-already-invoiced"),  # (orderId, shipmentId), tombstone too
        "invoices.issue": ("rejected", "invalid-state-transition"),  # Draft → Issued happens once
        "invoices.record_payment": ("duplicate", "payment-already-recorded"),  # payment id from tenant+messageId
        "invoices.start_hosted_payment": ("duplicate", "payment-already-started"),  # paymentId
        "invoices.complete_hosted_payment": ("duplicate", "payment-already-completed"),  # paymentId's status
        "invoices.fail_payment": ("duplicate", "payment-already-failed"),
        "invoices.payment_callback": ("duplicate", "callback-already-applied"),  # transactionId
        "invoices.refund_payment": ("duplicate", "refund-already-made"),  # refund id from tenant+messageId
        "invoices.void": ("rejected", "invalid-state-transition"),  # Voided is final
        "invoices.cancel": ("rejected", "invalid-state-transition"),  # Cancelled is final
        "invoices.delete": ("rejected", "invoice-not-found"),  # the tombstone
    }
    wrong = {task: (o["outcome"], o["reason"]) for task, o in outcomes.values()
             if (o["outcome"], o["reason"]) != expected[task]}
    assert wrong == {}
    assert {n: invoice_json(T, n) for n in numbers} == before
    assert invoice_json(T, d["invoiceNumber"]) is None
    assert changes() == history_before
