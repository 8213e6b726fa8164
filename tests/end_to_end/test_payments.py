"""Hosted payments, signed WorldPay callbacks and the scheduled retry of failed payments
through a real worker (CONTRACT.md sections 5, 7 and 8)."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from models.payment import Payment
from tests.conftest import dead_letters_of, invoice_json, new_tenant, outcome_of, send, wait_for, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice
from worker.delivery import scheduler
from worker.delivery.signing import sign
from worker.storage import db
from worker.storage.records import OutboxEvent

SECRET = "test-secret"


def start(tenant: str, number: str, amount: str = "142.60", profile: str | None = "card-1") -> str:
    payment_id = str(uuid.uuid4())
    body = {"messageId": f"start-{payment_id}", "tenantId": tenant, "invoiceNumber": number, "paymentId": payment_id,
            "amount": amount, "currency": "USD", "paymentProfileId": profile}
    send("invoices.start_hosted_payment", body)
    assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    return payment_id


def callback(tenant: str, number: str, payment_id: str, result: str, amount: str | None = "142.60", *,
             transaction: str | None = None, code: str = "0", signed: bool = True, **extra) -> dict:
    body = {"messageId": f"cb-{uuid.uuid4()}", "tenantId": tenant, "provider": "WorldPay", "invoiceNumber": number,
            "paymentId": payment_id, "transactionId": transaction or f"T-{uuid.uuid4().hex[:8]}", "result": result,
            "currency": "USD", "responseCode": code, "responseMessage": result, **extra}
    if amount is not None:
        body["amount"] = amount
    if signed:
        body["signature"] = sign(body, SECRET)
    return body


def deliver(body: dict) -> dict:
    send("invoices.payment_callback", body)
    return wait_outcome(body["tenantId"], body["messageId"])


def command(task: str, tenant: str, number: str, **fields) -> dict:
    body = {"messageId": f"c-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": number, **fields}
    send(task, body)
    return {**wait_outcome(tenant, body["messageId"]), "messageId": body["messageId"]}


def payment_of(tenant: str, number: str, payment_id: str) -> dict:
    return next(p for p in invoice_json(tenant, number)["payments"] if p["paymentId"] == payment_id)


def outbox_types(invoice_id: str) -> list[str]:
    with db.sessions()() as s:
        return list(s.scalars(select(OutboxEvent.type).where(OutboxEvent.invoice_id == uuid.UUID(invoice_id))
                              .order_by(OutboxEvent.sequence)))


def test_approved_callback_completes_the_payment_and_settles_the_invoice(running):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = start(tenant, number)
    assert invoice_json(tenant, number)["balance"] == "142.60"  # pending moves nothing
    outcome = deliver(callback(tenant, number, payment_id, "Approved", cardBrand="Visa", cardLastFour="4242"))
    assert outcome["outcome"] == "applied"
    after = invoice_json(tenant, number)
    assert (after["status"], after["balance"]) == ("Paid", "0.00")
    paid = payment_of(tenant, number, payment_id)
    assert (paid["status"], paid["cardLastFour"], paid["provider"]) == ("Completed", "4242", "WorldPay")


def test_partially_approved_records_the_amount_the_provider_approved(running):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = start(tenant, number)
    deliver(callback(tenant, number, payment_id, "PartiallyApproved", amount="100.00"))
    after = invoice_json(tenant, number)
    assert (after["status"], after["amountPaid"], after["balance"]) == ("PartiallyPaid", "100.00", "42.60")
    paid = payment_of(tenant, number, payment_id)
    assert (paid["amount"], paid["requestedAmount"]) == ("100.00", "142.60")
    with db.sessions()() as s:
        event = s.scalars(select(OutboxEvent.payload).where(OutboxEvent.type == "payment.recorded",
                                                           OutboxEvent.invoice_id == uuid.UUID(invoice["id"]))).one()
    assert event["data"]["differsFromRequested"] is True and event["data"]["requestedAmount"] == "142.60"


def test_declined_error_and_cancelled_fail_the_attempt_keeping_code_and_message(running):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    for result, code in (("Declined", "05"), ("Error", "96"), ("Cancelled", "C1")):
        payment_id = start(tenant, number, profile=None)
        assert deliver(callback(tenant, number, payment_id, result, amount=None, code=code))["outcome"] == "applied"
        failed = payment_of(tenant, number, payment_id)
        assert (failed["status"], failed["failureCode"], failed["failureReason"]) == ("Failed", code, result)
    after = invoice_json(tenant, number)
    assert (after["status"], after["balance"]) == ("Issued", "142.60")
    assert outbox_types(invoice["id"]).count("payment.failed") == 3


def test_duplicate_callbacks_and_a_conflicting_callback(running, own_worker):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = start(tenant, number, amount="40.00")
    approved = callback(tenant, number, payment_id, "Approved", amount="40.00", transaction="T-77")
    own_worker.send("invoices.payment_callback", approved)
    assert wait_outcome(tenant, approved["messageId"])["outcome"] == "applied"
    own_worker.send("invoices.payment_callback", approved)  # the same callback again
    again = callback(tenant, number, payment_id, "Approved", amount="40.00", transaction="T-77")
    own_worker.send("invoices.payment_callback", again)  # a new messageId, the same transactionId
    # one process, in the order sent: the copy was handled before `again` has its outcome
    assert wait_outcome(tenant, again["messageId"])["outcome"] == "duplicate"
    assert outcome_of(tenant, approved["messageId"])["outcome"] == "applied"
    assert own_worker.log.count("'outcome': 'duplicate'") == 2  # the copy and `again`
    conflict = callback(tenant, number, payment_id, "Declined", amount=None, transaction="T-78", code="05")
    own_worker.send("invoices.payment_callback", conflict)
    outcome = wait_outcome(tenant, conflict["messageId"])
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "payment-already-final")
    after = invoice_json(tenant, number)
    assert after["amountPaid"] == "40.00" and len(after["payments"]) == 1
    assert outbox_types(invoice["id"]).count("payment.recorded") == 1


def test_a_callback_before_its_payment_is_retried_until_the_payment_appears(running, own_worker):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = str(uuid.uuid4())
    early = callback(tenant, number, payment_id, "Approved", amount="10.00")
    own_worker.send("invoices.payment_callback", early)
    wait_for(lambda: f"PaymentNotYetKnown('{payment_id}'" in own_worker.log, 20, what="the first retry")
    assert outcome_of(tenant, early["messageId"]) is None
    body = {"messageId": f"start-{payment_id}", "tenantId": tenant, "invoiceNumber": number,
            "paymentId": payment_id, "amount": "10.00", "currency": "USD"}
    own_worker.send("invoices.start_hosted_payment", body)
    assert wait_outcome(tenant, early["messageId"], timeout=30)["outcome"] == "applied"
    assert payment_of(tenant, number, payment_id)["status"] == "Completed"


def test_a_callback_whose_payment_never_appears_is_dead_lettered(running):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    orphan = callback(tenant, invoice["invoiceNumber"], str(uuid.uuid4()), "Approved", amount="10.00")
    send("invoices.payment_callback", orphan)
    letters = wait_for(lambda: dead_letters_of(message_id=orphan["messageId"]), 40, what="the dead letter")
    assert letters[0]["reason"] == "payment-unknown" and letters[0]["body"] == orphan
    assert invoice_json(tenant, invoice["invoiceNumber"])["amountPaid"] == "0.00"
    assert outcome_of(tenant, orphan["messageId"]) is None


def test_forged_unsigned_and_tampered_callbacks_are_dead_lettered_and_change_nothing(running):
    tenant = new_tenant("t-pay")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = start(tenant, number)
    forged = callback(tenant, number, payment_id, "Approved", signed=False)
    forged["signature"] = "0" * 64
    unsigned = callback(tenant, number, payment_id, "Approved", signed=False)
    tampered = callback(tenant, number, payment_id, "Approved", amount="1.00")
    tampered["amount"] = "142.60"
    other_secret = callback(tenant, number, payment_id, "Approved", signed=False)
    other_secret["signature"] = sign(other_secret, "not-the-secret")
    for body in (forged, unsigned, tampered, other_secret):
        send("invoices.payment_callback", body)
    for body in (forged, unsigned, tampered, other_secret):
        letter = wait_for(lambda: dead_letters_of(message_id=body["messageId"]), 20, what="the dead letter")[0]
        assert letter["reason"] == "bad-signature" and letter["body"] == body
    assert "no signature" in dead_letters_of(message_id=unsigned["messageId"])[0]["error"]
    assert payment_of(tenant, number, payment_id)["status"] == "Pending"
    assert invoice_json(tenant, number)["balance"] == "142.60"


def test_a_callback_naming_another_tenants_invoice_finds_nothing(running):
    tenant_a, tenant_b = new_tenant("t-pay-a"), new_tenant("t-pay-b")
    invoice = issued_invoice(tenant_a)
    payment_id = start(tenant_a, invoice["invoiceNumber"])
    outcome = deliver(callback(tenant_b, invoice["invoiceNumber"], payment_id, "Approved"))
    assert (outcome["outcome"], outcome["reason"]) == ("rejected", "invoice-not-found")
    assert payment_of(tenant_a, invoice["invoiceNumber"], payment_id)["status"] == "Pending"


def contract_signature(body: dict, secret: str) -> str:
    """CONTRACT.md section 7, written out here (not the product's signing code): HMAC-SHA256 of the body
    without `signature`, as JSON with sorted keys, separators `,` and `:`, non-ASCII as \\uXXXX escapes."""
    import hashlib
    import hmac
    import json

    canonical = json.dumps({k: v for k, v in body.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(secret.encode(), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def test_the_contract_test_vector_and_a_non_ascii_callback_are_accepted_by_the_worker(running):
    # The vector's body names tenant acme and messageId cb-0001 (the signature covers them); the
    # database is emptied before each test, so nothing else of this session has them.
    vector = {"amount": "120.00", "currency": "USD", "invoiceNumber": "INV-00892", "messageId": "cb-0001",
              "paymentId": "6f1c2d3e-0000-4000-8000-000000000001", "provider": "WorldPay", "responseCode": "0",
              "responseMessage": "Approved", "result": "Approved", "tenantId": "acme", "transactionId": "T-1001",
              "signature": "fed59388df04d7aa083a1e99e08c5127a5d7f3dc585808f7d5f238c52bc5f024"}
    assert contract_signature(vector, SECRET) == vector["signature"]
    invoice = issued_invoice("acme", invoiceNumber="INV-00892")
    start_body = {"messageId": f"start-{uuid.uuid4()}", "tenantId": "acme", "invoiceNumber": "INV-00892",
                  "paymentId": vector["paymentId"], "amount": "142.60", "currency": "USD"}
    send("invoices.start_hosted_payment", start_body)
    assert wait_outcome("acme", start_body["messageId"])["outcome"] == "applied"
    assert deliver(vector)["outcome"] == "applied"
    assert payment_of("acme", "INV-00892", vector["paymentId"])["amount"] == "120.00"

    tenant = new_tenant("t-pay-é")
    other = issued_invoice(tenant)
    payment_id = start(tenant, other["invoiceNumber"], profile=None)
    body = callback(tenant, other["invoiceNumber"], payment_id, "Declined", amount=None, code="05", signed=False)
    body["responseMessage"] = "Refusée: carte bloquée"
    body["signature"] = contract_signature(body, SECRET)
    assert deliver(body)["outcome"] == "applied"
    assert payment_of(tenant, other["invoiceNumber"], payment_id)["failureReason"] == "Refusée: carte bloquée"
    assert invoice["invoiceNumber"] == "INV-00892"


def test_complete_hosted_payment_settles_the_invoice_and_publishes_its_events(running, events):
    tenant = new_tenant("t-hosted")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = start(tenant, number, amount="100.00", profile=None)
    done = command("invoices.complete_hosted_payment", tenant, number, paymentId=payment_id)
    assert done["outcome"] == "applied"
    after = invoice_json(tenant, number)
    assert (after["status"], after["amountPaid"], after["balance"]) == ("PartiallyPaid", "100.00", "42.60")
    assert payment_of(tenant, number, payment_id)["status"] == "Completed"
    again = command("invoices.complete_hosted_payment", tenant, number, paymentId=payment_id)
    assert (again["outcome"], again["reason"]) == ("duplicate", "payment-already-completed")
    events.wait(lambda e: sum(x["tenantId"] == tenant for x in e) >= 5, what="the hosted payment's events")
    published = [(e["type"], e["sequence"]) for e in events.of(tenant)]
    assert published == [("invoice.created", 1), ("invoice.status_changed", 2), ("invoice.updated", 3),
                         ("payment.recorded", 4), ("invoice.status_changed", 5)]
    started, recorded, changed = events.of(tenant)[2:]
    assert (started["data"]["paymentId"], started["data"]["paymentStatus"]) == (payment_id, "Pending")
    assert started["data"]["balance"] == "142.60"  # a pending payment moves nothing
    assert (recorded["data"]["paymentId"], recorded["data"]["amount"]) == (payment_id, "100.00")
    assert recorded["causationId"] == changed["causationId"] == done["messageId"]
    assert (changed["data"]["from"], changed["data"]["to"], changed["data"]["balance"]) == (
        "Issued", "PartiallyPaid", "42.60")


def test_fail_payment_fails_the_attempt_publishes_payment_failed_and_schedules_the_retry(running, events):
    tenant = new_tenant("t-fail")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    payment_id = start(tenant, number)
    failed = command("invoices.fail_payment", tenant, number, paymentId=payment_id, failureCode="05",
                     failureReason="do not honour")
    assert failed["outcome"] == "applied"
    after = invoice_json(tenant, number)
    assert (after["status"], after["balance"]) == ("Issued", "142.60")  # the balance does not move
    row = attempts(invoice["id"])[0]
    assert (row.status, row.failure_code, row.failure_reason) == ("Failed", "05", "do not honour")
    assert row.next_retry_at == row.failed_at  # a candidate for the scheduled retry (first day 0)
    again = command("invoices.fail_payment", tenant, number, paymentId=payment_id, failureCode="05",
                    failureReason="do not honour")
    assert (again["outcome"], again["reason"]) == ("duplicate", "payment-already-failed")
    events.wait(lambda e: any(x["type"] == "payment.failed" and x["tenantId"] == tenant for x in e),
                what="payment.failed")
    published = [e for e in events.of(tenant) if e["type"] == "payment.failed"]
    assert len(published) == 1
    assert published[0]["data"]["paymentId"] == payment_id
    assert (published[0]["data"]["failureCode"], published[0]["data"]["failureReason"]) == ("05", "do not honour")
    assert (published[0]["invoiceId"], published[0]["data"]["balance"]) == (invoice["id"], "142.60")


def failed_saved_card_payment(tenant: str, code: str = "05") -> tuple[dict, str]:
    invoice = issued_invoice(tenant)
    payment_id = start(tenant, invoice["invoiceNumber"])
    deliver(callback(tenant, invoice["invoiceNumber"], payment_id, "Declined", amount=None, code=code))
    return invoice, payment_id


def attempts(invoice_id: str) -> list[Payment]:
    with db.sessions()() as s:
        return list(s.scalars(select(Payment).where(Payment.invoice_id == uuid.UUID(invoice_id))
                              .order_by(Payment.attempt)))


def test_retries_not_due_then_due_and_two_scans_at_once_create_one_attempt(running):
    tenant = new_tenant("t-retry")
    invoice, payment_id = failed_saved_card_payment(tenant)
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
    tenant = new_tenant("t-retry")
    invoice, payment_id = failed_saved_card_payment(tenant)
    for attempt in range(1, 4):  # the schedule has three days: 0, 0.00002 and 0.00004
        current = attempts(invoice["id"])[-1]
        far_future = datetime.now(timezone.utc) + timedelta(days=1)
        assert scheduler.retry_failed_payments(f"scan-{attempt}", now=far_future)["requested"] == 1
        retry = attempts(invoice["id"])[-1]
        assert retry.retry_of == current.id and retry.attempt == attempt
        deliver(callback(tenant, invoice["invoiceNumber"], str(retry.payment_id), "Declined", amount=None, code="05"))
    far_future = datetime.now(timezone.utc) + timedelta(days=30)
    assert scheduler.retry_failed_payments("after-the-end", now=far_future)["requested"] == 0
    types = outbox_types(invoice["id"])
    assert types.count("payment.retry_requested") == 3
    assert types.count("payment.retries_exhausted") == 1
    assert all(p.next_retry_at is None for p in attempts(invoice["id"]))


def test_a_hard_decline_is_never_retried(running):
    tenant = new_tenant("t-retry")
    invoice, payment_id = failed_saved_card_payment(tenant, code="stolen_card")
    assert attempts(invoice["id"])[0].next_retry_at is None
    assert scheduler.retry_failed_payments("hard", now=datetime.now(timezone.utc) + timedelta(days=30))["requested"] == 0
    assert outbox_types(invoice["id"]).count("payment.retries_exhausted") == 1


def test_an_approved_retry_settles_the_invoice_and_ends_the_retries(running):
    tenant = new_tenant("t-retry")
    invoice, payment_id = failed_saved_card_payment(tenant)
    scheduler.retry_failed_payments("settle")
    retry = attempts(invoice["id"])[-1]
    deliver(callback(tenant, invoice["invoiceNumber"], str(retry.payment_id), "Approved", amount="142.60"))
    after = invoice_json(tenant, invoice["invoiceNumber"])
    assert (after["status"], after["balance"]) == ("Paid", "0.00")
    assert scheduler.retry_failed_payments("after-paid", now=datetime.now(timezone.utc) + timedelta(days=30)) == {
        "requested": 0, "dropped": 0}


def test_voiding_or_cancelling_ends_the_retries(running):
    tenant = new_tenant("t-retry")
    for end in ("invoices.void", "invoices.cancel"):
        invoice, payment_id = failed_saved_card_payment(tenant)
        assert command(end, tenant, invoice["invoiceNumber"])["outcome"] == "applied"
        assert attempts(invoice["id"])[0].next_retry_at is None
        assert scheduler.retry_failed_payments(end, now=datetime.now(timezone.utc) + timedelta(days=30))["requested"] == 0
