"""Payment ids are chosen by publishers (`paymentId` of start_hosted_payment), so two tenants may
choose the same one: each names its own payment, and neither learns of the other's."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import select

from tests.conftest import dead_letters_of, invoice_json, new_tenant, send, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice
from tests.end_to_end.test_payments import callback, deliver, payment_of
from worker.storage import db
from worker.storage.records import OutboxEvent


def start_with(tenant: str, number: str, payment_id: str, amount: str) -> dict:
    body = {"messageId": f"start-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": number,
            "paymentId": payment_id, "amount": amount, "currency": "USD", "paymentProfileId": "card-1"}
    send("invoices.start_hosted_payment", body)
    return {**wait_outcome(tenant, body["messageId"]), "messageId": body["messageId"]}


def events_of(tenant: str) -> list[dict]:
    with db.sessions()() as s:
        return list(s.scalars(select(OutboxEvent.payload).where(OutboxEvent.tenant_id == tenant)))


def test_two_tenants_may_start_payments_with_the_same_id_and_each_pays_its_own(running):
    tenant_b, tenant_a = new_tenant("t-pid-b"), new_tenant("t-pid-a")
    invoice_b, invoice_a = issued_invoice(tenant_b), issued_invoice(tenant_a)
    shared = str(uuid.uuid4())
    assert start_with(tenant_b, invoice_b["invoiceNumber"], shared, "100.00")["outcome"] == "applied"

    # Tenant A chooses the same paymentId for its own invoice (by accident or to probe B).
    mine = start_with(tenant_a, invoice_a["invoiceNumber"], shared, "42.60")
    assert mine["outcome"] == "applied", mine
    assert dead_letters_of(mine["messageId"]) == []
    again = start_with(tenant_a, invoice_a["invoiceNumber"], shared, "42.60")
    assert (again["outcome"], again["reason"]) == ("duplicate", "payment-already-started")

    b_before = payment_of(tenant_b, invoice_b["invoiceNumber"], shared)
    assert (b_before["status"], b_before["amount"]) == ("Pending", "100.00")
    a_payment = payment_of(tenant_a, invoice_a["invoiceNumber"], shared)
    assert (a_payment["status"], a_payment["amount"]) == ("Pending", "42.60")

    # Each completes independently: A's callback pays A's invoice and leaves B's payment Pending.
    approved = callback(tenant_a, invoice_a["invoiceNumber"], shared, "Approved", amount="42.60")
    assert deliver(approved)["outcome"] == "applied"
    assert payment_of(tenant_a, invoice_a["invoiceNumber"], shared)["status"] == "Completed"
    assert invoice_json(tenant_a, invoice_a["invoiceNumber"])["balance"] == "100.00"
    assert payment_of(tenant_b, invoice_b["invoiceNumber"], shared) == b_before
    assert invoice_json(tenant_b, invoice_b["invoiceNumber"])["balance"] == "142.60"

    declined = callback(tenant_b, invoice_b["invoiceNumber"], shared, "Declined", amount=None)
    assert deliver(declined)["outcome"] == "applied"
    assert payment_of(tenant_b, invoice_b["invoiceNumber"], shared)["status"] == "Failed"
    assert payment_of(tenant_a, invoice_a["invoiceNumber"], shared)["status"] == "Completed"

    # Nothing tenant A was told or can read names tenant B or B's invoice.
    told_a = json.dumps([mine, again, events_of(tenant_a), invoice_json(tenant_a, invoice_a["invoiceNumber"])],
                        default=str)
    for secret in (tenant_b, invoice_b["id"]):
        assert secret not in told_a
    assert shared in told_a  # A's own payment, under the id A chose
