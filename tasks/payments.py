"""The tasks of the invoices.payments queue: offline payments, hosted payments, the WorldPay
callback and refunds."""

from __future__ import annotations

from datetime import timedelta

from messages.schemas import (
    CompleteHostedPayment,
    FailPayment,
    PaymentCallback,
    RecordPayment,
    RefundPayment,
    StartHostedPayment,
)
from tasks.commands import applied
from worker.celery_app import app
from worker.config import settings
from worker.delivery.batching import batchable
from worker.delivery.handling import dead_letter
from worker.delivery.signing import verify
from worker.delivery.task_base import InvoiceTask
from worker.storage.unit_of_work import Outcome, UnitOfWork, derived_id, offline_payment_id

APPROVED = ("Approved", "PartiallyApproved")


def retry_policy() -> dict:
    """The retry schedule of failed saved-card payments (PAYMENT_RETRY_DAYS, PAYMENT_HARD_DECLINE_CODES)."""
    config = settings()
    return {
        # Days may be fractions (Decimal); whole microseconds keep them exact.
        "retry_after": tuple(timedelta(microseconds=int(d * 86_400_000_000)) for d in config.payment_retry_days),
        "hard_decline_codes": frozenset(config.payment_hard_decline_codes),
    }


def duplicate(message: object, invoice: object, reason: str) -> Outcome:
    return Outcome("duplicate", message.message_id, reason=reason, invoice_id=invoice.id,  # type: ignore[attr-defined]
                   invoice_number=invoice.invoice_number)  # type: ignore[attr-defined]


@app.task(name="invoices.record_payment", base=InvoiceTask, bind=True)
def record_payment(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(RecordPayment, body, record_offline_payment, args, kwargs)


def record_offline_payment(uow: UnitOfWork, message: RecordPayment) -> Outcome:
    invoice = uow.invoice(message.address)
    payment_id = offline_payment_id(message.tenant_id, message.message_id)
    if uow.has_payment(invoice, payment_id):  # a copy whose inbox row was pruned: the derived id catches it
        return duplicate(message, invoice, "payment-already-recorded")
    fields = message.model_dump(include={
        "amount", "currency", "payment_method", "payment_date", "reference_number", "notes", "payment_profile_id",
        "card_brand", "card_last_four", "status",
    })
    payment = invoice.record_payment(payment_id=payment_id, **fields)
    return applied(message, invoice, paymentId=str(payment.payment_id))


@app.task(name="invoices.start_hosted_payment", base=InvoiceTask, bind=True)
def start_hosted_payment(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(StartHostedPayment, body, start_payment, args, kwargs)


def start_payment(uow: UnitOfWork, message: StartHostedPayment) -> Outcome:
    invoice = uow.invoice(message.address)
    started = invoice.start_hosted_payment(payment_id=message.payment_id, amount=message.amount,
                                           currency=message.currency, payment_profile_id=message.payment_profile_id)
    return applied(message, invoice) if started else duplicate(message, invoice, "payment-already-started")


@app.task(name="invoices.complete_hosted_payment", base=InvoiceTask, bind=True)
def complete_hosted_payment(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(CompleteHostedPayment, body, complete_payment, args, kwargs)


def complete_payment(uow: UnitOfWork, message: CompleteHostedPayment) -> Outcome:
    invoice = uow.invoice(message.address)
    done = invoice.complete_payment(payment_id=message.payment_id)
    return applied(message, invoice) if done else duplicate(message, invoice, "payment-already-completed")


@app.task(name="invoices.fail_payment", base=InvoiceTask, bind=True)
def fail_payment(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(FailPayment, body, fail_hosted_payment, args, kwargs)


def fail_hosted_payment(uow: UnitOfWork, message: FailPayment) -> Outcome:
    invoice = uow.invoice(message.address)
    failed = invoice.fail_payment(payment_id=message.payment_id, failure_code=message.failure_code,
                                  failure_reason=message.failure_reason, **retry_policy())
    return applied(message, invoice) if failed else duplicate(message, invoice, "payment-already-failed")


@app.task(name="invoices.refund_payment", base=InvoiceTask, bind=True)
def refund_payment(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(RefundPayment, body, refund, args, kwargs)


def refund(uow: UnitOfWork, message: RefundPayment) -> Outcome:
    invoice = uow.invoice(message.address)
    refund_id = derived_id("refund", message.tenant_id, message.message_id)
    paid = invoice.payment(message.payment_id)
    if paid is not None and any(r.id == refund_id for r in paid.refunds):  # a copy whose inbox row was pruned
        return duplicate(message, invoice, "refund-already-made")
    invoice.refund(refund_id=refund_id, payment_id=message.payment_id,
                   amount=message.amount, reference_number=message.reference_number, reason=message.reason)
    return applied(message, invoice)


@app.task(name="invoices.payment_callback", base=InvoiceTask, bind=True)
def payment_callback(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    problem = _signature_problem(body)
    if problem:
        return self.retrying(lambda: dead_letter(self.delivery(body), *problem).to_dict())
    return self.handle(PaymentCallback, body, apply_callback, args, kwargs)


def apply_callback(uow: UnitOfWork, message: PaymentCallback) -> Outcome:
    """Approved and PartiallyApproved complete the payment with the approved amount; Declined,
    Error and Cancelled fail it. The same callback again is a duplicate."""
    invoice = uow.invoice(message.address)
    if message.result in APPROVED:
        changed = invoice.complete_payment(
            payment_id=message.payment_id, approved_amount=message.amount, currency=message.currency,
            transaction_id=message.transaction_id, provider=message.provider, card_brand=message.card_brand,
            card_last_four=message.card_last_four,
        )
    else:
        changed = invoice.fail_payment(
            payment_id=message.payment_id, failure_code=message.response_code,
            failure_reason=message.response_message or message.result, transaction_id=message.transaction_id,
            provider=message.provider, **retry_policy(),
        )
    return applied(message, invoice) if changed else duplicate(message, invoice, "callback-already-applied")


def _signature_problem(body: object) -> tuple[str, str] | None:
    secret = settings().callback_signing_secret
    if secret and isinstance(body, dict):
        problem = verify(body, secret)
        if problem:
            return "bad-signature", problem
    return None


batchable("invoices.record_payment", RecordPayment, record_offline_payment)
batchable("invoices.start_hosted_payment", StartHostedPayment, start_payment)
batchable("invoices.complete_hosted_payment", CompleteHostedPayment, complete_payment)
batchable("invoices.fail_payment", FailPayment, fail_hosted_payment)
batchable("invoices.refund_payment", RefundPayment, refund)
batchable("invoices.payment_callback", PaymentCallback, apply_callback, check=_signature_problem)
