"""Random sequences of invoice operations, with the invariants checked after every step:
balance = invoiceTotal − amountPaid; the status follows the balance in Issued, PartiallyPaid and
Paid; refunds never exceed their payment; Voided, Cancelled and deleted are final; nothing goes
negative that must not; a rejected operation changes nothing.

The machine knows the rules too: before each operation it works out, from the invoice as it stands,
whether the contract allows it and with which reason code it must be rejected otherwise. An operation
rejected that the rules allow, or allowed that the rules forbid, fails the test."""

from __future__ import annotations

import copy
import json
import uuid
from datetime import timedelta
from decimal import Decimal

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from models.errors import DomainError
from models.invoice import Invoice
from models.money import minor_unit
from models.payment import PaymentStatus
from models.rules import order_discount
from tests.unit.domain_builders import NOW

CURRENCIES = ("USD", "JPY", "BHD")
RETRY = (timedelta(days=1), timedelta(days=3))
PAYABLE = ("Issued", "PartiallyPaid")
SETTLING = ("Issued", "PartiallyPaid", "Paid")
DISCOUNTABLE = ("Draft", "Issued", "PartiallyPaid")
Rules = list[tuple[bool, str]]


def first_broken(rules: Rules) -> str | None:
    """The reason code of the first rule (forbidden?, code) an operation breaks; None when it breaks none."""
    return next((code for forbidden, code in rules if forbidden), None)


def amounts(currency: str, low: int = 0, high: int = 20_000) -> st.SearchStrategy[Decimal]:
    places = minor_unit(currency)
    return st.integers(low, high * 10**places).map(lambda n: Decimal(n).scaleb(-places))


class InvoiceMachine(RuleBasedStateMachine):
    @initialize(currency=st.sampled_from(CURRENCIES), data=st.data())
    def create(self, currency: str, data: st.DataObject) -> None:
        self.currency = currency
        lines = data.draw(st.lists(st.tuples(st.integers(1, 5), amounts(currency, 0, 500)), min_size=1, max_size=4))
        tax = data.draw(amounts(currency, 0, 50))
        self.invoice = Invoice.create(tenant_id="t", invoice_number="INV-1", now=NOW, content={
            "currency": currency, "tax_amount": tax,
            "line_items": [{"quantity": Decimal(q), "unit_price": p} for q, p in lines]})
        self.final = False
        self.deleted_snapshot: str | None = None

    # ------------------------------------------------------------------ helpers

    def attempt(self, rules: Rules, operation, *args, **kwargs):
        """Run an operation that the rules (forbidden?, reason code), checked in order, allow or forbid.
        Allowed, it must succeed; forbidden, it must be rejected with the first broken rule's code
        and leave the invoice exactly as it was."""
        expected = first_broken(rules)
        before = self.snapshot()
        try:
            result = operation(*args, **kwargs)
        except DomainError as error:
            assert self.snapshot() == before, f"{operation.__name__} was rejected but changed the invoice"
            assert expected is not None, f"{operation.__name__} was rejected ({error}) but the rules allow it"
            assert error.code == expected, f"{operation.__name__} was rejected {error.code}, expected {expected}"
            return None
        assert expected is None, f"{operation.__name__} succeeded but the rules forbid it ({expected})"
        return result

    def state_rules(self, allowed: tuple[str, ...]) -> Rules:
        """A deleted invoice is not found; otherwise the operation needs one of the allowed states."""
        return [(self.invoice.is_deleted, "invoice-not-found"),
                (self.invoice.status not in allowed, "invalid-state-transition")]

    def payment_rules(self, amount: Decimal) -> Rules:
        """Offline and hosted payments: Issued or PartiallyPaid, amount > 0 and ≤ balance."""
        return [*self.state_rules(PAYABLE), (amount <= 0, "invalid-amount"),
                (amount > self.invoice.balance, "amount-exceeds-balance")]

    def snapshot(self) -> str:
        data = copy.deepcopy(self.invoice.to_json())
        data.pop("updatedAt")
        return json.dumps(data, sort_keys=True, default=str)

    def payable_amount(self, data: st.DataObject) -> Decimal:
        """Mostly a share of the balance (so that invoices get paid), sometimes anything."""
        balance = max(self.invoice.balance, Decimal(0))
        places = minor_unit(self.currency)
        share = st.integers(1, 10).map(lambda k: (balance * k / 10).quantize(Decimal(1).scaleb(-places)))
        return data.draw(st.one_of(share, share, amounts(self.currency, 0, 600)))

    def payment_ids(self, status: str | None = None) -> list[uuid.UUID]:
        return [p.payment_id for p in self.invoice.payments if status is None or p.status == status]

    # ------------------------------------------------------------------ rules

    @rule()
    def issue(self) -> None:
        self.attempt(self.state_rules(("Draft",)), self.invoice.issue, now=NOW)

    @rule(data=st.data())
    def record_payment(self, data: st.DataObject) -> None:
        amount = self.payable_amount(data)
        self.attempt(self.payment_rules(amount), self.invoice.record_payment, payment_id=uuid.uuid4(), amount=amount, currency=self.currency,
                     now=NOW)

    @rule(data=st.data(), profile=st.booleans())
    def start_hosted_payment(self, data: st.DataObject, profile: bool) -> None:
        amount = self.payable_amount(data)
        self.attempt(self.payment_rules(amount), self.invoice.start_hosted_payment, payment_id=uuid.uuid4(), amount=amount,
                     currency=self.currency, payment_profile_id="card" if profile else None, now=NOW)

    @precondition(lambda self: self.invoice.payments)
    @rule(data=st.data(), partial=st.booleans())
    def complete_payment(self, data: st.DataObject, partial: bool) -> None:
        payment_id = data.draw(st.sampled_from(self.payment_ids()))
        approved = data.draw(amounts(self.currency, 0, 600)) if partial else None
        status = self.invoice.payment(payment_id).status
        # A completed payment again (no other transaction here) is a duplicate; a failed one is final.
        rules = [] if status == "Completed" else [(status == "Failed", "payment-already-final"),
                                                  *self.state_rules(SETTLING),
                                                  (approved is not None and approved <= 0, "invalid-amount")]
        self.attempt(rules, self.invoice.complete_payment, payment_id=payment_id, approved_amount=approved,
                     transaction_id=f"T-{payment_id}", now=NOW)

    @precondition(lambda self: self.invoice.payments)
    @rule(data=st.data(), hard=st.booleans())
    def fail_payment(self, data: st.DataObject, hard: bool) -> None:
        payment_id = data.draw(st.sampled_from(self.payment_ids()))
        completed = self.invoice.payment(payment_id).status == "Completed"
        self.attempt([(completed, "payment-already-final")], self.invoice.fail_payment, payment_id=payment_id, failure_code="stolen_card" if hard else "05",
                     failure_reason="declined", retry_after=RETRY, hard_decline_codes=frozenset({"stolen_card"}),
                     now=NOW)

    @precondition(lambda self: any(p.next_retry_at for p in self.invoice.payments))
    @rule(data=st.data())
    def request_retry(self, data: st.DataObject) -> None:
        due = [p for p in self.invoice.payments if p.next_retry_at is not None]
        failed = data.draw(st.sampled_from(due))
        payable = self.invoice.status in ("Issued", "PartiallyPaid") and self.invoice.balance > 0
        retry = self.invoice.request_retry(failed, uuid.uuid4(), now=NOW + timedelta(days=10))
        assert (retry is not None) == payable
        if retry is not None:
            assert retry.amount <= self.invoice.balance and retry.retry_of == failed.id

    @precondition(lambda self: self.invoice.payments)
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        payment_id = data.draw(st.sampled_from(self.payment_ids()))
        amount = data.draw(amounts(self.currency, 0, 600))
        payment = self.invoice.payment(payment_id)
        rules = [*self.state_rules((*SETTLING, "Cancelled")), (payment.status != "Completed", "payment-not-completed"),
                 (amount <= 0, "invalid-amount"), (amount > payment.net_amount, "amount-exceeds-refundable")]
        self.attempt(rules, self.invoice.refund, refund_id=uuid.uuid4(), payment_id=payment_id, amount=amount, now=NOW)

    @rule(data=st.data(), percentage=st.booleans())
    def apply_discount(self, data: st.DataObject, percentage: bool) -> None:
        value = data.draw(st.integers(0, 100).map(Decimal)) if percentage else data.draw(amounts(self.currency, 0, 800))
        discount = {"type": "Percentage" if percentage else "Amount", "value": value}
        inv = self.invoice
        new_total = inv.subtotal - order_discount(discount, inv.subtotal, inv.currency) + inv.tax_amount
        rules = [*self.state_rules(DISCOUNTABLE), (new_total < inv.amount_paid, "total-below-amount-paid")]
        self.attempt(rules, inv.apply_discount, discount, now=NOW)

    @rule()
    def remove_discount(self) -> None:
        self.attempt(self.state_rules(DISCOUNTABLE), self.invoice.remove_discount, now=NOW)

    # The ends of an invoice's life are tried less often, so that sequences have a middle.
    @rule(now=st.integers(0, 3))
    def void(self, now: int) -> None:
        if now == 0:
            unrefunded = any(p.net_amount > 0 for p in self.invoice.payments)
            self.attempt([*self.state_rules(("Draft", "Issued")), (unrefunded, "invoice-has-payments")],
                         self.invoice.void, now=NOW)

    @rule(now=st.integers(0, 3))
    def cancel(self, now: int) -> None:
        if now == 0:
            self.attempt(self.state_rules(DISCOUNTABLE), self.invoice.cancel, now=NOW)

    @rule(now=st.integers(0, 3))
    def delete(self, now: int) -> None:
        if now == 0:
            self.attempt([*self.state_rules(("Draft",)), (bool(self.invoice.payments), "invoice-has-payments")],
                         self.invoice.delete)

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        changes = data.draw(st.sampled_from([
            {"notes": "changed"},
            {"tax_amount": Decimal(1)},
            {"line_items": [{"quantity": Decimal(2), "unit_price": Decimal(10)}]},
        ]))
        # After Draft only notes (of these) may change; a Draft has nothing paid, so its total may move.
        late = "notes" in changes
        rules = [(self.invoice.is_deleted, "invoice-not-found"),
                 (not late and self.invoice.status != "Draft", "invoice-not-editable")]
        self.attempt(rules, self.invoice.update, changes, now=NOW)

    @rule(active=st.booleans())
    def soft_delete_or_restore(self, active: bool) -> None:
        self.attempt([(self.invoice.is_deleted, "invoice-not-found")],
                     self.invoice.restore if active else self.invoice.deactivate, now=NOW)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def balance_is_total_less_paid(self) -> None:
        inv = self.invoice
        event(f"status {inv.status}{' (refunded)' if any(p.refunds for p in inv.payments) else ''}")
        assert inv.balance == inv.invoice_total - inv.amount_paid
        recomputed = inv.imported_amount_paid + sum((p.net_amount for p in inv.payments), Decimal(0))
        assert inv.amount_paid == recomputed, "amountPaid drifted from the payments"

    @invariant()
    def status_follows_the_balance(self) -> None:
        inv = self.invoice
        if inv.status in ("Issued", "PartiallyPaid", "Paid"):
            expected = "Paid" if inv.balance <= 0 else ("Issued" if inv.amount_paid <= 0 else "PartiallyPaid")
            assert inv.status == expected, (inv.status, inv.balance, inv.amount_paid)

    @invariant()
    def refunds_never_exceed_their_payment(self) -> None:
        for payment in self.invoice.payments:
            assert payment.refunded_amount <= payment.amount
            if payment.refunds:
                assert payment.status == PaymentStatus.COMPLETED

    @invariant()
    def nothing_negative_that_must_not_be(self) -> None:
        inv = self.invoice
        for value in (inv.subtotal, inv.discount_amount, inv.tax_amount, inv.invoice_total, inv.amount_paid):
            assert value >= 0
        assert inv.discount_amount <= inv.subtotal
        assert all(p.amount > 0 for p in inv.payments)

    @invariant()
    def amounts_fit_the_currency(self) -> None:
        places = minor_unit(self.invoice.currency)
        inv = self.invoice
        for value in (inv.subtotal, inv.discount_amount, inv.invoice_total, inv.amount_paid, inv.balance):
            assert -value.normalize().as_tuple().exponent <= places or value == 0

    @invariant()
    def final_states_stay_final(self) -> None:
        if self.final:
            assert self.invoice.status == self.final_status
        if self.invoice.status in ("Voided", "Cancelled") and not self.final:
            self.final, self.final_status = True, self.invoice.status
            assert all(p.next_retry_at is None for p in self.invoice.payments)

    @invariant()
    def deleted_only_from_a_draft_without_payments_and_final(self) -> None:
        if self.invoice.is_deleted:
            assert self.invoice.status == "Draft" and not self.invoice.payments
            if self.deleted_snapshot is None:
                self.deleted_snapshot = self.snapshot()
            assert self.snapshot() == self.deleted_snapshot, "a deleted invoice changed"


InvoiceMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=30, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestInvoiceStateMachine = InvoiceMachine.TestCase
