"""The rules of the invoice reference that need no aggregate: states, numbering, terms, discounts."""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from models.errors import DomainError
from models.money import ZERO, money, round_money


class InvoiceStatus(StrEnum):
    DRAFT = "Draft"
    ISSUED = "Issued"
    PARTIALLY_PAID = "PartiallyPaid"
    PAID = "Paid"
    VOIDED = "Voided"
    CANCELLED = "Cancelled"


S = InvoiceStatus
# The states in which the status always follows the balance.
SETTLING = (S.ISSUED, S.PARTIALLY_PAID, S.PAID)
FINAL = (S.VOIDED, S.CANCELLED)
# Fields that may change after Draft (CONTRACT.md section 5, invoices.update).
LATE_EDITABLE = frozenset({"notes", "due_date", "purchase_order_number", "external_id"})
CONTENT_FIELDS = frozenset({
    "order_id", "order_number", "external_id", "customer", "sales_rep", "purchase_order_number",
    "invoice_date", "due_date", "payment_terms", "currency", "notes", "line_items", "tax_amount",
    "discount", "imported_invoice_total", "imported_balance",
})
NET_TERMS = re.compile(r"^net\s*(\d{1,4})$", re.IGNORECASE)


# The tenant's generated invoice numbers: INV-00001, INV-00002, ..., INV-99999, INV-100000 (the
# digits are padded to five, never cut). worker/storage/invoice_numbers.py computes the same in SQL.
INVOICE_NUMBER_PREFIX = "INV-"
INVOICE_NUMBER_DIGITS = 5


def invoice_number_for(sequence: int) -> str:
    """The tenant's generated invoice number of a sequence value: INV-00001, INV-00002, ..."""
    return f"{INVOICE_NUMBER_PREFIX}{sequence:0{INVOICE_NUMBER_DIGITS}d}"


def due_date_from_terms(invoice_date: date, payment_terms: str | None) -> date | None:
    """`NetN` means due N days after the invoice date; other terms give no default."""
    match = NET_TERMS.match((payment_terms or "").strip())
    if not match:
        return None
    try:
        return invoice_date + timedelta(days=int(match.group(1)))
    except OverflowError:
        raise DomainError("invalid-date", f"{payment_terms} after {invoice_date} is past the last date there is") from None



def order_discount(discount: dict[str, Any] | None, subtotal: Decimal, currency: str) -> Decimal:
    """Percentage: subtotal × value / 100; Amount: min(value, subtotal). Rounded half-up."""
    if not discount:
        return ZERO
    value = Decimal(str(discount["value"]))
    if discount["type"] == "Percentage":
        return round_money(subtotal * value / 100, currency)
    return min(round_money(value, currency), subtotal)


def check_discount(discount: dict[str, Any] | None, currency: str) -> dict[str, Any] | None:
    """Percentage between 0 and 100; Amount not negative and within the currency's decimals."""
    if not discount:
        return None
    value = Decimal(str(discount["value"]))
    if discount["type"] == "Percentage":
        if not (0 <= value <= 100):
            raise DomainError("invalid-discount", f"a Percentage discount must be between 0 and 100, got {value}")
    elif discount["type"] == "Amount":
        value = money(value, currency, field="discount value")
        if value < 0:
            raise DomainError("invalid-discount", f"an Amount discount may not be negative, got {value}")
    else:
        raise DomainError("invalid-discount", f"discount type must be Percentage or Amount, got {discount['type']!r}")
    return {**discount, "value": str(value)}
