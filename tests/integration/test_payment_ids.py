"""Public payment ids (the contract's `paymentId`) against the database: chosen by publishers,
unique per invoice only; the worker's own key stays inside (refunds and retries point at it)."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import select

from messages.schemas import CompleteHostedPayment, FailPayment, OrderShipped, RefundPayment, StartHostedPayment
from models.payment import Payment
from models.queries import get_invoice
from tasks.orders import create_from_order
from tasks.payments import complete_payment, fail_hosted_payment, refund, start_payment
from worker.delivery import scheduler
from worker.delivery.handling import execute, parse
from worker.storage.records import OutboxEvent


def run(tenant: str, task: str, schema, operation, **fields):
    message = parse(schema, {"messageId": f"m-{uuid.uuid4()}", "tenantId": tenant, **fields})
    return execute(task, message, operation)


def issued(tenant: str) -> str:
    return run(tenant, "invoices.order_shipped", OrderShipped, create_from_order, orderId=f"O-{uuid.uuid4()}",
               currency="USD", autoIssue=True, lineItems=[{"quantity": "1", "unitPrice": "100.00"}]).invoice_number


def start(tenant: str, number: str, payment_id: uuid.UUID, amount: str = "40.00"):
    return run(tenant, "invoices.start_hosted_payment", StartHostedPayment, start_payment, invoiceNumber=number,
               paymentId=str(payment_id), amount=amount, currency="USD", paymentProfileId="PP-1")


def test_the_same_payment_id_names_one_payment_per_invoice(session):
    shared = uuid.uuid4()
    b_number, a_number = issued("t-b"), issued("t-a")
    a_second = issued("t-a")
    assert start("t-b", b_number, shared, "70.00").outcome == "applied"
    assert start("t-a", a_number, shared).outcome == "applied"
    assert start("t-a", a_second, shared, "10.00").outcome == "applied"  # one tenant, two invoices: two payments
    assert (start("t-a", a_number, shared).outcome, start("t-a", a_number, shared).reason) == (
        "duplicate", "payment-already-started")
    assert run("t-a", "invoices.complete_hosted_payment", CompleteHostedPayment, complete_payment,
               invoiceNumber=a_number, paymentId=str(shared)).outcome == "applied"
    rows = session.scalars(select(Payment).where(Payment.payment_id == shared)).all()
    assert len({row.id for row in rows}) == 3 and shared not in {row.id for row in rows}  # the worker's own keys
    assert sorted((row.status, str(row.amount)) for row in rows) == [
        ("Completed", "40.0000"), ("Pending", "10.0000"), ("Pending", "70.0000")]
    assert get_invoice(session, b_number, "t-b").to_json()["balance"] == "100.00"
    assert get_invoice(session, a_number, "t-a").to_json()["balance"] == "60.00"


def test_refunds_retries_and_events_show_public_ids_only(session):
    number, first = issued("t-pub"), uuid.uuid4()
    start("t-pub", number, first)
    run("t-pub", "invoices.fail_payment", FailPayment, fail_hosted_payment, invoiceNumber=number,
        paymentId=str(first), failureCode="51", failureReason="Insufficient funds")
    assert scheduler.retry_failed_payments("scan-pub")["requested"] == 1  # PAYMENT_RETRY_DAYS starts at 0
    session.expire_all()
    failed, retry = session.scalars(select(Payment).order_by(Payment.attempt)).all()
    assert retry.retry_of == failed.id and failed.id != first
    run("t-pub", "invoices.complete_hosted_payment", CompleteHostedPayment, complete_payment, invoiceNumber=number,
        paymentId=str(retry.payment_id))
    assert run("t-pub", "invoices.refund_payment", RefundPayment, refund, invoiceNumber=number,
               paymentId=str(retry.payment_id), amount="5.00").outcome == "applied"

    session.expire_all()
    payments = get_invoice(session, number, "t-pub").to_json()["payments"]
    assert [(p["paymentId"], p["retryOf"]) for p in payments] == [
        (str(first), None), (str(retry.payment_id), str(first))]
    assert [r["paymentId"] for r in payments[1]["refunds"]] == [str(retry.payment_id)]
    public = {str(first), str(retry.payment_id)}
    for payload in session.scalars(select(OutboxEvent.payload).where(OutboxEvent.tenant_id == "t-pub")):
        data = payload["data"]
        for key in ("paymentId", "retryOf"):
            assert data.get(key) in public | {None}, (payload["type"], key, data.get(key))
    published = json.dumps(session.scalars(select(OutboxEvent.payload)).all())
    assert str(failed.id) not in published and str(retry.id) not in published  # the keys stay inside
