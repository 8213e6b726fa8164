"""Message schemas: strict where money and ids are concerned; every wrong field named."""

from __future__ import annotations

from decimal import Decimal

import pytest

from messages.schemas import LineItemIn, OrderShipped, PaymentCallback, RecordPayment, UpdateInvoice
from worker.delivery.handling import MalformedMessage, parse

PAY = {"messageId": "m-1", "tenantId": "t", "invoiceNumber": "INV-00001", "amount": "10.00", "currency": "USD"}


def test_amounts_are_decimal_strings_and_json_numbers_are_accepted_exactly():
    assert parse(RecordPayment, PAY).amount == Decimal("10.00")
    assert parse(RecordPayment, {**PAY, "amount": 12}).amount == Decimal(12)
    assert parse(RecordPayment, {**PAY, "amount": 0.1}).amount == Decimal("0.1")  # shortest repr, never binary


@pytest.mark.parametrize("amount, fragment", [
    (0.30000000000000004, "more decimals than USD allows"),
    ("1e400", "decimal string"),
    (float("nan"), "finite"),
    ("-1.00", "greater than zero"),
    (True, "not a boolean"),
    ("12,50", "decimal string"),
    ("\u0661\u0662", "decimal string"),  # Arabic-Indic digits: Decimal reads them, the contract's text is ASCII
    ("1_000", "decimal string"),
    ("1" * 30, "too large"),
])
def test_amounts_that_hurt_are_malformed(amount, fragment):
    with pytest.raises(MalformedMessage) as caught:
        parse(RecordPayment, {**PAY, "amount": amount})
    assert "amount" in caught.value.error and fragment in caught.value.error


def test_every_missing_field_is_named_at_once():
    with pytest.raises(MalformedMessage) as caught:
        parse(RecordPayment, {"messageId": "m", "tenantId": "t", "invoiceNumber": "I"})
    assert "amount: Field required" in caught.value.error and "currency: Field required" in caught.value.error


@pytest.mark.parametrize("change, fragment", [
    ({"currency": "XYZ"}, "not an ISO 4217 currency"),
    ({"currency": "usd"}, "currency"),
    ({"messageId": ""}, "messageId"),
    ({"messageId": "x" * 201}, "messageId"),
    ({"invoiceNumber": None, "invoiceId": None}, "name the invoice by invoiceNumber or invoiceId"),
    ({"invoiceId": "not-a-guid"}, "invoiceId"),
    ({"notes": "n" * 10_001}, "notes"),
    ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ({"currency": "JPY", "amount": "10.5"}, "more decimals than JPY allows"),
])
def test_malformed_fields(change, fragment):
    with pytest.raises(MalformedMessage) as caught:
        parse(RecordPayment, {**PAY, **change})
    assert fragment in caught.value.error


def test_a_body_must_be_one_json_object():
    with pytest.raises(MalformedMessage, match="JSON object"):
        parse(RecordPayment, ["not", "an", "object"])
    with pytest.raises(MalformedMessage, match="exactly one positional argument"):
        parse(RecordPayment, PAY, ("extra",))


def test_order_shipped_content_is_what_was_given_in_snake_case():
    body = {"messageId": "m", "tenantId": "t", "orderId": "O-1", "currency": "BHD", "notes": "n",
            "lineItems": [{"quantity": "1", "unitPrice": "1.125"}], "customer": {"customerId": "C", "extra": "kept"}}
    content = parse(OrderShipped, body).content()
    assert set(content) == {"order_id", "currency", "notes", "line_items", "customer"}
    assert content["line_items"][0]["unit_price"] == Decimal("1.125")
    assert content["customer"] == {"customerId": "C", "extra": "kept"}


def test_update_content_has_only_the_fields_to_change():
    update = parse(UpdateInvoice, {"messageId": "m", "tenantId": "t", "invoiceNumber": "I", "notes": None})
    assert update.content() == {"notes": None}


def test_an_approved_callback_carries_its_amount():
    body = {"messageId": "m", "tenantId": "t", "provider": "WorldPay", "invoiceNumber": "I",
            "paymentId": "6f1c2d3e-0000-4000-8000-000000000001", "transactionId": "T", "result": "Approved"}
    with pytest.raises(MalformedMessage, match="approved amount"):
        parse(PaymentCallback, body)
    assert parse(PaymentCallback, {**body, "result": "Declined"}).amount is None
    with pytest.raises(MalformedMessage, match="provider"):
        parse(PaymentCallback, {**body, "result": "Declined", "provider": "Stripe"})


@pytest.mark.parametrize("line", [{"quantity": "2", "unitPrice": "10.00"},
                                  {"sku": "S", "description": "D", "quantity": 1.5, "unitPrice": 3, "discountAmount": "0.50"}])
def test_a_line_gives_the_domain_what_model_dump_gives(line):
    parsed = LineItemIn.model_validate(line)
    assert parsed.content() == parsed.model_dump()
    assert set(parsed.content()) == set(LineItemIn.model_fields)
