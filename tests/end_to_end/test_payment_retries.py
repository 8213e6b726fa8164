"""The scheduled retry of failed payments (CONTRACT.md section 8) through real processes: `celery -A
worker beat` processes send invoices.retry_failed_payments every half second, the session's worker
runs the scans, and a kombu consumer reads the events. TEST_ENV's PAYMENT_RETRY_DAYS makes retries due
at once, then 1.7 s and 3.5 s after the first failure.

"Nothing happened" is shown with a marker: a later failed payment whose retry is requested proves
that scans ran after everything the test set up, so whatever they did not do, they will not do."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import func, select

from models.payment import Payment
from tasks.payments import retry_policy
from tests.conftest import EventCollector, Processes, new_tenant, wait_for
from tests.end_to_end.test_delivery import issued_invoice
from tests.end_to_end.test_payments import callback, command, deliver, start
from worker.storage import db

SCAN_SECONDS = "0.5"


def start_beat(processes: Processes, tmp_path: Path) -> object:
    """A `celery -A worker beat` process of this test's own, once it has sent its first scan."""
    beat = processes.beat(tmp_path / f"beat-schedule-{uuid.uuid4().hex[:6]}",
                          {"PAYMENT_RETRY_SCAN_SECONDS": SCAN_SECONDS})
    wait_for(lambda: beat.log.read_text().count("Sending due task retry-failed-payments") >= 1 or beat.poll() is not None,
             60, what="beat's first scan")
    assert beat.poll() is None, beat.log.read_text()[-3000:]
    return beat


def database_now() -> datetime:
    """The database's clock, the one created_at and failed_at are read from."""
    with db.sessions()() as s:
        return s.scalar(select(func.clock_timestamp()))


def attempts(invoice_id: str) -> list[Payment]:
    """The card attempts of an invoice (the first failure and its retries), in order; offline payments left out."""
    with db.sessions()() as s:
        return list(s.scalars(select(Payment).where(Payment.invoice_id == uuid.UUID(invoice_id),
                                                    Payment.payment_method.is_(None))
                              .order_by(Payment.attempt)))


def failed_saved_card_payment(tenant: str, code: str = "05") -> tuple[dict, str]:
    """An issued invoice whose saved-card payment the provider declined (a soft decline by default)."""
    invoice = issued_invoice(tenant)
    payment_id = start(tenant, invoice["invoiceNumber"])
    declined = deliver(callback(tenant, invoice["invoiceNumber"], payment_id, "Declined", amount=None, code=code))
    assert declined["outcome"] == "applied"
    return invoice, payment_id


def wait_for_marker_retry(events: EventCollector, tenant: str) -> dict:
    """Fail a marker payment now and wait for beat's scan to request its retry: every scan that did
    so started after everything the test did before."""
    marker, _ = failed_saved_card_payment(tenant)
    events.wait(lambda e: any(x["type"] == "payment.retry_requested" and x["invoiceId"] == marker["id"] for x in e),
                60, what="the marker's retry")
    return marker


def of_invoice(events: EventCollector, invoice: dict, type_: str) -> list[dict]:
    return [e for e in events.events if e["invoiceId"] == invoice["id"] and e["type"] == type_]


def test_beat_retries_on_schedule_for_the_capped_balance_until_spent_then_exhausted_once(
        running, processes, events, tmp_path):
    tenant = new_tenant("t-beat")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    first_id = start(tenant, number)  # 142.60 on a saved card
    assert command("invoices.record_payment", tenant, number, amount="42.60", currency="USD",
                   paymentMethod="EFT")["outcome"] == "applied"
    # Beat scans before the first failure, so that scans run while a retry is not yet due (started
    # after it, its start-up could outlast the whole schedule, and "never before due" held vacuously).
    beat = start_beat(processes, tmp_path)
    assert command("invoices.fail_payment", tenant, number, paymentId=first_id, failureCode="05",
                   failureReason="do not honour")["outcome"] == "applied"
    [first] = attempts(invoice["id"])
    assert first.payment_id == uuid.UUID(first_id)
    schedule = retry_policy()["retry_after"]
    assert len(schedule) == 3
    previous, scans_while_not_due = first, 0
    for number_of_retry, due_after in enumerate(schedule, start=1):
        due, scans = first.failed_at + due_after, scans_sent(beat)
        while database_now() < due - timedelta(seconds=0.2):  # not due yet: scans run and request nothing
            assert not [p for p in attempts(invoice["id"]) if p.attempt == number_of_retry], \
                "a retry was requested before it was due"
            time.sleep(0.05)
        scans_while_not_due += max(0, scans_sent(beat) - scans - 1)  # the first may have been sent before
        rows = wait_for(lambda: [p for p in attempts(invoice["id"]) if p.attempt == number_of_retry], 60,
                        what=f"retry {number_of_retry}")
        retry = rows[0]
        assert (retry.status, retry.retry_of, retry.payment_profile_id) == ("Pending", previous.id, "card-1")
        assert str(retry.amount) == "100.0000"  # the balance, capped by the first attempt's 142.60
        assert retry.created_at >= due, "a retry was requested before it was due"
        declined = deliver(callback(tenant, number, str(retry.payment_id), "Declined", amount=None, code="05"))
        assert declined["outcome"] == "applied"
        previous = retry
    assert scans_while_not_due >= 1, "no scan ran while a retry was not yet due: nothing was shown"
    events.wait(lambda e: bool(of_invoice(events, invoice, "payment.retries_exhausted")), 60,
                what="payment.retries_exhausted")
    # Scans go on every half second; the marker's retry shows some ran after the schedule was spent.
    wait_for_marker_retry(events, tenant)
    rows = attempts(invoice["id"])
    assert [(p.attempt, p.status) for p in rows] == [(0, "Failed"), (1, "Failed"), (2, "Failed"), (3, "Failed")]
    assert all(p.next_retry_at is None for p in rows)
    requested = of_invoice(events, invoice, "payment.retry_requested")
    public_id = {p.id: str(p.payment_id) for p in rows}  # retry_of holds the internal key; events the public id
    assert [(e["data"]["paymentId"], e["data"]["attempt"], e["data"]["retryOf"], e["data"]["amount"])
            for e in requested] == [(str(p.payment_id), p.attempt, public_id[p.retry_of], "100.00") for p in rows[1:]]
    assert {e["data"]["paymentProfileId"] for e in requested} == {"card-1"}
    assert len(of_invoice(events, invoice, "payment.failed")) == 4
    exhausted = of_invoice(events, invoice, "payment.retries_exhausted")
    assert len(exhausted) == 1
    assert (exhausted[0]["data"]["reason"], exhausted[0]["data"]["attempts"]) == ("schedule-spent", 3)
    assert exhausted[0]["data"]["paymentId"] == str(rows[-1].payment_id)


def scans_sent(beat) -> int:
    return beat.log.read_text().count("Sending due task retry-failed-payments")


def test_two_beat_processes_and_repeated_scans_request_each_due_retry_once(running, processes, events, tmp_path):
    tenant = new_tenant("t-two-beats")
    beats = [start_beat(processes, tmp_path) for _ in range(2)]
    # Each failure is due at once while both schedulers send a scan every half second.
    failed = [failed_saved_card_payment(tenant)[0] for _ in range(4)]
    sent = [scans_sent(beat) for beat in beats]
    events.wait(lambda e: all(of_invoice(events, invoice, "payment.retry_requested") for invoice in failed), 60,
                what="a retry of each failed payment")
    for beat, before in zip(beats, sent):  # both went on scanning after the last failure was due
        wait_for(lambda: scans_sent(beat) > before or beat.poll() is not None, 60, what="a later scan of each beat")
        assert beat.poll() is None
    wait_for_marker_retry(events, tenant)
    for invoice in failed:
        rows = attempts(invoice["id"])
        assert [(p.attempt, p.status) for p in rows] == [(0, "Failed"), (1, "Pending")]
        assert rows[1].retry_of == rows[0].id
        assert len(of_invoice(events, invoice, "payment.retry_requested")) == 1


def test_hard_declines_and_void_cancel_or_payment_end_the_retries(running, processes, events, tmp_path):
    tenant = new_tenant("t-ended")
    hard_by_command = issued_invoice(tenant)
    payment_id = start(tenant, hard_by_command["invoiceNumber"])
    assert command("invoices.fail_payment", tenant, hard_by_command["invoiceNumber"], paymentId=payment_id,
                   failureCode="stolen_card", failureReason="stolen")["outcome"] == "applied"
    hard_by_callback, _ = failed_saved_card_payment(tenant, code="lost_card")
    ended = {}
    for end in ("invoices.void", "invoices.cancel", "invoices.record_payment"):
        invoice, _ = failed_saved_card_payment(tenant)
        fields = {"amount": "142.60", "currency": "USD", "paymentMethod": "EFT"} if end == "invoices.record_payment" else {}
        assert command(end, tenant, invoice["invoiceNumber"], **fields)["outcome"] == "applied"
        ended[end] = invoice
    # a failed payment without a saved card is not retried either
    no_card = issued_invoice(tenant)
    one_off = start(tenant, no_card["invoiceNumber"], profile=None)
    assert deliver(callback(tenant, no_card["invoiceNumber"], one_off, "Declined", amount=None,
                            code="05"))["outcome"] == "applied"
    ended["no saved card"] = no_card
    hard = [hard_by_command, hard_by_callback]
    for invoice in [*hard, *ended.values()]:
        assert attempts(invoice["id"])[0].next_retry_at is None  # nothing left to retry
    start_beat(processes, tmp_path)
    wait_for_marker_retry(events, tenant)
    for invoice in [*hard, *ended.values()]:
        assert len(attempts(invoice["id"])) == 1, "a retry was requested for an invoice whose retries ended"
        assert of_invoice(events, invoice, "payment.retry_requested") == []
    for invoice in hard:
        exhausted = of_invoice(events, invoice, "payment.retries_exhausted")
        assert [(e["data"]["reason"], e["data"]["attempts"]) for e in exhausted] == [("hard-decline", 0)]
    assert [e["data"]["failureCode"] for e in of_invoice(events, hard_by_callback, "payment.retries_exhausted")] == [
        "lost_card"]
    for invoice in ended.values():
        assert of_invoice(events, invoice, "payment.retries_exhausted") == []
    assert [invoice_status(tenant, i) for i in ended.values()] == ["Voided", "Cancelled", "Paid", "Issued"]


def invoice_status(tenant: str, invoice: dict) -> str:
    from tests.conftest import invoice_json

    return invoice_json(tenant, invoice["invoiceNumber"])["status"]
