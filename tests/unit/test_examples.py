"""Every task of the contract has a sample body in examples/ that its schema accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from messages import schemas as messages

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCHEMAS = {
    "order_shipped": messages.OrderShipped, "create": messages.CreateInvoice, "update": messages.UpdateInvoice,
    "issue": messages.InvoiceCommand, "apply_discount": messages.ApplyDiscount,
    "remove_discount": messages.InvoiceCommand, "void": messages.InvoiceCommand, "cancel": messages.InvoiceCommand,
    "delete": messages.InvoiceCommand, "record_payment": messages.RecordPayment,
    "start_hosted_payment": messages.StartHostedPayment, "complete_hosted_payment": messages.CompleteHostedPayment,
    "fail_payment": messages.FailPayment, "refund_payment": messages.RefundPayment,
    "payment_callback": messages.PaymentCallback, "retry_failed_payments": messages.RetryFailedPayments,
    "bulk_import": messages.BulkImport,
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_example_body_is_valid(name):
    body = json.loads((EXAMPLES / f"{name}.json").read_text())
    if name != "retry_failed_payments":
        body["messageId"] = f"example-{name}"  # `invoice-worker publish` fills it in
    parsed = SCHEMAS[name].model_validate(body)
    for entry in getattr(parsed, "invoices", []):
        messages.ImportEntry.model_validate(entry)


def test_every_routed_task_has_an_example():
    from worker.brokers.topology import ROUTES

    missing = {t.split(".", 1)[1] for t in ROUTES} - {p.stem for p in EXAMPLES.glob("*.json")} - {"prune_outbox", "prune_records"}
    assert not missing, missing
