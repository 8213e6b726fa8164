"""Invoice operations of the lifecycle: create, update, issue, discounts, void, cancel, delete,
soft delete and restore. A mixin of Invoice; see models/invoice.py."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from models.base import utcnow
from models.errors import DomainError
from models.line_item import build_line
from models.money import ZERO, format_money, minor_unit, money
from models.rules import (
    CONTENT_FIELDS, FINAL, LATE_EDITABLE, S, check_discount, due_date_from_terms, order_discount,
)

if TYPE_CHECKING:
    from models.invoice import Invoice

CAMEL = {
    "order_id": "orderId", "order_number": "orderNumber", "external_id": "externalId", "customer": "customer",
    "sales_rep": "salesRep", "purchase_order_number": "purchaseOrderNumber", "invoice_date": "invoiceDate",
    "due_date": "dueDate", "payment_terms": "paymentTerms", "currency": "currency", "notes": "notes",
    "line_items": "lineItems", "tax_amount": "taxAmount", "discount": "discount",
    "imported_invoice_total": "importedInvoiceTotal", "imported_balance": "importedBalance",
}


class InvoiceLifecycle:
    @classmethod
    def create(
        cls, *, tenant_id: str, invoice_number: str, content: dict[str, Any], invoice_id: uuid.UUID | None = None,
        source: str = "create", shipment_id: str | None = None, now: datetime | None = None,
        announce: bool = True,
    ) -> "Invoice":
        """A new invoice starts in Draft; an imported one that is partly or wholly paid starts
        PartiallyPaid or Paid. `dueDate` defaults from `paymentTerms` (NetN). `announce=False` records
        no invoice.created event (a bulk import announces what it really created)."""
        now = now or utcnow()
        if not content.get("currency"):
            raise DomainError("invalid-invoice", "currency is required")
        invoice = cls(  # type: ignore[call-arg]
            id=invoice_id or uuid.uuid4(), tenant_id=tenant_id, invoice_number=invoice_number, source=source,
            shipment_id=shipment_id or "", status=S.DRAFT, currency=content["currency"], invoice_date=now.date(),
            customer={}, tax_amount=ZERO, is_active=True, event_sequence=0, version=1, created_at=now, updated_at=now,
            line_items=[], payments=[],
        )
        invoice._apply_content({"invoice_date": now.date(), **content}, creating=True)
        if invoice.imported_amount_paid > 0:  # starts where its balance says, with no status_changed event
            invoice.status = invoice._settled_status()
        if announce:
            invoice._record("invoice.created", invoice=invoice.to_json())
        return invoice

    def _apply_content(self: "Invoice", content: dict[str, Any], *, creating: bool = False) -> list[str]:
        """Set create fields, validate them together, recompute; return the camelCase names that changed."""
        unknown = set(content) - CONTENT_FIELDS
        if unknown:
            raise DomainError("invalid-invoice", f"unknown invoice fields: {', '.join(sorted(unknown))}")
        before = {} if creating else {name: self._content_value(name) for name in content}
        currency = content.get("currency", self.currency)
        minor_unit(currency)
        simple = ("order_id", "order_number", "external_id", "sales_rep", "purchase_order_number", "invoice_date",
                  "due_date", "payment_terms", "notes")
        for name in simple:
            if name in content:
                setattr(self, name, content[name])
        self.currency = currency
        if "customer" in content:
            self.customer = content["customer"] or {}
            self.customer_id = (self.customer or {}).get("customerId")
        if "line_items" in content or "currency" in content:
            items = content.get("line_items")
            if items is None:
                items = [line.to_input() for line in self.line_items]
            self.line_items = [build_line(i, item, currency, self.line_type) for i, item in enumerate(items, start=1)]
        if "tax_amount" in content or "currency" in content:
            tax = money(content.get("tax_amount", self.tax_amount) or ZERO, currency, field="taxAmount")
            if tax < 0:
                raise DomainError("invalid-amount", f"taxAmount may not be negative, got {tax}")
            self.tax_amount = tax
        if "discount" in content or "currency" in content:
            self.discount = check_discount(content.get("discount", self.discount), currency)
        if "imported_invoice_total" in content or "imported_balance" in content:
            self._set_imported(content.get("imported_invoice_total", self.imported_invoice_total),
                               content.get("imported_balance", self.imported_balance))
        if creating and self.due_date is None:
            self.due_date = due_date_from_terms(self.invoice_date, self.payment_terms)
        if self.due_date is not None and self.due_date < self.invoice_date:
            raise DomainError("invalid-invoice", f"dueDate {self.due_date} is before invoiceDate {self.invoice_date}")
        self._recompute(lines=True)
        if creating:
            return [CAMEL[name] for name in content]
        return [CAMEL[name] for name in content if self._content_value(name) != before[name]]

    def _content_state(self: "Invoice") -> dict[str, Any]:
        names = CONTENT_FIELDS - {"line_items"} | {"customer_id", "subtotal", "discount_amount", "invoice_total",
                                                   "amount_paid", "balance"}
        return {**{name: getattr(self, name) for name in names}, "line_items": list(self.line_items)}

    def _restore_content_state(self: "Invoice", saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            if getattr(self, name) is not value:
                setattr(self, name, value)

    def _set_imported(self: "Invoice", total: Any, balance: Any) -> None:
        """importedBalance comes with importedInvoiceTotal; amount paid = total − balance, never negative."""
        if total is None:
            if balance is not None:
                raise DomainError("invalid-invoice", "importedBalance needs importedInvoiceTotal beside it")
            self.imported_invoice_total = self.imported_balance = None
            return
        total = money(total, self.currency, field="importedInvoiceTotal")
        balance = total if balance is None else money(balance, self.currency, field="importedBalance")
        if total < 0 or balance < 0 or balance > total:
            raise DomainError(
                "invalid-invoice",
                f"importedBalance ({balance}) must be between 0 and importedInvoiceTotal ({total}), which may not be negative",
            )
        self.imported_invoice_total, self.imported_balance = total, balance

    def _content_value(self: "Invoice", name: str) -> Any:
        if name == "line_items":
            return [line.to_input() for line in self.line_items]
        return getattr(self, name)

    def has_content(self: "Invoice", content: dict[str, Any]) -> bool:
        """Whether a create body would make this very invoice (its given fields all equal)."""
        probe = type(self).create(tenant_id=self.tenant_id, invoice_number=self.invoice_number,
                                  content=content, now=self.created_at)
        return all(probe._content_value(name) == self._content_value(name) for name in content)

    def update(self: "Invoice", changes: dict[str, Any], now: datetime | None = None) -> list[str]:
        """Draft: every field may change. Issued or later: only notes, dueDate, purchaseOrderNumber
        and externalId; other fields are rejected invoice-not-editable. Returns what changed."""
        self._require_not_deleted()
        if self.status != S.DRAFT:
            locked = sorted(CAMEL.get(n, n) for n in set(changes) - LATE_EDITABLE)
            if locked:
                raise DomainError(
                    "invoice-not-editable",
                    f"cannot change {', '.join(locked)} of {self.invoice_number}: it is {self.status}; "
                    "after Draft only notes, dueDate, purchaseOrderNumber and externalId can change",
                )
        saved = self._content_state()
        try:
            changed = self._apply_content(changes)
            # Only a total this update lowers may not fall below what is paid: an overpaid invoice
            # (money that moved is recorded) still takes a change of its notes or due date.
            if self.invoice_total < self.amount_paid and self.invoice_total < saved["invoice_total"]:
                raise DomainError(
                    "total-below-amount-paid",
                    f"the new total of {self.invoice_number} ({format_money(self.invoice_total, self.currency)}) "
                    f"would fall below what is paid ({format_money(self.amount_paid, self.currency)})",
                )
        except DomainError:
            self._restore_content_state(saved)  # a rejected update changes nothing
            raise
        if changed:
            self._touch(now)
            self._record("invoice.updated", changes=changed, **self._totals())
        return changed

    def issue(self: "Invoice", now: datetime | None = None) -> None:
        """Draft → Issued. An already issued, paid, voided or cancelled invoice cannot be issued."""
        self._require((S.DRAFT,), "issue")
        self._move_to(S.ISSUED)
        self._follow_balance()
        self._touch(now)

    def apply_discount(self: "Invoice", discount: dict[str, Any], now: datetime | None = None) -> None:
        """Draft, Issued or PartiallyPaid. Replaces any discount; the new total may not fall below
        the amount paid. The status follows the balance."""
        self._require((S.DRAFT, S.ISSUED, S.PARTIALLY_PAID), "apply a discount to")
        checked = check_discount(discount, self.currency)
        self._check_total_covers_paid(order_discount(checked, self.subtotal, self.currency))
        self.discount = checked
        self._discount_changed(now)

    def remove_discount(self: "Invoice", now: datetime | None = None) -> None:
        """Draft, Issued or PartiallyPaid. Removes the order-level discount; line discounts stay."""
        self._require((S.DRAFT, S.ISSUED, S.PARTIALLY_PAID), "remove the discount of")
        if self.discount is None:
            return
        self.discount = None
        self._discount_changed(now)

    def _check_total_covers_paid(self: "Invoice", discount_amount: Decimal) -> None:
        if self.imported_invoice_total is not None:
            return  # the imported total is authoritative; a discount does not move it
        new_total = self.subtotal - discount_amount + self.tax_amount
        if new_total < self.amount_paid:
            raise DomainError(
                "total-below-amount-paid",
                f"cannot discount {self.invoice_number} to {format_money(new_total, self.currency)} {self.currency}: "
                f"{format_money(self.amount_paid, self.currency)} is already paid",
            )

    def _discount_changed(self: "Invoice", now: datetime | None) -> None:
        self._recompute()
        self._touch(now)
        self._record("invoice.updated", changes=["discount"], discountAmount=format_money(self.discount_amount, self.currency),
                     **self._totals())
        self._follow_balance()

    def void(self: "Invoice", now: datetime | None = None) -> None:
        """Draft or Issued only, and only with no completed payment left unrefunded. Final."""
        self._require((S.DRAFT, S.ISSUED), "void")
        paid = [p for p in self.payments if p.net_amount > 0]
        if paid:
            total = format_money(sum((p.net_amount for p in paid), ZERO), self.currency)
            raise DomainError(
                "invoice-has-payments",
                f"cannot void {self.invoice_number}: it has {len(paid)} completed payment"
                f"{'s' if len(paid) > 1 else ''} ({total} {self.currency}); refund {'them' if len(paid) > 1 else 'it'} first",
            )
        self._end(S.VOIDED, now)

    def cancel(self: "Invoice", now: datetime | None = None) -> None:
        """Draft, Issued or PartiallyPaid. The record stays whole for audit; Cancelled is final."""
        self._require((S.DRAFT, S.ISSUED, S.PARTIALLY_PAID), "cancel")
        self._end(S.CANCELLED, now)

    def _end(self: "Invoice", final: S, now: datetime | None) -> None:
        assert final in FINAL
        self.end_retries()
        self._move_to(final)
        self._touch(now)

    def end_retries(self: "Invoice") -> None:
        """Paying, voiding or cancelling the invoice ends its scheduled payment retries."""
        for payment in self.payments:
            payment.next_retry_at = None

    def delete(self: "Invoice") -> None:
        """Draft with no payment history only; the invoice is removed for good."""
        self._require((S.DRAFT,), "delete")
        if self.payments:
            raise DomainError(
                "invoice-has-payments",
                f"cannot delete {self.invoice_number}: it has payment history; void or cancel it instead",
            )
        self.__dict__["_deleted"] = True
        self._record("invoice.deleted", status=str(self.status))

    @property
    def is_deleted(self) -> bool:
        return bool(self.__dict__.get("_deleted"))

    def deactivate(self: "Invoice", now: datetime | None = None) -> bool:
        """Soft delete: hidden from lists, kept whole. Returns whether anything changed."""
        return self._set_active(False, now)

    def restore(self: "Invoice", now: datetime | None = None) -> bool:
        """Bring a soft-deleted invoice back into lists."""
        return self._set_active(True, now)

    def _set_active(self: "Invoice", active: bool, now: datetime | None) -> bool:
        self._require_not_deleted()
        if self.is_active == active:
            return False
        self.is_active = active
        self._touch(now)
        self._record("invoice.updated", changes=["isActive"], isActive=active, **self._totals())
        return True
