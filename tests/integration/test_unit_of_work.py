"""The unit of work against the database: idempotency by messageId and natural keys when two
copies run at the same moment, and rejections committed with their event."""

from __future__ import annotations

import threading
import uuid

from sqlalchemy import func, select

from models.invoice import Invoice
from tasks.messages import OrderShipped, RecordPayment
from tasks.orders import create_from_order
from tasks.payments import record_offline_payment
from worker.handling import execute, parse
from worker.records import InboxMessage, OutboxEvent


def order(message_id: str, order_id: str = "O-1", tenant: str = "t-uow", **extra) -> OrderShipped:
    return parse(OrderShipped, {"messageId": message_id, "tenantId": tenant, "orderId": order_id, "currency": "USD",
                                "lineItems": [{"quantity": "1", "unitPrice": "100.00"}], **extra})


def at_once(*calls) -> list:
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def count(session, model, *where) -> int:
    return session.scalar(select(func.count()).select_from(model).where(*where))


def test_two_copies_of_one_message_at_once_apply_once(session):
    for _ in range(5):
        message = order(f"m-{uuid.uuid4()}", order_id=f"O-{uuid.uuid4()}")
        outcomes = at_once(*[lambda: execute("invoices.order_shipped", message, create_from_order)] * 2)
        assert sorted(o.outcome for o in outcomes) == ["applied", "duplicate"]
    assert count(session, Invoice) == 5
    assert count(session, OutboxEvent, OutboxEvent.type == "invoice.created") == 5


def test_two_messages_for_one_order_and_shipment_make_one_invoice(session):
    for i in range(5):
        first, second = order(f"a-{i}", order_id=f"O-{i}"), order(f"b-{i}", order_id=f"O-{i}")
        outcomes = at_once(lambda: execute("invoices.order_shipped", first, create_from_order),
                           lambda: execute("invoices.order_shipped", second, create_from_order))
        assert sorted(o.outcome for o in outcomes) == ["applied", "duplicate"]
    assert count(session, Invoice) == 5
    assert count(session, InboxMessage) == 10
    numbers = sorted(session.scalars(select(Invoice.invoice_number)))
    assert numbers == [f"INV-0000{i}" for i in range(1, 6)]  # gap-free although half the attempts lost a race


def test_a_rejection_commits_its_inbox_record_and_event_and_a_copy_yields_it(session):
    applied = execute("invoices.order_shipped", order("m-1", autoIssue=True), create_from_order)
    pay = parse(RecordPayment, {"messageId": "p-1", "tenantId": "t-uow", "invoiceNumber": applied.invoice_number,
                                "amount": "100.01", "currency": "USD"})
    rejected = execute("invoices.record_payment", pay, record_offline_payment)
    assert (rejected.outcome, rejected.reason) == ("rejected", "amount-exceeds-balance")
    again = execute("invoices.record_payment", pay, record_offline_payment)
    assert again.outcome == "duplicate" and again.extra["firstOutcome"] == "rejected"
    assert again.reason == "amount-exceeds-balance"
    events = session.scalars(select(OutboxEvent.payload).where(OutboxEvent.type == "command.rejected")).all()
    assert len(events) == 1 and events[0]["data"]["messageId"] == "p-1"
    invoice = session.scalars(select(Invoice)).one()
    assert invoice.amount_paid == 0 and invoice.payments == []


def test_the_same_message_id_in_another_tenant_is_another_message(session):
    a = execute("invoices.order_shipped", order("shared-id", tenant="t-a"), create_from_order)
    b = execute("invoices.order_shipped", order("shared-id", tenant="t-b"), create_from_order)
    assert (a.outcome, b.outcome) == ("applied", "applied")


def test_a_copy_that_waited_on_the_first_copys_claim_yields_its_outcome(session):
    """The second copy blocks on the first copy's uncommitted claim; when the first commits, the
    second sees a record its own statement could not (it began before that commit) and reads it."""
    from worker import db
    from worker.unit_of_work import Outcome, UnitOfWork

    message = order("m-waited", order_id="O-waited")
    with db.sessions()() as first:
        uow = UnitOfWork(first, tenant_id=message.tenant_id, message_id=message.message_id,
                         task="invoices.order_shipped")
        assert uow.claim() is None
        second: list = []
        waiting = threading.Thread(
            target=lambda: second.append(execute("invoices.order_shipped", message, create_from_order)))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive(), "the second copy should wait for the first copy's claim"
        uow.commit(Outcome("applied", message.message_id, invoice_number="INV-FIRST", extra={"note": "first"}))
    waiting.join(10)
    [outcome] = second
    assert (outcome.outcome, outcome.invoice_number) == ("duplicate", "INV-FIRST")
    assert outcome.extra == {"firstOutcome": "applied", "note": "first"}
    assert count(session, Invoice, Invoice.order_id == "O-waited") == 0  # the second copy changed nothing
