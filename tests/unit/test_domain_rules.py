"""One test per rule of invoice-api.md and CONTRACT.md section 5, named after the rule (~410
lines: one short test per rule, in the reference's order, so the file reads as the rule list)."""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest

from models.errors import DomainError, PaymentNotYetKnown
from models.rules import due_date_from_terms
from tests.unit.domain_builders import NOW, D, draft, issued, pay, types

RETRY = (timedelta(days=1), timedelta(days=3), timedelta(days=5), timedelta(days=7))
HARD = frozenset({"stolen_card"})


def rejects(code: str, operation, *args, **kwargs) -> DomainError:
    with pytest.raises(DomainError) as caught:
        operation(*args, **kwargs)
    assert caught.value.code == code, caught.value
    return caught.value


# ---------------------------------------------------------------- creating and money


def test_a_new_invoice_starts_in_draft_with_computed_totals():
    invoice = draft(lines=[("3", "40.00", "0"), ("1", "25.50", "5.50")], tax="9.60",
                    discount={"type": "Percentage", "value": D(5), "code": "W"})
    assert invoice.status == "Draft"
    assert (invoice.subtotal, invoice.discount_amount, invoice.invoice_total) == (D("140.00"), D("7.00"), D("142.60"))
    assert (invoice.amount_paid, invoice.balance) == (D(0), D("142.60"))


def test_subtotal_is_quantity_times_unit_price_less_line_discount_rounded_half_up():
    invoice = draft(lines=[("1.5", "3.33", "0.50")])  # 4.995 → 5.00, less 0.50
    assert invoice.subtotal == D("4.50")


def test_percentage_discount_rounds_half_up():
    invoice = draft(lines=[("1", "10.05", "0")], discount={"type": "Percentage", "value": D(50)})
    assert invoice.discount_amount == D("5.03")  # 5.025 → 5.03


def test_amount_discount_capped_by_subtotal():
    invoice = draft(lines=[("1", "10.00", "0")], discount={"type": "Amount", "value": D("25.00")})
    assert (invoice.discount_amount, invoice.invoice_total) == (D("10.00"), D("0.00"))


def test_line_discount_may_not_exceed_the_line():
    rejects("invalid-line-item", draft, lines=[("1", "10.00", "10.01")])


def test_amounts_may_not_carry_more_decimals_than_the_currency():
    rejects("invalid-amount", draft, "JPY", lines=[("1", "100.5", "0")])
    rejects("invalid-amount", draft, "USD", lines=[("1", "1.005", "0")])
    assert draft("BHD", lines=[("1", "1.005", "0")]).invoice_total == D("1.005")


def test_unknown_currency_is_rejected():
    rejects("unknown-currency", draft, "ABC")


def test_due_date_defaults_from_net_terms():
    assert draft(payment_terms="Net30", invoice_date=date(2026, 1, 31)).due_date == date(2026, 3, 2)
    assert due_date_from_terms(date(2026, 1, 1), "Due on receipt") is None
    assert draft(payment_terms="Net30", due_date=date(2026, 12, 1)).due_date == date(2026, 12, 1)


def test_imported_total_overrides_and_derives_amount_paid():
    invoice = draft(imported_invoice_total=D("500.00"), imported_balance=D("120.00"))
    assert (invoice.invoice_total, invoice.amount_paid, invoice.balance) == (D("500.00"), D("380.00"), D("120.00"))


def test_imported_invoice_starts_draft_when_nothing_paid_else_partially_paid_or_paid():
    assert draft(imported_invoice_total=D("50.00"), imported_balance=D("50.00")).status == "Draft"
    assert draft(imported_invoice_total=D("50.00"), imported_balance=D("20.00")).status == "PartiallyPaid"
    assert draft(imported_invoice_total=D("50.00"), imported_balance=D("0.00")).status == "Paid"


def test_imported_balance_may_not_exceed_the_imported_total():
    rejects("invalid-invoice", draft, imported_invoice_total=D("50.00"), imported_balance=D("60.00"))


# ---------------------------------------------------------------- issue and update


def test_issue_moves_draft_to_issued():
    invoice = draft()
    invoice.issue(now=NOW)
    assert invoice.status == "Issued"
    assert invoice.pending_events[0].data["from"] == "Draft" and invoice.pending_events[0].data["to"] == "Issued"


def test_cannot_issue_an_already_issued_invoice():
    rejects("invalid-state-transition", issued().issue)


def test_update_in_draft_changes_every_field():
    invoice = draft()
    changed = invoice.update({"currency": "EUR", "line_items": [{"quantity": D(2), "unit_price": D("7.00")}],
                              "notes": "n"})
    assert set(changed) == {"currency", "lineItems", "notes"}
    assert (invoice.currency, invoice.invoice_total) == ("EUR", D("14.00"))
    assert types(invoice) == ["invoice.updated"]


def test_update_after_draft_only_notes_due_date_po_and_external_id():
    invoice = issued()
    error = rejects("invoice-not-editable", invoice.update, {"tax_amount": D(1), "notes": "x"})
    assert "taxAmount" in error.message
    assert invoice.notes is None
    assert set(invoice.update({"notes": "x", "due_date": date(2027, 1, 1), "purchase_order_number": "P",
                               "external_id": "E"})) == {"notes", "dueDate", "purchaseOrderNumber", "externalId"}


def test_an_update_that_changes_nothing_records_no_event():
    invoice = draft(notes="same")
    assert invoice.update({"notes": "same"}) == [] and types(invoice) == []


# ---------------------------------------------------------------- payments


def test_pay_a_draft_is_rejected():
    rejects("invalid-state-transition", pay, draft(), "10.00")


def test_payment_amount_must_be_positive_and_within_the_balance():
    invoice = issued()
    rejects("invalid-amount", pay, invoice, "0")
    rejects("amount-exceeds-balance", pay, invoice, "100.01")


def test_payment_currency_must_match():
    rejects("currency-mismatch", pay, issued(), "10.00", "EUR")


def test_status_follows_the_balance_when_paying():
    invoice = issued()
    pay(invoice, "40.00")
    assert (invoice.status, invoice.balance) == ("PartiallyPaid", D("60.00"))
    pay(invoice, "60.00")
    assert (invoice.status, invoice.balance) == ("Paid", D("0.00"))
    assert types(invoice) == ["payment.recorded", "invoice.status_changed", "payment.recorded", "invoice.status_changed"]


def test_a_pending_offline_payment_does_not_move_the_balance():
    invoice = issued()
    invoice.record_payment(payment_id=uuid.uuid4(), amount=D(10), currency="USD", status="Pending", now=NOW)
    assert (invoice.status, invoice.balance) == ("Issued", D("100.00"))


def test_hosted_payment_starts_pending_then_completes():
    invoice = issued()
    payment_id = uuid.uuid4()
    assert invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", now=NOW)
    assert invoice.balance == D("100.00")
    assert not invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", now=NOW)
    assert invoice.complete_payment(payment_id=payment_id, now=NOW)
    assert (invoice.status, invoice.balance) == ("Paid", D("0.00"))
    assert not invoice.complete_payment(payment_id=payment_id, now=NOW)  # a duplicate


def test_partial_approval_records_the_approved_amount():
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", now=NOW)
    invoice.complete_payment(payment_id=payment_id, approved_amount=D(30), transaction_id="T1", now=NOW)
    payment = invoice.payment(payment_id)
    assert (payment.amount, payment.requested_amount, invoice.balance) == (D(30), D(100), D("70.00"))
    assert invoice.pending_events[-2].data["differsFromRequested"] is True


def test_completing_an_unknown_payment_waits_for_it():
    with pytest.raises(PaymentNotYetKnown):
        issued().complete_payment(payment_id=uuid.uuid4(), now=NOW)


def test_a_conflicting_result_for_a_final_payment_is_rejected():
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", now=NOW)
    invoice.complete_payment(payment_id=payment_id, transaction_id="T1", now=NOW)
    rejects("payment-already-final", invoice.fail_payment, payment_id=payment_id, failure_code="05",
            failure_reason="Declined", now=NOW)
    rejects("payment-already-final", invoice.complete_payment, payment_id=payment_id, transaction_id="T2", now=NOW)


def test_fail_payment_keeps_the_balance_and_the_reason():
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", now=NOW)
    assert invoice.fail_payment(payment_id=payment_id, failure_code="05", failure_reason="Do not honour", now=NOW)
    payment = invoice.payment(payment_id)
    assert (payment.status, payment.failure_code, invoice.balance) == ("Failed", "05", D("100.00"))
    assert not invoice.fail_payment(payment_id=payment_id, failure_code="05", failure_reason="x", now=NOW)


# ---------------------------------------------------------------- retries


def failed_card_payment(code: str = "05"):
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", payment_profile_id="card",
                                 now=NOW)
    invoice.fail_payment(payment_id=payment_id, failure_code=code, failure_reason="r", retry_after=RETRY,
                         hard_decline_codes=HARD, now=NOW)
    return invoice, invoice.payment(payment_id)


def test_failed_saved_card_payment_is_due_for_retry_a_day_after_the_first_failure():
    invoice, failed = failed_card_payment()
    assert failed.next_retry_at == NOW + timedelta(days=1)


def test_a_payment_without_a_saved_card_is_not_retried():
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(100), currency="USD", now=NOW)
    invoice.fail_payment(payment_id=payment_id, failure_code="05", failure_reason="r", retry_after=RETRY, now=NOW)
    assert invoice.payment(payment_id).next_retry_at is None


def test_hard_decline_publishes_retries_exhausted_and_schedules_nothing():
    invoice, failed = failed_card_payment("stolen_card")
    assert failed.next_retry_at is None
    assert types(invoice)[-1] == "payment.retries_exhausted"
    assert invoice.pending_events[-1].data["reason"] == "hard-decline"


def test_a_retry_is_a_pending_attempt_for_the_balance_capped_by_the_original_amount():
    invoice, failed = failed_card_payment()
    pay(invoice, "30.00")
    retry = invoice.request_retry(failed, uuid.uuid4(), now=NOW + timedelta(days=1))
    assert (retry.status, retry.amount, retry.retry_of, retry.attempt) == ("Pending", D("70.00"), failed.id, 1)
    assert failed.next_retry_at is None and types(invoice)[-1] == "payment.retry_requested"


def test_retries_follow_the_schedule_from_the_first_failure_then_are_exhausted_once():
    invoice, failed = failed_card_payment()
    current = failed
    for attempt, day in enumerate((1, 3, 5, 7), start=1):
        retry = invoice.request_retry(current, uuid.uuid4(), now=NOW + timedelta(days=day))
        invoice.fail_payment(payment_id=retry.payment_id, failure_code="05", failure_reason="r", retry_after=RETRY,
                             hard_decline_codes=HARD, now=NOW + timedelta(days=day))
        current = retry
        expected = NOW + RETRY[attempt] if attempt < 4 else None
        assert current.next_retry_at == expected
    assert types(invoice).count("payment.retries_exhausted") == 1


def test_paying_voiding_or_cancelling_ends_the_retries():
    invoice, failed = failed_card_payment()
    pay(invoice, "100.00")
    assert failed.next_retry_at is None
    invoice, failed = failed_card_payment()
    invoice.void(now=NOW)
    assert failed.next_retry_at is None
    invoice, failed = failed_card_payment()
    invoice.cancel(now=NOW)
    assert failed.next_retry_at is None and invoice.request_retry(failed, uuid.uuid4()) is None


# ---------------------------------------------------------------- refunds


def test_refunds_several_per_payment_up_to_its_net_amount():
    invoice = issued()
    payment_id = pay(invoice, "60.00")
    invoice.refund(refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(20), now=NOW)
    invoice.refund(refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(30), now=NOW)
    rejects("amount-exceeds-refundable", invoice.refund, refund_id=uuid.uuid4(), payment_id=payment_id,
            amount=D("10.01"), now=NOW)
    assert invoice.payment(payment_id).net_amount == D("10.00") and invoice.balance == D("90.00")


def test_refund_of_a_paid_invoice_falls_back_to_partially_paid():
    invoice = issued()
    payment_id = pay(invoice, "100.00")
    invoice.refund(refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(1), now=NOW)
    assert (invoice.status, invoice.balance) == ("PartiallyPaid", D("1.00"))


def test_refund_of_everything_falls_back_to_issued():
    invoice = issued()
    payment_id = pay(invoice, "100.00")
    invoice.refund(refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(100), now=NOW)
    assert (invoice.status, invoice.amount_paid) == ("Issued", D(0))


def test_only_completed_payments_can_be_refunded():
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(10), currency="USD", now=NOW)
    rejects("payment-not-completed", invoice.refund, refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(1))
    rejects("payment-not-found", invoice.refund, refund_id=uuid.uuid4(), payment_id=uuid.uuid4(), amount=D(1))


# ---------------------------------------------------------------- discounts


def test_applying_a_discount_replaces_the_existing_one():
    invoice = draft(discount={"type": "Amount", "value": D(10)})
    invoice.apply_discount({"type": "Percentage", "value": D(20), "code": "B"})
    assert (invoice.discount["code"], invoice.discount_amount, invoice.invoice_total) == ("B", D("20.00"), D("80.00"))


def test_discount_may_not_bring_total_below_amount_paid():
    invoice = issued()
    pay(invoice, "90.00")
    rejects("total-below-amount-paid", invoice.apply_discount, {"type": "Amount", "value": D(11)})
    invoice.apply_discount({"type": "Amount", "value": D(10)})
    assert (invoice.status, invoice.balance) == ("Paid", D("0.00"))  # the status follows the balance


def test_discount_only_in_draft_issued_or_partially_paid():
    invoice = issued()
    pay(invoice, "100.00")
    rejects("invalid-state-transition", invoice.apply_discount, {"type": "Amount", "value": D(1)})


def test_an_overpaid_invoice_still_takes_a_notes_update():
    invoice = issued(lines=[("1", "0.00", "0")], tax="0.06")
    hosted = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=hosted, amount=D("0.06"), currency="USD", now=NOW)
    pay(invoice, "0.01")
    invoice.complete_payment(payment_id=hosted, now=NOW)  # pending attempts reserve nothing: 0.07 paid of 0.06
    assert (invoice.status, invoice.balance) == ("Paid", D("-0.01"))
    assert invoice.update({"notes": "overpaid by 0.01"}, now=NOW) == ["notes"]
    assert invoice.notes == "overpaid by 0.01"


def test_remove_discount_keeps_line_discounts():
    invoice = draft(lines=[("1", "100.00", "10.00")], discount={"type": "Amount", "value": D(5)})
    invoice.remove_discount()
    assert (invoice.discount, invoice.invoice_total) == (None, D("90.00"))


def test_a_percentage_discount_over_100_is_rejected():
    rejects("invalid-discount", draft().apply_discount, {"type": "Percentage", "value": D(101)})


# ---------------------------------------------------------------- void, cancel, delete, soft delete


def test_void_only_from_draft_or_issued():
    invoice = issued()
    pay(invoice, "10.00")
    rejects("invalid-state-transition", invoice.void)
    draft_invoice = draft()
    draft_invoice.void(now=NOW)
    assert draft_invoice.status == "Voided"


def test_void_rejected_while_a_completed_payment_is_unrefunded():
    invoice = issued(lines=[("1", "100.00", "0")])
    payment_id = pay(invoice, "100.00")
    invoice.refund(refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(40), now=NOW)
    assert invoice.status == "PartiallyPaid"
    invoice.status = "Issued"  # as an adjusted invoice could be: only the unrefunded money blocks the void
    error = rejects("invoice-has-payments", invoice.void)
    assert "1 completed payment (60.00 USD); refund it first" in error.message
    invoice.refund(refund_id=uuid.uuid4(), payment_id=payment_id, amount=D(60), now=NOW)
    invoice.void(now=NOW)  # refunded in full: Issued again, and voidable
    assert invoice.status == "Voided"


def test_void_names_the_unrefunded_payments():
    invoice = issued()
    payment_id = uuid.uuid4()
    invoice.start_hosted_payment(payment_id=payment_id, amount=D(20), currency="USD", now=NOW)
    invoice.complete_payment(payment_id=payment_id, now=NOW)
    invoice.status = "Issued"  # as an imported or adjusted invoice could be
    error = rejects("invoice-has-payments", invoice.void)
    assert "1 completed payment (20.00 USD); refund it first" in error.message


def test_cancel_keeps_the_record():
    invoice = issued()
    pay(invoice, "10.00")
    invoice.cancel(now=NOW)
    assert invoice.status == "Cancelled" and len(invoice.payments) == 1 and not invoice.is_deleted


def test_voided_and_cancelled_are_final():
    for end in ("void", "cancel"):
        invoice = issued()
        getattr(invoice, end)(now=NOW)
        for operation in (invoice.issue, invoice.void, invoice.cancel, invoice.delete, invoice.remove_discount):
            rejects("invalid-state-transition", operation)
        rejects("invalid-state-transition", pay, invoice, "1.00")


def test_delete_only_draft_without_payment_history():
    rejects("invalid-state-transition", issued().delete)
    invoice = draft()
    invoice.delete()
    assert invoice.is_deleted and types(invoice) == ["invoice.deleted"]


def test_soft_delete_and_restore():
    invoice = draft()
    assert invoice.deactivate(now=NOW) and not invoice.is_active
    assert not invoice.deactivate(now=NOW)
    assert invoice.restore(now=NOW) and invoice.is_active


def test_a_zero_total_invoice_is_paid_when_issued():
    invoice = draft(lines=[("1", "0.00", "0")])
    invoice.issue(now=NOW)
    assert invoice.status == "Paid"
