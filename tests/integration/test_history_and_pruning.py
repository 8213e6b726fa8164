"""The invoice history (every applied change, the scheduler's and bulk import's too, deleted
invoices included), deleted numbers never used again, and batched pruning of what is bounded."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from click.testing import CliRunner
from sqlalchemy import func, select, text

from messages.schemas import (
    BulkImport,
    CreateInvoice,
    FailPayment,
    InvoiceCommand,
    OrderShipped,
    RecordPayment,
    StartHostedPayment,
)
from tasks.commands import create_invoice
from tasks.orders import create_from_order
from tasks.payments import fail_hosted_payment, record_offline_payment, start_payment
from worker.cli.main import cli
from worker.delivery import scheduler
from worker.delivery.handling import execute, parse
from worker.storage import housekeeping
from worker.storage.bulk_import import import_batch
from worker.storage.records import DeadLetter, DeliveryCount, InboxMessage, InvoiceHistory, InvoiceWait

T = "t-hist"
PAYMENT_EVENTS = ["payment.recorded", "invoice.status_changed"]


def run(task: str, schema, operation, **fields):
    message = parse(schema, {"messageId": f"h-{uuid.uuid4()}", "tenantId": T, **fields})
    return execute(task, message, operation)


def simple(task: str, number: str):
    """invoices.issue or invoices.delete, as the task runs it."""

    def apply(uow, message):
        invoice = uow.invoice(message.address)
        (invoice.issue if task == "invoices.issue" else invoice.delete)()

    return run(task, InvoiceCommand, apply, invoiceNumber=number)


def create(number: str | None = None, **fields):
    body = {"currency": "USD", "customer": {"customerId": "C-1"},
            "lineItems": [{"quantity": "2", "unitPrice": "25.00"}], **fields}
    if number:
        body["invoiceNumber"] = number
    return run("invoices.create", CreateInvoice, create_invoice, **body)


def history(session, number: str) -> list[InvoiceHistory]:
    session.expire_all()
    return list(session.scalars(select(InvoiceHistory).where(InvoiceHistory.invoice_number == number)
                                .order_by(InvoiceHistory.id)))


def test_every_applied_change_is_kept_with_its_cause_events_statuses_and_amounts(session):
    made = create("H-1")
    issued = simple("invoices.issue", "H-1")
    paid = run("invoices.record_payment", RecordPayment, record_offline_payment, invoiceNumber="H-1", amount="20.00",
               currency="USD", paymentMethod="EFT")
    refused = run("invoices.record_payment", RecordPayment, record_offline_payment, invoiceNumber="H-1",
                  amount="999.00", currency="USD", paymentMethod="EFT")
    assert refused.outcome == "rejected"
    rows = history(session, "H-1")
    assert [(r.message_id, r.task, r.status_before, r.status_after) for r in rows] == [
        (made.message_id, "invoices.create", None, "Draft"),
        (issued.message_id, "invoices.issue", "Draft", "Issued"),
        (paid.message_id, "invoices.record_payment", "Issued", "PartiallyPaid"),
    ]  # the rejected payment changed nothing: no row
    assert [e["type"] for e in rows[2].events] == PAYMENT_EVENTS
    sequences = [e["sequence"] for r in rows for e in r.events]
    assert sequences == list(range(1, len(sequences) + 1))  # every event of the invoice, in order
    assert (rows[2].invoice_total, rows[2].amount_paid, rows[2].balance, rows[2].currency) == (
        Decimal("50.00"), Decimal("20.00"), Decimal("30.00"), "USD")
    assert rows[0].causation_id == made.message_id

    gone = create("H-2")
    deleted = simple("invoices.delete", "H-2")
    assert deleted.outcome == "applied"
    assert [(r.task, r.status_before, r.status_after) for r in history(session, "H-2")] == [
        ("invoices.create", None, "Draft"), ("invoices.delete", "Draft", None)]

    runner = CliRunner()
    shown = runner.invoke(cli, ["invoices", "history", "H-1", "--tenant", T, "--json"])
    assert shown.exit_code == 0, shown.output
    assert [(r["messageId"], r["statusAfter"], r["balance"]) for r in json.loads(shown.output)] == [
        (made.message_id, "Draft", "50.00"), (issued.message_id, "Issued", "50.00"),
        (paid.message_id, "PartiallyPaid", "30.00")]
    table = runner.invoke(cli, ["invoices", "history", "H-2"])
    assert table.exit_code == 0 and "(deleted)" in table.output and "invoice.deleted" in table.output
    got = runner.invoke(cli, ["invoices", "get", "H-2", "--tenant", T])
    assert got.exit_code == 1 and deleted.message_id in got.output and "deleted at" in got.output
    listed = runner.invoke(cli, ["invoices", "list", "--tenant", T, "--json"])
    assert [i["invoiceNumber"] for i in json.loads(listed.output)["invoices"]] == ["H-1"]
    assert gone.outcome == "applied"


def test_the_retry_scan_and_bulk_import_write_history_too(session):
    order = run("invoices.order_shipped", OrderShipped, create_from_order, orderId="O-1", currency="USD",
                autoIssue=True, lineItems=[{"quantity": "1", "unitPrice": "40.00"}])
    number, payment_id = order.invoice_number, str(uuid.uuid4())
    run("invoices.start_hosted_payment", StartHostedPayment, start_payment, invoiceNumber=number,
        paymentId=payment_id, amount="40.00", currency="USD", paymentProfileId="PP-1")
    run("invoices.fail_payment", FailPayment, fail_hosted_payment, invoiceNumber=number, paymentId=payment_id,
        failureCode="51", failureReason="Insufficient funds")
    assert scheduler.retry_failed_payments(scan_id="scan-1")["requested"] == 1  # PAYMENT_RETRY_DAYS starts at 0
    scan = history(session, number)[-1]
    assert (scan.message_id, scan.causation_id, scan.task) == (
        None, f"scan-1:{payment_id}", "invoices.retry_failed_payments")

    def entry(n: str, **extra) -> dict:
        return {"invoiceNumber": n, "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "30.00"}],
                "importedInvoiceTotal": "30.00", "importedBalance": "10.00", **extra}

    first = run("invoices.bulk_import", BulkImport, import_batch, batchId="b-1",
                invoices=[entry("IMP-1"), entry("IMP-2")])
    second = run("invoices.bulk_import", BulkImport, import_batch, batchId="b-2",
                 invoices=[entry("IMP-1", importedBalance="0.00"), entry("IMP-2")])
    rows = history(session, "IMP-1")
    assert [(r.message_id, r.status_before, r.status_after, r.amount_paid, r.balance) for r in rows] == [
        (first.message_id, None, "PartiallyPaid", Decimal("20.00"), Decimal("10.00")),
        (second.message_id, "PartiallyPaid", "Paid", Decimal("30.00"), Decimal("0.00"))]
    assert [e["type"] for e in rows[1].events] == ["invoice.updated", "invoice.status_changed"]
    assert [e["sequence"] for e in rows[1].events] == [2, 3]
    assert len(history(session, "IMP-2")) == 1  # unchanged by the second batch: no row


def test_a_deleted_invoices_number_is_never_used_again(session):
    create("GONE-1")
    simple("invoices.delete", "GONE-1")
    again = create("GONE-1")
    assert (again.outcome, again.reason) == ("rejected", "duplicate-invoice-number")
    assert "deleted at" in again.detail
    order = run("invoices.order_shipped", OrderShipped, create_from_order, orderId="O-9", invoiceNumber="GONE-1",
                currency="USD", lineItems=[{"quantity": "1", "unitPrice": "1.00"}])
    assert (order.outcome, order.reason) == ("rejected", "duplicate-invoice-number")
    imported = run("invoices.bulk_import", BulkImport, import_batch, batchId="b-3", invoices=[
        {"invoiceNumber": "GONE-1", "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "1.00"}]},
        {"invoiceNumber": "INV-00001", "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "1.00"}]}])
    assert [(r["invoiceNumber"], r["reason"]) for r in imported.extra["rejected"]] == [
        ("GONE-1", "duplicate-invoice-number")]
    simple("invoices.delete", "INV-00001")
    assert create().invoice_number == "INV-00002"  # the sequence skips the deleted number too


def test_pruning_takes_old_rows_in_batches_and_keeps_what_must_stay(session):
    now = datetime.now(timezone.utc)
    old, recent = now - timedelta(days=400), now - timedelta(minutes=5)
    for i in range(5):
        session.add(InboxMessage(tenant_id=T, message_id=f"old-{i}", task="invoices.issue", outcome="applied",
                                 processed_at=old))
    session.add(InboxMessage(tenant_id=T, message_id="old-update", task="invoices.update", outcome="applied",
                             processed_at=old))
    session.add(InboxMessage(tenant_id=T, message_id="recent", task="invoices.issue", outcome="applied",
                             processed_at=recent))
    for status in ("open", "discarded", "replayed"):
        session.add(DeadLetter(fingerprint=f"old-{status}", delivery_id=f"old-{status}", task_name="invoices.issue", body={}, reason="x",
                               error="x", status=status, first_seen=old, last_seen=old))
    session.add(DeadLetter(fingerprint="recent-discarded", delivery_id="recent-discarded", task_name="invoices.issue", body={}, reason="x",
                           error="x", status="discarded", first_seen=recent, last_seen=recent))
    session.add_all([InvoiceWait(tenant_id=T, message_id="old", first_seen=old),
                     InvoiceWait(tenant_id=T, message_id="recent", first_seen=recent),
                     DeliveryCount(delivery_id="old", task="x", starts=2, first_seen=old, last_seen=old),
                     DeliveryCount(delivery_id="recent", task="x", starts=2, first_seen=recent, last_seen=recent)])
    session.commit()
    assert housekeeping.prune("inbox", now - timedelta(days=30), batch=2) == 5  # three batches
    assert housekeeping.prune_records(now) == {"inbox": 0, "dead_letters": 2, "invoice_waits": 1,
                                               "delivery_counts": 1}
    session.expire_all()
    assert sorted(session.scalars(select(InboxMessage.message_id))) == ["old-update", "recent"]
    assert sorted(session.scalars(select(DeadLetter.delivery_id))) == ["old-open", "recent-discarded"]
    assert list(session.scalars(select(InvoiceWait.message_id))) == ["recent"]
    assert list(session.scalars(select(DeliveryCount.delivery_id))) == ["recent"]
    assert session.scalar(select(func.count()).select_from(text("invoice_history"))) == 0
