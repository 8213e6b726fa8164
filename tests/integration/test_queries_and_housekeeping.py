"""List invoices (filters, pages, soft-deleted hidden) and outbox pruning."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sqlalchemy import select, update

from models.invoice import Invoice
from models.queries import get_invoice, list_invoices
from worker.storage import housekeeping
from worker.storage.records import OutboxEvent
from worker.storage.unit_of_work import UnitOfWork


def seed(session, n: int = 30) -> None:
    base = datetime(2026, 11, 1, tzinfo=timezone.utc)
    for i in range(n):
        invoice = Invoice.create(
            tenant_id="t-q" if i % 10 else "t-other", invoice_number=f"INV-{i:05d}",
            content={"currency": "USD", "order_id": f"O-{i % 3}", "customer": {"customerId": f"C-{i % 2}"},
                     "line_items": [{"quantity": Decimal(1), "unit_price": Decimal("10.00")}]},
            now=base + timedelta(minutes=i))
        if i % 4 == 0:
            invoice.issue()
        if i == 5:
            invoice.deactivate()
        session.add(invoice)
    session.commit()


def test_list_filters_pages_and_hides_soft_deleted(session):
    seed(session)
    page = list_invoices(session, tenant_id="t-q")
    assert (page.page, page.per_page, page.total) == (1, 25, 26)  # 27 of the tenant, one soft-deleted
    assert len(page.invoices) == 25 and page.pages == 2
    assert [i.invoice_number for i in page.invoices[:2]] == ["INV-00029", "INV-00028"]  # newest first
    assert len(list_invoices(session, tenant_id="t-q", page=2).invoices) == 1
    by_customer = list_invoices(session, tenant_id="t-q", customer_id="C-1", per_page=100)
    assert by_customer.invoices and all(i.customer_id == "C-1" for i in by_customer.invoices)
    by_order = list_invoices(session, tenant_id="t-q", order_id="O-2", per_page=100)
    assert by_order.invoices and all(i.order_id == "O-2" for i in by_order.invoices)
    issued = list_invoices(session, tenant_id="t-q", status="Issued", per_page=100)
    assert {i.invoice_number for i in issued.invoices} == {f"INV-{i:05d}" for i in range(30) if i % 4 == 0 and i % 10}
    assert get_invoice(session, "INV-00005", "t-q").is_active is False  # still there, by number
    assert get_invoice(session, "INV-00005", "t-other") is None


def test_prune_outbox_deletes_only_old_published_events(session):
    with session.begin():
        uow = UnitOfWork(session, tenant_id="t-prune", message_id=None, task="test")
        for i in range(4):
            uow.emit("invoice.updated", {"i": i}, invoice_number="X")
        uow.write_outbox()
    now = datetime.now(timezone.utc)
    ids = session.scalars(select(OutboxEvent.id).order_by(OutboxEvent.id)).all()
    session.execute(update(OutboxEvent).where(OutboxEvent.id == ids[0]).values(published_at=now - timedelta(days=30)))
    session.execute(update(OutboxEvent).where(OutboxEvent.id == ids[1]).values(published_at=now - timedelta(hours=1)))
    session.commit()
    assert housekeeping.prune_outbox(now) == 1  # retention 168 hours: only the 30-day-old published row goes
    remaining = session.scalars(select(OutboxEvent.id).order_by(OutboxEvent.id)).all()
    assert remaining == ids[1:]  # unpublished rows and recently published ones stay
