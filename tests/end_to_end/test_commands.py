"""Every invoice command through a real worker: outcomes, natural keys and reason codes."""

from __future__ import annotations

import uuid

from tests.conftest import invoice_json, new_tenant, order_body, send, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice, payment


def command(task: str, tenant: str, **fields) -> dict:
    body = {"messageId": f"c-{uuid.uuid4()}", "tenantId": tenant, **fields}
    send(task, body)
    return {**wait_outcome(tenant, body["messageId"]), "messageId": body["messageId"]}


def create_body(**fields) -> dict:
    return {"currency": "USD", "customer": {"customerId": "C-1", "companyName": "Initech"},
            "lineItems": [{"sku": "A", "quantity": "2", "unitPrice": "10.00"}], "paymentTerms": "Net15", **fields}



def test_create(running):
    T = new_tenant("t-cmd")
    first = command("invoices.create", T, **create_body())
    second = command("invoices.create", T, **create_body())
    other_tenant = command("invoices.create", new_tenant("t-cmd-2"), **create_body())
    assert (first["invoiceNumber"], second["invoiceNumber"], other_tenant["invoiceNumber"]) == (
        "INV-00001", "INV-00002", "INV-00001")
    assert invoice_json(T, "INV-00001")["status"] == "Draft"
    given = command("invoices.create", T, **create_body(invoiceNumber="LEGACY-9"))
    assert given["outcome"] == "applied" and given["invoiceNumber"] == "LEGACY-9"
    same = command("invoices.create", T, **create_body(invoiceNumber="LEGACY-9"))
    assert same["outcome"] == "duplicate"
    different = command("invoices.create", T, **create_body(invoiceNumber="LEGACY-9", notes="other"))
    assert (different["outcome"], different["reason"]) == ("rejected", "duplicate-invoice-number")
    assert invoice_json(T, "LEGACY-9")["notes"] is None


def test_order_shipped_makes_one_invoice_per_order_and_shipment(running):
    T = new_tenant("t-cmd")
    body = order_body(tenant=T, shipmentId="S-1", invoiceNumber="ORD-INV-1")
    send("invoices.order_shipped", body)
    assert wait_outcome(T, body["messageId"])["invoiceNumber"] == "ORD-INV-1"
    again = {**body, "messageId": f"m-{uuid.uuid4()}"}
    send("invoices.order_shipped", again)
    assert wait_outcome(T, again["messageId"])["outcome"] == "duplicate"
    second_shipment = {**body, "messageId": f"m-{uuid.uuid4()}", "shipmentId": "S-2"}
    second_shipment.pop("invoiceNumber")
    send("invoices.order_shipped", second_shipment)
    assert wait_outcome(T, second_shipment["messageId"])["outcome"] == "applied"
    taken = order_body(tenant=T, invoiceNumber="ORD-INV-1")
    send("invoices.order_shipped", taken)
    assert wait_outcome(T, taken["messageId"])["reason"] == "duplicate-invoice-number"


def test_update_issue_and_what_stays_editable(running):
    T = new_tenant("t-cmd")
    number = command("invoices.create", T, **create_body())["invoiceNumber"]
    assert command("invoices.update", T, invoiceNumber=number,
                   lineItems=[{"quantity": "3", "unitPrice": "10.00"}])["outcome"] == "applied"
    assert invoice_json(T, number)["invoiceTotal"] == "30.00"
    assert command("invoices.issue", T, invoiceNumber=number)["outcome"] == "applied"
    again = command("invoices.issue", T, invoiceNumber=number)
    assert (again["outcome"], again["reason"]) == ("rejected", "invalid-state-transition")
    locked = command("invoices.update", T, invoiceNumber=number, currency="EUR", notes="x")
    assert (locked["outcome"], locked["reason"]) == ("rejected", "invoice-not-editable")
    assert "currency" in locked["detail"]
    assert command("invoices.update", T, invoiceNumber=number, notes="call first", dueDate="2027-01-31",
                   purchaseOrderNumber="PO-1", externalId="X-1")["outcome"] == "applied"
    after = invoice_json(T, number)
    assert (after["notes"], after["dueDate"], after["currency"]) == ("call first", "2027-01-31", "USD")


def test_discounts_refunds_and_the_final_states(running):
    T = new_tenant("t-cmd")
    invoice = issued_invoice(T)
    number = invoice["invoiceNumber"]
    assert command("invoices.apply_discount", T, invoiceNumber=number,
                   discount={"type": "Amount", "value": "40.00", "code": "X"})["outcome"] == "applied"
    assert invoice_json(T, number)["discountAmount"] == "40.00"
    assert command("invoices.remove_discount", T, invoiceNumber=number)["outcome"] == "applied"
    assert invoice_json(T, number)["invoiceTotal"] == "149.60"  # 140.00 + 9.60 tax, line discounts kept
    pay = payment(T, number, "49.60")
    send("invoices.record_payment", pay)
    recorded = wait_outcome(T, pay["messageId"])
    paid = invoice_json(T, number)["payments"][0]["paymentId"]
    blocked = command("invoices.void", T, invoiceNumber=number)
    assert blocked["reason"] == "invalid-state-transition"  # PartiallyPaid cannot be voided
    too_big = command("invoices.apply_discount", T, invoiceNumber=number, discount={"type": "Percentage", "value": "100"})
    assert too_big["reason"] == "total-below-amount-paid"
    over = command("invoices.refund_payment", T, invoiceNumber=number, paymentId=paid, amount="60.00")
    assert over["reason"] == "amount-exceeds-refundable"
    for amount in ("9.60", "40.00"):
        assert command("invoices.refund_payment", T, invoiceNumber=number, paymentId=paid, amount=amount)["outcome"] == "applied"
    refunded = invoice_json(T, number)
    assert (refunded["status"], refunded["amountPaid"]) == ("Issued", "0.00")
    assert len(refunded["payments"][0]["refunds"]) == 2
    assert command("invoices.void", T, invoiceNumber=number)["outcome"] == "applied"
    final = command("invoices.cancel", T, invoiceNumber=number)
    assert (final["outcome"], final["reason"]) == ("rejected", "invalid-state-transition")
    assert recorded["outcome"] == "applied"


def test_delete_and_cancel(running):
    T = new_tenant("t-cmd")
    draft = command("invoices.create", T, **create_body())["invoiceNumber"]
    gone = command("invoices.delete", T, invoiceNumber=draft)
    assert gone["outcome"] == "applied" and invoice_json(T, draft) is None
    missing = command("invoices.delete", T, invoiceNumber=draft)
    assert missing["reason"] == "invoice-not-found"
    issued = issued_invoice(T)["invoiceNumber"]
    assert command("invoices.delete", T, invoiceNumber=issued)["reason"] == "invalid-state-transition"
    assert command("invoices.cancel", T, invoiceNumber=issued)["outcome"] == "applied"
    kept = invoice_json(T, issued)
    assert kept["status"] == "Cancelled" and len(kept["lineItems"]) == 2
    # Draft and PartiallyPaid cancel too, the payment kept whole for audit
    draft = command("invoices.create", T, **create_body())["invoiceNumber"]
    assert command("invoices.cancel", T, invoiceNumber=draft)["outcome"] == "applied"
    part = issued_invoice(T)["invoiceNumber"]
    assert wait_outcome(T, send("invoices.record_payment", payment(T, part, "10.00")))["outcome"] == "applied"
    assert command("invoices.cancel", T, invoiceNumber=part)["outcome"] == "applied"
    assert invoice_json(T, part)["status"] == "Cancelled" and invoice_json(T, part)["amountPaid"] == "10.00"
    # Cancelled is final: every change tried afterwards is rejected and changes nothing
    for number in (issued, draft, part):
        before = invoice_json(T, number)
        tries = {
            "invoices.issue": {}, "invoices.cancel": {}, "invoices.void": {}, "invoices.delete": {},
            "invoices.record_payment": {"amount": "1.00", "currency": "USD", "paymentMethod": "EFT"},
            "invoices.apply_discount": {"discount": {"code": "X", "type": "Amount", "value": "1.00"}},
            "invoices.update": {"lineItems": [{"quantity": "1", "unitPrice": "1.00"}]},
        }
        for task, fields in tries.items():
            tried = command(task, T, invoiceNumber=number, **fields)
            assert tried["outcome"] == "rejected", (number, task, tried)
        assert invoice_json(T, number) == before, f"{number} changed after it was cancelled"


def test_an_address_whose_number_and_id_disagree_is_rejected(running):
    T = new_tenant("t-cmd")
    a = command("invoices.create", T, **create_body())
    b = command("invoices.create", T, **create_body())
    mixed = command("invoices.issue", T, invoiceNumber=a["invoiceNumber"], invoiceId=str(b["invoiceId"]))
    assert (mixed["outcome"], mixed["reason"]) == ("rejected", "invoice-address-mismatch")
    assert invoice_json(T, a["invoiceNumber"])["status"] == "Draft"


def test_computed_amounts_round_half_up_to_the_currency(running):
    T = new_tenant("t-cmd")
    # 50% of 1.05 is 0.525: half-up gives 0.53 (half-even would give 0.52)
    usd = command("invoices.create", T, **create_body(lineItems=[{"quantity": "1", "unitPrice": "1.05"}],
                                                      discount={"type": "Percentage", "value": "50"}))
    assert usd["outcome"] == "applied"
    shown = invoice_json(T, usd["invoiceNumber"])
    assert (shown["discountAmount"], shown["invoiceTotal"]) == ("0.53", "0.52")
    # JPY has no minor unit: 25% of 10 is 2.5, rounded half-up to 3
    jpy = command("invoices.create", T, **create_body(currency="JPY", lineItems=[{"quantity": "1", "unitPrice": "10"}],
                                                      discount={"type": "Percentage", "value": "25"}))
    shown = invoice_json(T, jpy["invoiceNumber"])
    assert (shown["discountAmount"], shown["invoiceTotal"]) == ("3", "7")


# ---------------------------------------------------------------- their events, as a kombu consumer reads them


def test_an_update_publishes_invoice_updated(running, events):
    T = new_tenant("t-cmd-ev")
    created = command("invoices.create", T, **create_body())
    changed = command("invoices.update", T, invoiceNumber=created["invoiceNumber"], notes="call first",
                      lineItems=[{"quantity": "3", "unitPrice": "10.00"}])
    assert changed["outcome"] == "applied"
    unchanged = command("invoices.update", T, invoiceNumber=created["invoiceNumber"], notes="call first")
    assert unchanged["outcome"] == "applied"
    # the no-op update publishes nothing; a marker after it shows nothing else was coming
    marker = command("invoices.issue", T, invoiceNumber=created["invoiceNumber"])
    events.wait(lambda e: any(x["causationId"] == marker["messageId"] for x in e), what="the marker's event")
    assert [(e["type"], e["causationId"]) for e in events.of(T)] == [
        ("invoice.created", created["messageId"]), ("invoice.updated", changed["messageId"]),
        ("invoice.status_changed", marker["messageId"])]
    updated = events.of(T)[1]
    assert (updated["invoiceId"], updated["invoiceNumber"], updated["sequence"]) == (
        str(created["invoiceId"]), created["invoiceNumber"], 2)
    assert set(updated["data"]["changes"]) == {"notes", "lineItems"}
    assert (updated["data"]["invoiceTotal"], updated["data"]["balance"]) == ("30.00", "30.00")


def test_a_delete_publishes_invoice_deleted(running, events):
    T = new_tenant("t-cmd-ev")
    created = command("invoices.create", T, **create_body())
    gone = command("invoices.delete", T, invoiceNumber=created["invoiceNumber"])
    assert gone["outcome"] == "applied"
    events.wait(lambda e: any(x["type"] == "invoice.deleted" for x in e), what="invoice.deleted")
    deleted = [e for e in events.of(T) if e["type"] == "invoice.deleted"]
    assert len(deleted) == 1
    assert (deleted[0]["invoiceId"], deleted[0]["causationId"], deleted[0]["sequence"]) == (
        str(created["invoiceId"]), gone["messageId"], 2)
    assert deleted[0]["data"]["status"] == "Draft"
    again = command("invoices.delete", T, invoiceNumber=created["invoiceNumber"])
    assert (again["outcome"], again["reason"]) == ("rejected", "invoice-not-found")


def test_a_refund_publishes_payment_refunded_and_the_status_change(running, events):
    T = new_tenant("t-cmd-ev")
    invoice = issued_invoice(T)
    number = invoice["invoiceNumber"]
    pay = payment(T, number, "142.60")
    send("invoices.record_payment", pay)
    assert wait_outcome(T, pay["messageId"])["outcome"] == "applied"
    paid = invoice_json(T, number)["payments"][0]["paymentId"]
    refunded = command("invoices.refund_payment", T, invoiceNumber=number, paymentId=paid, amount="42.60",
                       reason="damaged")
    assert refunded["outcome"] == "applied"
    events.wait(lambda e: sum(x["causationId"] == refunded["messageId"] for x in e) == 2,
                what="the refund's two events")
    refund, status = [e for e in events.of(T) if e["causationId"] == refunded["messageId"]]
    assert refund["type"] == "payment.refunded"
    assert (refund["data"]["paymentId"], refund["data"]["amount"], refund["data"]["refundedAmount"]) == (
        paid, "42.60", "42.60")
    assert (refund["data"]["amountPaid"], refund["data"]["balance"]) == ("100.00", "42.60")
    assert (status["type"], status["data"]["from"], status["data"]["to"]) == (
        "invoice.status_changed", "Paid", "PartiallyPaid")
    assert [e["sequence"] for e in events.of(T)] == list(range(1, len(events.of(T)) + 1))
