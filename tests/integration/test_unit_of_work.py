"""The unit of work against the database: idempotency by messageId and natural keys when two
copies run at the same moment, and rejections committed with their event."""

from __future__ import annotations

import threading
import uuid
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from messages.schemas import OrderShipped, RecordPayment
from models.invoice import Invoice
from tasks.orders import create_from_order
from tasks.payments import record_offline_payment
from worker.delivery.handling import execute, parse
from worker.storage.records import InboxMessage, OutboxEvent


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
    from worker.storage import db
    from worker.storage.unit_of_work import Outcome, UnitOfWork

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


@contextmanager
def numbering(tenant: str):
    """A session of its own and a unit of work of the tenant on it."""
    from worker.storage import db
    from worker.storage.unit_of_work import UnitOfWork

    with db.sessions()() as session:
        yield session, UnitOfWork(session, tenant_id=tenant, message_id=None, task="test")


def statements_of(session, call) -> tuple[object, list[str]]:
    """What call() returns, and the SQL statements it sent on the session's connection."""
    from sqlalchemy import event

    connection, sent = session.connection(), []

    def seen(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    event.listen(connection, "before_cursor_execute", seen)
    try:
        return call(), sent
    finally:
        event.remove(connection, "before_cursor_execute", seen)


def test_the_next_number_skips_taken_and_deleted_numbers_in_one_statement(session):
    """Numbers 1 to 500 are taken (by imports and publishers; one by a deleted invoice's tombstone):
    the next number is the first free one, found by one statement, and the counter row stays
    locked until commit; a rollback gives the number back."""
    from datetime import date

    from sqlalchemy import insert

    from models.rules import invoice_number_for
    from worker.storage.records import DeletedInvoice, InvoiceNumberSequence

    tenant = "t-num"
    session.execute(insert(Invoice), [
        {"id": uuid.uuid4(), "tenant_id": tenant, "invoice_number": invoice_number_for(n), "status": "Draft",
         "invoice_date": date(2026, 11, 28), "currency": "USD"} for n in range(1, 501) if n != 250])
    session.execute(insert(Invoice), [  # another tenant's numbers are no obstacle
        {"id": uuid.uuid4(), "tenant_id": "t-other", "invoice_number": invoice_number_for(501), "status": "Draft",
         "invoice_date": date(2026, 11, 28), "currency": "USD"}])
    session.add(DeletedInvoice(invoice_id=uuid.uuid4(), tenant_id=tenant, invoice_number=invoice_number_for(250),
                               task="invoices.delete"))
    session.commit()

    with numbering(tenant) as (first, uow):
        number, sent = statements_of(first, uow.next_invoice_number)
        assert (number, len(sent)) == ("INV-00501", 1), sent
        with numbering(tenant) as (other, waiting):
            other.execute(text("SET LOCAL lock_timeout = '200ms'"))
            with pytest.raises(OperationalError):  # the counter row stays locked until the first commits
                waiting.next_invoice_number()
        first.rollback()  # gives its number back
        number, sent = statements_of(first, uow.next_invoice_number)
        assert (number, len(sent)) == ("INV-00501", 1)
        first.commit()

    session.add(DeletedInvoice(invoice_id=uuid.uuid4(), tenant_id=tenant, invoice_number=invoice_number_for(502),
                               task="invoices.delete"))
    session.execute(insert(Invoice), [
        {"id": uuid.uuid4(), "tenant_id": tenant, "invoice_number": invoice_number_for(503), "status": "Draft",
         "invoice_date": date(2026, 11, 28), "currency": "USD"}])
    session.commit()
    with numbering(tenant) as (later, uow):
        number, sent = statements_of(later, uow.next_invoice_number)  # the counter row exists: the update path
        assert (number, len(sent)) == ("INV-00504", 1)
        later.commit()
    assert session.get(InvoiceNumberSequence, tenant).last_value == 504


def test_generated_numbers_in_sql_read_as_invoice_number_for_beyond_the_pad_width(session):
    from models.rules import invoice_number_for
    from worker.storage.invoice_numbers import number_sql

    for value in (1, 42, 99_999, 100_000, 1_234_567, 2_147_483_647):
        assert session.execute(text(f"SELECT {number_sql(':v')}"), {"v": value}).scalar_one() == \
            invoice_number_for(value)
