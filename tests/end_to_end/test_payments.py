"""Hosted payments, signed WorldPay callbacks and the scheduled retry of failed payments
through a real worker (CONTRACT.md sections 5, 7 and 8)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from models.payment import Payment
from tests.conftest import ROOT, dead_letters_of, invoice_json, send, wait_for, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice
from worker import db, scheduler
from worker.records import OutboxEvent
from worker.signing import sign

SECRET = "test-secret"
TENANT = "t-pay"


def start(number: str, amount: str = "142.60", profile: str | None = "card-1", tenant: str = TENANT) -> str:
    payment_id = str(uuid.uuid4())
    body = {"messageId": f"start-{payment_id}", "tenantId": tenant, "invoiceNumber": number, "paymentId": payment_id,
            "amount": amount, "currency": "USD", "paymentProfileId": profile}
    send("invoices.start_hosted_payment", body)
    assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    return payment_id


def callback(number: str, payment_id: str, result: str, amount: str | None = "142.60", *, tenant: str = TENANT,
             transaction: str | None = None, code: str = "0", signed: bool = True, **extra) -> dict:
    body = {"messageId": f"cb-{uuid.uuid4()}", "tenantId": tenant, "provider": "WorldPay", "invoiceNumber": number,
            "paymentId": payment_id, "transactionId": transaction or f"T-{uuid.uuid4().hex[:8]}", "result": result,
            "currency": "USD", "responseCode": code, "responseMessage": result, **extra}
    if amount is not None:
        body["amount"] = amount
    if signed:
        body["signature"] = sign(body, SECRET)
    return body


def deliver(body: dict, tenant: str = TENANT) -> dict:
    send("invoices.payment_callback", body)
    return wait_outcome(tenant, body["messageId"])


def payment_of(number: str, payment_id: str, tenant: str = TENANT) -> dict:
    return next(p for p in invoice_json(tenant, number)["payments"] if p["paymentId"] == payment_id)


def outbox_types(invoice_id: str) -> list[str]:
    with db.sessions()() as s:
        return list(s.scalars(select(OutboxEvent.type).where(OutboxEvent.invoice_id == uuid.UUID(invoice_id))
                              .order_by(OutboxEvent.sequence)))


def test_approved_callback_completes_the_payment_and_settles_the_invoice(running):
    invoice = issued_invoice(TENANT)
    payment_id = start(invoice["invoiceNumber"])
    assert invoice_json(TENANT, invoice["invoiceNumber"])["balance"] == "142.60"  # pending moves nothing
    outcome = deliver(callback(invoice["invoiceNumber"], payment_id, "Approved", cardBrand="Visa", cardLastFour="4242"))
    assert outcome["outcome"] == "applied"
    after = invoice_json(TENANT, invoice["invoiceNumber"])
    assert (after["status"], after["balance"]) == ("Paid", "0.00")
    paid = payment_of(invoice["invoiceNumber"], payment_id)
    assert (paid["status"], paid["cardLastFour"], paid["provider"]) == ("Completed", "4242", "WorldPay")


def test_partially_approved_records_the_amount_the_provider_approved(running):
    invoice = issued_invoice(TENANT)
    payment_id = start(invoice["invoiceNumber"])
    deliver(callback(invoice["invoiceNumber"], payment_id, "PartiallyApproved", amount="100.00"))
    after = invoice_json(TENANT, invoice["invoiceNumber"])
    assert (after["status"], after["amountPaid"], after["balance"]) == ("PartiallyPaid", "100.00", "42.60")
    paid = payment_of(invoice["invoiceNumber"], payment_id)
    assert (paid["amount"], paid["requestedAmount"]) == ("100.00", "142.60")
    with db.sessions()() as s:
        event = s.scalars(select(OutboxEvent.payload).where(OutboxEvent.type == "payment.recorded",
                                                           OutboxEvent.invoice_id == uuid.UUID(invoice["id"]))).one()
    assert event["data"]["differsFromRequested"] is True and event["data"]["requestedAmount"] == "142.60"


def test_declined_error_and_cancelled_fail_the_attempt_keeping_code_and_message(running):
    invoice = issued_invoice(TENANT)
    for result, code in (("Declined", "05"), ("Error", "96"), ("Cancelled", "C1")):
        payment_id = start(invoice["invoiceNumber"], profile=None)
        assert deliver(callback(invoice["invoiceNumber"], payment_id, result, amount=None, code=code))["outcome"] == "applied"
        failed = payment_of(invoice["invoiceNumber"], payment_id)
        assert (failed["status"], failed["failureCode"], failed["failureReason"]) == ("Failed", code, result)
    after = invoice_json(TENANT, invoice["invoiceNumber"])
    assert (after["status"], after["balance"]) == ("Issued", "142.60")
    assert outbox_types(invoice["id"]).count("payment.failed") == 3


def test_duplicate_callbacks_and_a_conflicting_callback(running):
    invoice = issued_invoice(TENANT)
    payment_id = start(invoice["invoiceNumber"], amount="40.00")
    approved = callback(invoice["invoiceNumber"], payment_id, "Approved", amount="40.00", transaction="T-77")
    assert deliver(approved)["outcome"] == "applied"
    send("invoices.payment_callback", approved)  # the same callback again
    again = callback(invoice["invoiceNumber"], payment_id, "Approved", amount="40.00", transaction="T-77")
    assert deliver(again)["outcome"] == "duplicate"  # a new messageId, the same transactionId
    conflict = callback(invoice["invoiceNumber"], payment_id, "Declined", amount=None, transaction="T-78", code="05")
    outcome = deliver(conflict)
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "payment-already-final")
    after = invoice_json(TENANT, invoice["invoiceNumber"])
    assert after["amountPaid"] == "40.00" and len(after["payments"]) == 1
    assert outbox_types(invoice["id"]).count("payment.recorded") == 1


def test_a_callback_before_its_payment_is_retried_until_the_payment_appears(running):
    invoice = issued_invoice(TENANT)
    payment_id = str(uuid.uuid4())
    early = callback(invoice["invoiceNumber"], payment_id, "Approved", amount="10.00")
    send("invoices.payment_callback", early)
    wait_for(lambda: f"PaymentNotYetKnown('{payment_id}'" in running.procs[0].log.read_text(), 20, what="the first retry")
    body = {"messageId": f"start-{payment_id}", "tenantId": TENANT, "invoiceNumber": invoice["invoiceNumber"],
            "paymentId": payment_id, "amount": "10.00", "currency": "USD"}
    send("invoices.start_hosted_payment", body)
    assert wait_outcome(TENANT, early["messageId"], timeout=30)["outcome"] == "applied"
    assert payment_of(invoice["invoiceNumber"], payment_id)["status"] == "Completed"


def test_a_callback_whose_payment_never_appears_is_dead_lettered(running):
    invoice = issued_invoice(TENANT)
    orphan = callback(invoice["invoiceNumber"], str(uuid.uuid4()), "Approved", amount="10.00")
    send("invoices.payment_callback", orphan)
    letters = wait_for(lambda: dead_letters_of(message_id=orphan["messageId"]), 40, what="the dead letter")
    assert letters[0]["reason"] == "payment-unknown" and letters[0]["body"] == orphan
    assert invoice_json(TENANT, invoice["invoiceNumber"])["amountPaid"] == "0.00"


def test_forged_unsigned_and_tampered_callbacks_are_dead_lettered_and_change_nothing(running):
    invoice = issued_invoice(TENANT)
    payment_id = start(invoice["invoiceNumber"])
    forged = callback(invoice["invoiceNumber"], payment_id, "Approved", signed=False)
    forged["signature"] = "0" * 64
    unsigned = callback(invoice["invoiceNumber"], payment_id, "Approved", signed=False)
    tampered = callback(invoice["invoiceNumber"], payment_id, "Approved", amount="1.00")
    tampered["amount"] = "142.60"
    other_secret = callback(invoice["invoiceNumber"], payment_id, "Approved", signed=False)
    other_secret["signature"] = sign(other_secret, "not-the-secret")
    for body in (forged, unsigned, tampered, other_secret):
        send("invoices.payment_callback", body)
    for body in (forged, unsigned, tampered, other_secret):
        letter = wait_for(lambda: dead_letters_of(message_id=body["messageId"]), 20, what="the dead letter")[0]
        assert letter["reason"] == "bad-signature" and letter["body"] == body
    assert "no signature" in dead_letters_of(message_id=unsigned["messageId"])[0]["error"]
    assert payment_of(invoice["invoiceNumber"], payment_id)["status"] == "Pending"
    assert invoice_json(TENANT, invoice["invoiceNumber"])["balance"] == "142.60"


def test_a_callback_naming_another_tenants_invoice_finds_nothing(running):
    invoice = issued_invoice("t-pay-a")
    payment_id = start(invoice["invoiceNumber"], tenant="t-pay-a")
    outcome = deliver(callback(invoice["invoiceNumber"], payment_id, "Approved", tenant="t-pay-b"), tenant="t-pay-b")
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "invoice-not-found")
    assert payment_of(invoice["invoiceNumber"], payment_id, tenant="t-pay-a")["status"] == "Pending"


def failed_saved_card_payment(code: str = "05") -> tuple[dict, str]:
    invoice = issued_invoice(TENANT)
    payment_id = start(invoice["invoiceNumber"])
    deliver(callback(invoice["invoiceNumber"], payment_id, "Declined", amount=None, code=code))
    return invoice, payment_id


def attempts(invoice_id: str) -> list[Payment]:
    with db.sessions()() as s:
        return list(s.scalars(select(Payment).where(Payment.invoice_id == uuid.UUID(invoice_id))
                              .order_by(Payment.attempt)))


def test_retries_not_due_then_due_and_two_scans_at_once_create_one_attempt(running):
    invoice, payment_id = failed_saved_card_payment()
    failed = attempts(invoice["id"])[0]
    assert failed.next_retry_at == failed.failed_at  # PAYMENT_RETRY_DAYS starts with 0: due at once
    assert scheduler.retry_failed_payments("early", now=failed.failed_at - timedelta(seconds=1))["requested"] == 0
    results = []
    scans = [threading.Thread(target=lambda i=i: results.append(scheduler.retry_failed_payments(f"scan-{i}")))
             for i in range(2)]
    for t in scans:
        t.start()
    for t in scans:
        t.join()
    assert sum(r["requested"] for r in results) == 1
    rows = attempts(invoice["id"])
    assert len(rows) == 2
    retry = rows[1]
    assert (retry.status, retry.retry_of, retry.attempt, str(retry.amount)) == ("Pending", failed.id, 1, "142.6000")
    assert scheduler.retry_failed_payments("repeat")["requested"] == 0  # a repeated scan is harmless
    assert outbox_types(invoice["id"]).count("payment.retry_requested") == 1


def test_retries_stop_after_the_last_scheduled_day_with_one_exhausted_event(running):
    invoice, payment_id = failed_saved_card_payment()
    for attempt in range(1, 4):  # the schedule has three days: 0, 0.00002 and 0.00004
        current = attempts(invoice["id"])[-1]
        far_future = datetime.now(timezone.utc) + timedelta(days=1)
        assert scheduler.retry_failed_payments(f"scan-{attempt}", now=far_future)["requested"] == 1
        retry = attempts(invoice["id"])[-1]
        assert retry.retry_of == current.id and retry.attempt == attempt
        deliver(callback(invoice["invoiceNumber"], str(retry.id), "Declined", amount=None, code="05"))
    far_future = datetime.now(timezone.utc) + timedelta(days=30)
    assert scheduler.retry_failed_payments("after-the-end", now=far_future)["requested"] == 0
    types = outbox_types(invoice["id"])
    assert types.count("payment.retry_requested") == 3
    assert types.count("payment.retries_exhausted") == 1
    assert all(p.next_retry_at is None for p in attempts(invoice["id"]))


def test_a_hard_decline_is_never_retried(running):
    invoice, payment_id = failed_saved_card_payment(code="stolen_card")
    assert attempts(invoice["id"])[0].next_retry_at is None
    assert scheduler.retry_failed_payments("hard", now=datetime.now(timezone.utc) + timedelta(days=30))["requested"] == 0
    assert outbox_types(invoice["id"]).count("payment.retries_exhausted") == 1


def test_an_approved_retry_settles_the_invoice_and_ends_the_retries(running):
    invoice, payment_id = failed_saved_card_payment()
    scheduler.retry_failed_payments("settle")
    retry = attempts(invoice["id"])[-1]
    deliver(callback(invoice["invoiceNumber"], str(retry.id), "Approved", amount="142.60"))
    after = invoice_json(TENANT, invoice["invoiceNumber"])
    assert (after["status"], after["balance"]) == ("Paid", "0.00")
    assert scheduler.retry_failed_payments("after-paid", now=datetime.now(timezone.utc) + timedelta(days=30)) == {
        "requested": 0, "dropped": 0}


def test_voiding_or_cancelling_ends_the_retries(running):
    for command in ("invoices.void", "invoices.cancel"):
        invoice, payment_id = failed_saved_card_payment()
        body = {"messageId": f"end-{uuid.uuid4()}", "tenantId": TENANT, "invoiceNumber": invoice["invoiceNumber"]}
        send(command, body)
        assert wait_outcome(TENANT, body["messageId"])["outcome"] == "applied"
        assert attempts(invoice["id"])[0].next_retry_at is None
        assert scheduler.retry_failed_payments(command, now=datetime.now(timezone.utc) + timedelta(days=30))["requested"] == 0


def test_celery_beat_sends_the_retry_scan_on_its_schedule(running, tmp_path):
    invoice, payment_id = failed_saved_card_payment()
    log = tmp_path / "beat.log"
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "beat", "--loglevel", "INFO", "-s", str(tmp_path / "schedule")],
        cwd=ROOT, env={**os.environ, "PAYMENT_RETRY_SCAN_SECONDS": "1"}, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_for(lambda: len(attempts(invoice["id"])) == 2, 30, what="beat's scan to request the retry")
    finally:
        beat.terminate()
        beat.wait(10)
    assert "invoices.retry_failed_payments" in log.read_text()
    assert attempts(invoice["id"])[1].status == "Pending"
