"""Line items of an invoice: quantity × unitPrice − the line's discount."""

from __future__ import annotations

import uuid
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import ForeignKey, Integer, Numeric, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base
from models.errors import DomainError
from models.money import ZERO, money, quantum, round_money
from models.payment import MONEY


class LineRules:
    """What a line says, on its attributes alone: shared by LineItem (the mapped row) and LineValues."""

    __slots__ = ()

    def to_input(self) -> dict[str, Any]:
        """The line as the create body gives it (snake_case), to rebuild or compare it."""
        return {
            "sku": self.sku, "description": self.description, "quantity": self.quantity,
            "unit_price": self.unit_price, "discount_amount": self.discount_amount,
        }

    def to_json(self, currency: str, q: Decimal | None = None) -> dict[str, Any]:
        """`q`: the currency's quantum, when the caller has it (models/money.py quantum)."""
        q = q or quantum(currency)
        return {
            "lineNumber": self.position,
            "sku": self.sku,
            "description": self.description,
            "quantity": str(self.quantity.normalize()) if self.quantity == self.quantity.to_integral() else str(self.quantity),
            "unitPrice": str(self.unit_price.quantize(q, ROUND_HALF_UP)),  # format_money (see quantum)
            "discountAmount": str(self.discount_amount.quantize(q, ROUND_HALF_UP)),
            "lineTotal": str(self.line_total.quantize(q, ROUND_HALF_UP)),
        }


class LineItem(LineRules, Base):
    __tablename__ = "line_items"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    sku: Mapped[str | None] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    quantity: Mapped[Decimal] = mapped_column(Numeric(20, 6))
    unit_price: Mapped[Decimal] = mapped_column(MONEY)
    discount_amount: Mapped[Decimal] = mapped_column(MONEY, default=ZERO)
    line_total: Mapped[Decimal] = mapped_column(MONEY)


class LineValues(LineRules):
    """A line as a plain object, the line of an InvoiceValues (models/invoice.py)."""

    __slots__ = ("position", "sku", "description", "quantity", "unit_price", "discount_amount", "line_total")
    id = invoice_id = None

    def __init__(self, *, position: int, sku: str | None, description: str | None, quantity: Decimal,
                 unit_price: Decimal, discount_amount: Decimal, line_total: Decimal) -> None:
        self.position, self.sku, self.description, self.quantity = position, sku, description, quantity
        self.unit_price, self.discount_amount, self.line_total = unit_price, discount_amount, line_total


def build_line(position: int, item: dict[str, Any], currency: str, make: type[LineRules] = LineItem) -> LineRules:
    """A line (a `make`: LineItem or LineValues): quantity × unitPrice − its discount, which may not
    exceed quantity × unitPrice."""
    given = item["quantity"]
    quantity = given if isinstance(given, Decimal) else Decimal(str(given))
    if not quantity.is_finite() or quantity <= 0:
        raise DomainError("invalid-line-item", f"line {position}: quantity must be greater than zero")
    try:  # the field named only when it is wrong: three f-strings a line were ~5% of a line's cost
        unit_price = money(item["unit_price"], currency, field="unitPrice")
        line_discount = money(item.get("discount_amount") or ZERO, currency, field="discountAmount")
        gross = round_money(quantity * unit_price, currency, field="quantity × unitPrice")
    except DomainError as exc:
        raise DomainError(exc.code, f"line {position} {exc.message}") from None
    if unit_price < 0:
        raise DomainError("invalid-line-item", f"line {position}: unitPrice may not be negative")
    if line_discount < 0 or line_discount > gross:
        raise DomainError(
            "invalid-line-item",
            f"line {position}: discountAmount {line_discount} must be between 0 and the line's "
            f"quantity × unitPrice ({gross})",
        )
    return make(
        position=position, sku=item.get("sku"), description=item.get("description"),
        quantity=quantity, unit_price=unit_price, discount_amount=line_discount, line_total=gross - line_discount,
    )
