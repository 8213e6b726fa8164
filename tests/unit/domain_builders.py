"""Builders of invoices for domain tests (no I/O)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from models.invoice import Invoice

NOW = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)


def D(value: str | int) -> Decimal:  # noqa: N802
    return Decimal(str(value))


def draft(currency: str = "USD", *, lines: list[tuple[str, str, str]] | None = None, tax: str = "0",
          discount: dict[str, Any] | None = None, **content: Any) -> Invoice:
    """A Draft invoice; lines are (quantity, unitPrice, lineDiscount)."""
    items = [{"quantity": D(q), "unit_price": D(p), "discount_amount": D(d)} for q, p, d in
             (lines or [("1", "100.00" if currency != "JPY" else "100", "0")])]
    invoice = Invoice.create(tenant_id="t", invoice_number="INV-00001", now=NOW, content={
        "currency": currency, "line_items": items, "tax_amount": D(tax), "discount": discount, **content})
    invoice.pending_events.clear()
    return invoice


def issued(**kwargs: Any) -> Invoice:
    invoice = draft(**kwargs)
    invoice.issue(now=NOW)
    invoice.pending_events.clear()
    return invoice


def pay(invoice: Invoice, amount: str, currency: str | None = None) -> uuid.UUID:
    payment_id = uuid.uuid4()
    invoice.record_payment(payment_id=payment_id, amount=D(amount), currency=currency or invoice.currency, now=NOW)
    return payment_id


def types(invoice: Invoice) -> list[str]:
    return [e.type for e in invoice.pending_events]
