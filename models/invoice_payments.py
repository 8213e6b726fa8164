"""Invoice operations on payments: offline payments, hosted payments (start, complete, fail),
refunds and the scheduled retry of failed card payments. A mixin of Invoice."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from models.base import utcnow
from models.errors import DomainError, PaymentNotYetKnown
from models.money import format_money, money
from models.payment import Payment, PaymentStatus, Refund
from models.rules import SETTLING, S

if TYPE_CHECKING:
    from models.invoice import Invoice

PAYABLE = (S.ISSUED, S.PARTIALLY_PAID)
P = PaymentStatus


class InvoicePayments:
    def record_payment(
        self: "Invoice", *, payment_id: uuid.UUID, amount: Decimal, currency: str, status: str = P.COMPLETED,
        payment_method: str | None = None, payment_date: date | None = None, reference_number: str | None = None,
        notes: str | None = None, payment_profile_id: str | None = None, card_brand: str | None = None,
        card_last_four: str | None = None, now: datetime | None = None,
    ) -> Payment:
        """Offline payment: Issued or PartiallyPaid only; amount > 0 and ≤ balance; the currency
        must match. The status follows the balance."""
        now = now or utcnow()
        if status not in (P.COMPLETED, P.PENDING):
            raise DomainError("invalid-payment-status", f"an offline payment is recorded Completed or Pending, not {status}")
        value = self._payable_amount(amount, currency, "record a payment on")
        payment = self._add_payment(
            payment_id=payment_id, amount=value, status=status, payment_method=payment_method,
            payment_date=payment_date or now.date(), reference_number=reference_number, notes=notes,
            payment_profile_id=payment_profile_id, card_brand=card_brand, card_last_four=card_last_four, now=now,
        )
        if status == P.COMPLETED:
            payment.completed_at = now
            self._settle(payment, now)
        else:
            self._touch(now)
            self._record("invoice.updated", changes=["payments"], paymentId=str(payment_id), paymentStatus=str(status),
                         **self._totals())
        return payment

    def start_hosted_payment(
        self: "Invoice", *, payment_id: uuid.UUID, amount: Decimal, currency: str, payment_profile_id: str | None = None,
        provider: str | None = None, now: datetime | None = None,
    ) -> bool:
        """Adds a Pending payment; the balance does not move. Issued or PartiallyPaid only.
        Returns False when the same payment was already started (a duplicate by paymentId)."""
        now = now or utcnow()
        existing = self.payment(payment_id)
        if existing is not None:
            if existing.amount == money(amount, existing.currency) and existing.currency == currency:
                return False
            raise DomainError("duplicate-payment", f"payment {payment_id} already exists on {self.invoice_number} with other content")
        value = self._payable_amount(amount, currency, "start a payment on")
        self._add_payment(payment_id=payment_id, amount=value, status=P.PENDING, payment_profile_id=payment_profile_id,
                          provider=provider, now=now)
        self._touch(now)
        self._record("invoice.updated", changes=["payments"], paymentId=str(payment_id), paymentStatus="Pending",
                     amount=format_money(value, self.currency), **self._totals())
        return True

    def complete_payment(
        self: "Invoice", *, payment_id: uuid.UUID, approved_amount: Decimal | None = None, currency: str | None = None,
        transaction_id: str | None = None, provider: str | None = None, card_brand: str | None = None,
        card_last_four: str | None = None, now: datetime | None = None,
    ) -> bool:
        """Pending → Completed for the amount the provider approved (money that moved is recorded
        even where it differs from what was asked). Returns False for a duplicate: the payment is
        already Completed by the same transaction."""
        now = now or utcnow()
        payment = self._known_payment(payment_id)
        if payment.status == P.COMPLETED:
            if transaction_id is None or payment.transaction_id in (None, transaction_id):
                return False
            raise DomainError("payment-already-final",
                              f"payment {payment_id} already completed by transaction {payment.transaction_id}")
        if payment.status == P.FAILED:
            if transaction_id is not None and transaction_id == payment.transaction_id:
                return False
            raise DomainError("payment-already-final",
                              f"payment {payment_id} already failed ({payment.failure_code}); it cannot complete now")
        self._require(SETTLING, "complete a payment on")
        if currency is not None:
            self._same_currency(currency)
        value = payment.amount if approved_amount is None else self._amount(approved_amount)
        if value != payment.amount:
            payment.requested_amount = payment.amount
            payment.amount = value
        payment.status = P.COMPLETED
        payment.completed_at = now
        payment.transaction_id = transaction_id or payment.transaction_id
        payment.provider = provider or payment.provider
        payment.card_brand = card_brand or payment.card_brand
        payment.card_last_four = card_last_four or payment.card_last_four
        self._settle(payment, now)
        return True

    def fail_payment(
        self: "Invoice", *, payment_id: uuid.UUID, failure_code: str | None, failure_reason: str | None,
        retry_after: tuple[timedelta, ...] = (), hard_decline_codes: frozenset[str] = frozenset(),
        transaction_id: str | None = None, provider: str | None = None, now: datetime | None = None,
    ) -> bool:
        """Pending → Failed; the balance does not move. A failed saved-card payment is scheduled
        for retry unless it was a hard decline or its schedule is spent. False for a duplicate."""
        now = now or utcnow()
        payment = self._known_payment(payment_id)
        if payment.status == P.FAILED:
            return False
        if payment.status == P.COMPLETED:
            raise DomainError("payment-already-final",
                              f"payment {payment_id} already completed by transaction {payment.transaction_id}; it cannot fail now")
        payment.status = P.FAILED
        payment.failed_at = now
        payment.failure_code = failure_code
        payment.failure_reason = failure_reason
        payment.transaction_id = transaction_id or payment.transaction_id
        payment.provider = provider or payment.provider
        self._touch(now)
        self._record("payment.failed", paymentId=str(payment.payment_id), failureCode=failure_code, failureReason=failure_reason,
                     amount=format_money(payment.amount, self.currency), attempt=payment.attempt, **self._totals())
        self._schedule_retry(payment, retry_after, hard_decline_codes)
        return True

    def _schedule_retry(self: "Invoice", payment: Payment, retry_after: tuple[timedelta, ...], hard: frozenset[str]) -> None:
        """Retries are due 1, 3, 5 and 7 days (configurable) after the first failure, at most that
        many times; a hard decline or the last failed retry ends the schedule, once."""
        if payment.payment_profile_id is None or self.status not in PAYABLE or self.balance <= 0:
            return
        if payment.failure_code in hard or payment.attempt >= len(retry_after):
            reason = "hard-decline" if payment.failure_code in hard else "schedule-spent"
            self._record("payment.retries_exhausted", paymentId=str(payment.payment_id), attempts=payment.attempt,
                         reason=reason, failureCode=payment.failure_code, **self._totals())
            return
        first_failure = self._first_attempt(payment).failed_at or payment.failed_at
        payment.next_retry_at = first_failure + retry_after[payment.attempt]

    def _first_attempt(self: "Invoice", payment: Payment) -> Payment:
        by_key = {p.id: p for p in self.payments}
        while payment.retry_of is not None and payment.retry_of in by_key:
            payment = by_key[payment.retry_of]
        return payment

    def request_retry(self: "Invoice", failed: Payment, new_payment_id: uuid.UUID, now: datetime | None = None) -> Payment | None:
        """A due retry adds a new Pending payment naming the attempt it retries, for the current
        balance capped by the original amount, and asks the payment relay to charge it.
        When the invoice no longer needs it, the retry is dropped and None is returned."""
        now = now or utcnow()
        failed.next_retry_at = None
        if self.status not in PAYABLE or self.balance <= 0 or failed.status != P.FAILED:
            return None
        original = self._first_attempt(failed)
        amount = min(self.balance, original.requested_amount or original.amount)
        retry = self._add_payment(payment_id=new_payment_id, amount=amount, status=P.PENDING,
                                  payment_profile_id=failed.payment_profile_id, provider=failed.provider, now=now)
        retry.retry_of = failed.id  # the internal key: a publisher's id never reaches it
        retry.attempt = failed.attempt + 1
        self._touch(now)
        self._record("payment.retry_requested", paymentId=str(retry.payment_id), retryOf=str(failed.payment_id),
                     attempt=retry.attempt,
                     amount=format_money(amount, self.currency), paymentProfileId=failed.payment_profile_id,
                     **self._totals())
        return retry

    def refund(
        self: "Invoice", *, refund_id: uuid.UUID, payment_id: uuid.UUID, amount: Decimal,
        reference_number: str | None = None, reason: str | None = None, now: datetime | None = None,
    ) -> Refund:
        """Completed payments only; several refunds per payment up to its net amount; the balance
        grows; Paid falls back to PartiallyPaid, or to Issued when nothing stays paid."""
        now = now or utcnow()
        payment = self.payment(payment_id)
        if payment is None:
            raise DomainError("payment-not-found", f"{self.invoice_number} has no payment {payment_id}")
        self._require((*SETTLING, S.CANCELLED), "refund a payment of")
        if payment.status != P.COMPLETED:
            raise DomainError("payment-not-completed", f"payment {payment_id} is {payment.status}; only completed payments can be refunded")
        value = self._amount(amount)
        if value > payment.net_amount:
            raise DomainError(
                "amount-exceeds-refundable",
                f"cannot refund {format_money(value, self.currency)} {self.currency} of payment {payment_id}: "
                f"only {format_money(payment.net_amount, self.currency)} of it is left to refund",
            )
        refund = Refund(id=refund_id, payment_id=payment.id, amount=value, reference_number=reference_number,
                        reason=reason, created_at=now)
        payment.refunds.append(refund)
        self._add_paid(-value)
        self._touch(now)
        self._record("payment.refunded", paymentId=str(payment.payment_id), refundId=str(refund_id),
                     amount=format_money(value, self.currency),
                     refundedAmount=format_money(payment.refunded_amount, self.currency), **self._totals())
        self._follow_balance()
        return refund

    # ------------------------------------------------------------------ shared steps

    def _payable_amount(self: "Invoice", amount: Any, currency: str, action: str) -> Decimal:
        self._require(PAYABLE, action)
        self._same_currency(currency)
        value = self._amount(amount)
        if value > self.balance:
            raise DomainError(
                "amount-exceeds-balance",
                f"cannot {action.split(' ')[0]} {format_money(value, currency)} {currency} on {self.invoice_number}: "
                f"its balance is {format_money(self.balance, currency)} {currency}",
            )
        return value

    def _add_payment(self: "Invoice", *, payment_id: uuid.UUID, amount: Decimal, status: str, now: datetime,
                     **fields: Any) -> Payment:
        """A new payment row. Its public id is new on this invoice (derived from the messageId, or
        checked by the caller); its internal key is the worker's own, minted here so that a retry can
        name it before the row is flushed. Joining it through `invoice` does not read the invoice's
        other payments; the unit of work saves it from `new_rows`."""
        payment = Payment(id=uuid.uuid4(), payment_id=payment_id, invoice_id=self.id, amount=amount,
                          currency=self.currency, status=str(status), attempt=0, created_at=now, refunds=[], **fields)
        payment.invoice = self
        self.new_rows.append(payment)
        return payment

    def _known_payment(self: "Invoice", payment_id: uuid.UUID) -> Payment:
        payment = self.payment(payment_id)
        if payment is None:
            raise PaymentNotYetKnown(str(payment_id), self.invoice_number)
        return payment

    def _settle(self: "Invoice", payment: Payment, now: datetime) -> None:
        """A payment completed: its amount counts as paid, and the status follows the balance."""
        requested = payment.requested_amount
        self._add_paid(payment.amount)
        self._touch(now)
        self._record(
            "payment.recorded", paymentId=str(payment.payment_id), amount=format_money(payment.amount, self.currency),
            requestedAmount=format_money(requested, self.currency) if requested is not None else None,
            differsFromRequested=requested is not None, paymentMethod=payment.payment_method,
            transactionId=payment.transaction_id, overpaid=self.balance < 0, **self._totals(),
        )
        self._follow_balance()
        if self.status == S.PAID:
            self.end_retries()
