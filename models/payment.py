"""Payments and refunds of an invoice: rows of the invoice aggregate, changed only through it."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Date, DateTime, ForeignKey, Index, Integer, Numeric, String, Text, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from models.base import Base, utcnow
from models.money import ZERO, format_money

if TYPE_CHECKING:
    from models.invoice import Invoice

MONEY = Numeric(20, 4)


class PaymentStatus(StrEnum):
    PENDING = "Pending"
    COMPLETED = "Completed"
    FAILED = "Failed"


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        # The retry scan finds due retries with one indexed query (CONTRACT.md section 8).
        Index("ix_payments_retry_due", "next_retry_at", postgresql_where=text("next_retry_at IS NOT NULL")),
        Index("ix_payments_invoice_id", "invoice_id"),
        # The public id is the publisher's choice: unique within its invoice only, so one tenant's
        # choice can never collide with (or reveal) another tenant's payment.
        UniqueConstraint("invoice_id", "payment_id", name="uq_payments_invoice_id_payment_id"),
    )

    # The worker's own key, never published: what refunds and retries (`retry_of`) point at.
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # The contract's `paymentId`: chosen by the publisher (start_hosted_payment) or derived by the
    # worker (record_payment, scheduled retries); found through its invoice, never alone.
    payment_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    amount: Mapped[Decimal] = mapped_column(MONEY)
    # What the payer asked for, when the provider approved a different amount.
    requested_amount: Mapped[Decimal | None] = mapped_column(MONEY)
    currency: Mapped[str] = mapped_column(String(3))
    payment_method: Mapped[str | None] = mapped_column(String(50))
    payment_date: Mapped[date | None] = mapped_column(Date)
    reference_number: Mapped[str | None] = mapped_column(String(200))
    notes: Mapped[str | None] = mapped_column(Text)
    payment_profile_id: Mapped[str | None] = mapped_column(String(200))
    card_brand: Mapped[str | None] = mapped_column(String(50))
    card_last_four: Mapped[str | None] = mapped_column(String(4))
    provider: Mapped[str | None] = mapped_column(String(50))
    transaction_id: Mapped[str | None] = mapped_column(String(200))
    failure_code: Mapped[str | None] = mapped_column(String(200))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    # The failed attempt this one retries (its internal id), and which attempt of the schedule it
    # is (0 = the original).
    retry_of: Mapped[uuid.UUID | None] = mapped_column(Uuid, unique=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # When a Failed attempt is due for its next scheduled retry; NULL when none is planned.
    next_retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    invoice: Mapped["Invoice"] = relationship(back_populates="payments")
    refunds: Mapped[list["Refund"]] = relationship(
        back_populates="payment", cascade="all, delete-orphan", lazy="selectin", order_by="Refund.created_at",
    )

    @property
    def refunded_amount(self) -> Decimal:
        return sum((r.amount for r in self.refunds), ZERO)

    @property
    def net_amount(self) -> Decimal:
        """What is still paid by this payment: its amount less its refunds, when it completed."""
        if self.status != PaymentStatus.COMPLETED:
            return ZERO
        return self.amount - self.refunded_amount

    @property
    def is_final(self) -> bool:
        return self.status in (PaymentStatus.COMPLETED, PaymentStatus.FAILED)

    def to_json(self, retried: Payment | None = None) -> dict[str, Any]:
        """The payment as the contract shows it, under its public id; `retried` is the attempt
        this one retries (the invoice finds it by `retry_of`)."""
        c = self.currency
        return {
            "paymentId": str(self.payment_id),
            "status": self.status,
            "amount": format_money(self.amount, c),
            "requestedAmount": format_money(self.requested_amount, c) if self.requested_amount is not None else None,
            "currency": c,
            "paymentMethod": self.payment_method,
            "paymentDate": self.payment_date.isoformat() if self.payment_date else None,
            "referenceNumber": self.reference_number,
            "notes": self.notes,
            "paymentProfileId": self.payment_profile_id,
            "cardBrand": self.card_brand,
            "cardLastFour": self.card_last_four,
            "provider": self.provider,
            "transactionId": self.transaction_id,
            "failureCode": self.failure_code,
            "failureReason": self.failure_reason,
            "retryOf": str(retried.payment_id) if retried is not None else None,
            "attempt": self.attempt,
            "nextRetryAt": self.next_retry_at.isoformat() if self.next_retry_at else None,
            "refundedAmount": format_money(self.refunded_amount, c),
            "netAmount": format_money(self.net_amount, c),
            "createdAt": self.created_at.isoformat() if self.created_at else None,
            "completedAt": self.completed_at.isoformat() if self.completed_at else None,
            "failedAt": self.failed_at.isoformat() if self.failed_at else None,
            "refunds": [r.to_json(c, self.payment_id) for r in self.refunds],
        }


class Refund(Base):
    __tablename__ = "refunds"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # The refunded payment's internal id (Payment.id); its public id is Payment.payment_id.
    payment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments.id", ondelete="CASCADE"), index=True)
    amount: Mapped[Decimal] = mapped_column(MONEY)
    reference_number: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    payment: Mapped[Payment] = relationship(back_populates="refunds")

    def to_json(self, currency: str, public_payment_id: uuid.UUID) -> dict[str, Any]:
        return {
            "refundId": str(self.id),
            "paymentId": str(public_payment_id),
            "amount": format_money(self.amount, currency),
            "referenceNumber": self.reference_number,
            "reason": self.reason,
            "createdAt": self.created_at.isoformat() if self.created_at else None,
        }
