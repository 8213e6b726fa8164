"""Read queries of invoices: "List invoices" and "Get an invoice" of invoice-api.md."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.invoice import Invoice


@dataclass(frozen=True)
class InvoicePage:
    invoices: list[Invoice]
    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


def list_invoices(session: Session, *, tenant_id: str | None = None, customer_id: str | None = None,
                  order_id: str | None = None, status: str | None = None, page: int = 1,
                  per_page: int = 25) -> InvoicePage:
    """Filter by customer, order and status; page 1 and 25 per page by default; newest first.
    Soft-deleted invoices are hidden."""
    conditions = [Invoice.is_active.is_(True)]
    if tenant_id is not None:
        conditions.append(Invoice.tenant_id == tenant_id)
    if customer_id is not None:
        conditions.append(Invoice.customer_id == customer_id)
    if order_id is not None:
        conditions.append(Invoice.order_id == order_id)
    if status is not None:
        conditions.append(Invoice.status == status)
    total = session.scalar(select(func.count()).select_from(Invoice).where(*conditions)) or 0
    rows = session.scalars(
        select(Invoice).where(*conditions)
        .order_by(Invoice.created_at.desc(), Invoice.invoice_number.desc())
        .offset((page - 1) * per_page).limit(per_page)
    ).all()
    return InvoicePage(list(rows), page, per_page, total)


class AmbiguousInvoice(Exception):
    pass


def get_invoice(session: Session, reference: str, tenant_id: str | None = None) -> Invoice | None:
    """An invoice by its GUID or its invoice number (unique per tenant: without a tenant, a number
    that two tenants share is ambiguous)."""
    query = select(Invoice)
    try:
        query = query.where(Invoice.id == uuid.UUID(reference))
    except ValueError:
        query = query.where(Invoice.invoice_number == reference)
    if tenant_id is not None:
        query = query.where(Invoice.tenant_id == tenant_id)
    found = session.scalars(query.limit(2)).all()
    if len(found) > 1:
        raise AmbiguousInvoice(f"{reference} exists for several tenants; give --tenant")
    return found[0] if found else None
