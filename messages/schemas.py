"""The message bodies of CONTRACT.md sections 3 and 5, as pydantic schemas (camelCase aliases).

A body is validated whole before anything touches the database; what fails here is
dead-lettered with every wrong field named.
"""

from __future__ import annotations

import uuid
from datetime import date
from decimal import Decimal
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from messages.fields import Amount, Code, Currency, Id, PositiveAmount, Quantity, Short, Text
from models.address import InvoiceAddress
from models.money import minor_unit, too_precise


class Schema(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


MAX_EXTRA_FIELDS = 20
# A batch is applied in one transaction and held in memory until it commits: about 5 KB per line
# item while it works (10,000 invoices × 10 lines took one pool process to 600 MB PSS), so at most
# 30,000 lines per batch (10,000 invoices of 3 lines; an invoice alone may carry 1,000). The
# import command sends 1,000 invoices per batch.
MAX_IMPORT_LINES = 30_000
MAX_EXTRA_BYTES = 4096


class Info(Schema):
    """Descriptive objects (customer, sales rep, addresses) keep fields beyond the listed ones:
    at most MAX_EXTRA_FIELDS of them, plain values (text, numbers, booleans, null) of at most
    MAX_EXTRA_BYTES in all, so that no body hides a deep or huge structure in them."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow", frozen=True)

    @model_validator(mode="after")
    def _bounded_extras(self) -> "Info":
        extra = self.model_extra or {}
        if len(extra) > MAX_EXTRA_FIELDS:
            raise ValueError(f"at most {MAX_EXTRA_FIELDS} fields beyond the listed ones, got {len(extra)}")
        size = 0
        for name, value in extra.items():
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ValueError(f"{name[:50]!r}: extra fields hold plain values, not {type(value).__name__}")
            size += len(name) + len(str(value))
            text = f"{name}{value}"
            if "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                raise ValueError(f"{name[:50]!r}: not storable text (NUL or a lone surrogate)")
        if size > MAX_EXTRA_BYTES:
            raise ValueError(f"extra fields carry {size} characters; at most {MAX_EXTRA_BYTES}")
        return self


class Address(Info):
    line1: Short | None = None
    line2: Short | None = None
    city: Short | None = None
    state: Short | None = None
    postal_code: Short | None = None
    country: Short | None = None


class Customer(Info):
    customer_id: Short | None = None
    customer_number: Short | None = None
    company_name: Short | None = None
    company_email: Short | None = None
    company_phone: Short | None = None
    billing_address: Address | None = None
    shipping_address: Address | None = None


class SalesRep(Info):
    rep_number: Short | None = None
    first_name: Short | None = None
    last_name: Short | None = None
    full_name: Short | None = None
    email: Short | None = None
    phone_number: Short | None = None


class LineItemIn(Schema):
    sku: Short | None = None
    description: Text | None = None
    quantity: Quantity
    unit_price: Amount
    discount_amount: Amount | None = None

    def content(self) -> dict[str, Any]:
        """model_dump() of the line, written out: a quarter of its cost, and bulk import makes
        one per line (test_messages holds the two equal)."""
        return {"sku": self.sku, "description": self.description, "quantity": self.quantity,
                "unit_price": self.unit_price, "discount_amount": self.discount_amount}


class Discount(Schema):
    code: Short | None = None
    type: Literal["Percentage", "Amount"]
    value: Amount
    description: Text | None = None

    @model_validator(mode="after")
    def _percentage_range(self) -> "Discount":
        if self.type == "Percentage" and self.value > 100:
            raise ValueError("a Percentage discount may not exceed 100")
        return self


class Message(Schema):
    """Every body: messageId (the idempotency key), tenantId, occurredAt."""

    message_id: Id
    tenant_id: Id
    occurred_at: AwareDatetime | None = None


def check_decimals(currency: str | None, amounts: dict[str, Decimal | None]) -> None:
    """An amount may not carry more decimals than its currency's minor unit."""
    if currency is None:
        return
    for name, value in amounts.items():
        if value is not None and too_precise(value, currency):
            raise ValueError(f"{name} {value} has more decimals than {currency} allows ({minor_unit(currency)})")


class InvoiceFields(Schema):
    """The fields of the create body of invoice-api.md."""

    order_id: Id | None = None
    order_number: Short | None = None
    invoice_number: Id | None = None
    external_id: Short | None = None
    customer: Customer | None = None
    sales_rep: SalesRep | None = None
    purchase_order_number: Short | None = None
    invoice_date: date | None = None
    due_date: date | None = None
    payment_terms: Code | None = None
    currency: Currency | None = None
    notes: Text | None = None
    line_items: list[LineItemIn] | None = Field(default=None, max_length=1000)
    tax_amount: Amount | None = None
    discount: Discount | None = None
    imported_invoice_total: Amount | None = None
    imported_balance: Amount | None = None

    @model_validator(mode="after")
    def _money_fits_currency(self) -> "InvoiceFields":
        amounts: dict[str, Decimal | None] = {
            "taxAmount": self.tax_amount, "importedInvoiceTotal": self.imported_invoice_total,
            "importedBalance": self.imported_balance,
        }
        if self.discount is not None and self.discount.type == "Amount":
            amounts["discount.value"] = self.discount.value
        check_decimals(self.currency, amounts)
        if self.currency is not None:
            for i, line in enumerate(self.line_items or ()):  # named only when one fails
                if too_precise(line.unit_price, self.currency) or (
                        line.discount_amount is not None and too_precise(line.discount_amount, self.currency)):
                    check_decimals(self.currency, {f"lineItems.{i}.unitPrice": line.unit_price,
                                                   f"lineItems.{i}.discountAmount": line.discount_amount})
        return self

    def content(self) -> dict[str, Any]:
        """The given create fields, snake_case, as the domain takes them."""
        given = self.model_fields_set - {"message_id", "tenant_id", "occurred_at", "invoice_number", "invoice_id"}
        result: dict[str, Any] = {}
        for name in given & set(type(self).content_fields()):
            value = getattr(self, name)
            if name in ("customer", "sales_rep") and value is not None:
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            elif name == "line_items" and value is not None:
                value = [line.content() for line in value]
            elif name == "discount" and value is not None:
                value = value.model_dump()
            result[name] = value
        return result

    @staticmethod
    def content_fields() -> tuple[str, ...]:
        return ("order_id", "order_number", "external_id", "customer", "sales_rep", "purchase_order_number",
                "invoice_date", "due_date", "payment_terms", "currency", "notes", "line_items", "tax_amount",
                "discount", "imported_invoice_total", "imported_balance")


class InvoiceContent(InvoiceFields, Message):
    """The create body: its fields, and those of every message."""


class CreateInvoice(InvoiceContent):
    currency: Currency


class OrderShipped(InvoiceContent):
    order_id: Id
    currency: Currency
    shipment_id: Id | None = None
    auto_issue: bool = False


class Addressed(Message):
    """A command that names its invoice by invoiceNumber or invoiceId (or both, agreeing)."""

    invoice_number: Id | None = None
    invoice_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _has_address(self) -> "Addressed":
        if self.invoice_number is None and self.invoice_id is None:
            raise ValueError("name the invoice by invoiceNumber or invoiceId")
        return self

    @property
    def address(self) -> InvoiceAddress:
        return InvoiceAddress(invoice_number=self.invoice_number, invoice_id=self.invoice_id)


class UpdateInvoice(InvoiceContent, Addressed):
    pass


class InvoiceCommand(Addressed):
    """issue, remove_discount, void, cancel, delete: the address is the whole body."""


class ApplyDiscount(Addressed):
    discount: Discount


class RecordPayment(Addressed):
    amount: PositiveAmount
    currency: Currency
    payment_method: Code | None = None
    payment_date: date | None = None
    reference_number: Short | None = None
    notes: Text | None = None
    payment_profile_id: Short | None = None
    card_brand: Code | None = None
    card_last_four: str | None = Field(default=None, pattern=r"^\d{4}$")
    status: Literal["Completed", "Pending"] = "Completed"

    @model_validator(mode="after")
    def _decimals(self) -> "RecordPayment":
        check_decimals(self.currency, {"amount": self.amount})
        return self


class StartHostedPayment(Addressed):
    payment_id: uuid.UUID
    amount: PositiveAmount
    currency: Currency
    payment_profile_id: Short | None = None

    @model_validator(mode="after")
    def _decimals(self) -> "StartHostedPayment":
        check_decimals(self.currency, {"amount": self.amount})
        return self


class CompleteHostedPayment(Addressed):
    payment_id: uuid.UUID


class FailPayment(Addressed):
    payment_id: uuid.UUID
    failure_code: Short | None = None
    failure_reason: Text | None = None


class RefundPayment(Addressed):
    payment_id: uuid.UUID
    amount: PositiveAmount
    reference_number: Short | None = None
    reason: Text | None = None


class PaymentCallback(Message):
    """A WorldPay result relayed to the worker (CONTRACT.md section 7)."""

    provider: Literal["WorldPay"]
    invoice_number: Id
    payment_id: uuid.UUID
    transaction_id: Id
    result: Literal["Approved", "PartiallyApproved", "Declined", "Error", "Cancelled"]
    amount: Amount | None = None
    currency: Currency | None = None
    response_code: Short | None = None
    response_message: Text | None = None
    card_brand: Code | None = None
    card_last_four: str | None = Field(default=None, pattern=r"^\d{4}$")
    signature: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _approved_amount(self) -> "PaymentCallback":
        if self.result in ("Approved", "PartiallyApproved"):
            if self.amount is None or self.amount <= 0:
                raise ValueError(f"an {self.result} callback carries the approved amount, greater than zero")
        check_decimals(self.currency, {"amount": self.amount})
        return self

    @property
    def address(self) -> InvoiceAddress:
        return InvoiceAddress(invoice_number=self.invoice_number)


class ImportEntry(InvoiceFields):
    """One invoice of a bulk import: the create body with invoiceNumber and currency required,
    plus isActive (false soft-deletes the matching invoice, true brings it back)."""

    invoice_number: Id
    currency: Currency
    is_active: bool = True


class BulkImport(Message):
    """invoices.bulk_import: 1–10,000 entries, each validated on its own (a bad entry is
    rejected alone), so the entries are plain objects here."""

    batch_id: Id
    invoices: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _bounded_lines(self) -> "BulkImport":
        lines = sum(len(e["lineItems"]) for e in self.invoices if isinstance(e.get("lineItems"), list))
        if lines > MAX_IMPORT_LINES:
            raise PydanticCustomError("too_large", "the batch carries {lines} line items; at most {limit} per batch",
                                      {"lines": lines, "limit": MAX_IMPORT_LINES})
        return self


class RetryFailedPayments(BaseModel):
    """The scheduler's tick: no fields are needed; any given are ignored."""

    model_config = ConfigDict(extra="ignore")
