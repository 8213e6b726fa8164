"""Reading the invoice history and the tombstones: what `invoices history` and `invoices get`
show of an invoice, deleted ones included."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.money import format_money
from models.queries import AmbiguousInvoice
from worker.storage.records import DeletedInvoice, InvoiceHistory


def _reference(model: Any, reference: str) -> Any:
    try:
        return model.invoice_id == uuid.UUID(reference)
    except ValueError:
        return model.invoice_number == reference


def history(session: Session, reference: str, tenant_id: str | None = None) -> list[InvoiceHistory]:
    """Every change of the invoice (number or GUID), oldest first. A number names one invoice per
    tenant (deleted numbers are never used again), so without a tenant it must be unambiguous."""
    query = select(InvoiceHistory).where(_reference(InvoiceHistory, reference))
    if tenant_id is not None:
        query = query.where(InvoiceHistory.tenant_id == tenant_id)
    rows = list(session.scalars(query.order_by(InvoiceHistory.id)))
    if len({(r.tenant_id, r.invoice_id) for r in rows}) > 1:
        raise AmbiguousInvoice(f"{reference} exists for several tenants; give --tenant")
    return rows


def tombstone(session: Session, reference: str, tenant_id: str | None = None) -> DeletedInvoice | None:
    query = select(DeletedInvoice).where(_reference(DeletedInvoice, reference))
    if tenant_id is not None:
        query = query.where(DeletedInvoice.tenant_id == tenant_id)
    found = session.scalars(query.limit(2)).all()
    if len(found) > 1:
        raise AmbiguousInvoice(f"{reference} was deleted for several tenants; give --tenant")
    return found[0] if found else None


def to_json(row: InvoiceHistory) -> dict[str, Any]:
    def amount(value: Any) -> str:
        return format_money(value, row.currency)

    return {
        "recordedAt": row.recorded_at.isoformat(), "tenantId": row.tenant_id, "invoiceId": str(row.invoice_id),
        "invoiceNumber": row.invoice_number, "messageId": row.message_id, "causationId": row.causation_id,
        "task": row.task, "events": row.events, "statusBefore": row.status_before, "statusAfter": row.status_after,
        "currency": row.currency, "invoiceTotal": amount(row.invoice_total), "amountPaid": amount(row.amount_paid),
        "balance": amount(row.balance),
    }


def deleted_sentence(gone: DeletedInvoice) -> str:
    return (f"invoice {gone.invoice_number} of tenant {gone.tenant_id} was deleted at "
            f"{gone.deleted_at.isoformat(timespec='seconds')} by message {gone.message_id} ({gone.task})")
