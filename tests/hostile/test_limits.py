"""The limits and keys of hostile input that need no server: schemas, the dead-letter encoding,
derived ids, the import file's grouping by tenant, and secrets on disk and on screen."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
from pydantic import ValidationError

from messages.schemas import MAX_IMPORT_LINES, BulkImport, CreateInvoice, RecordPayment
from worker.cli.import_file import read_csv
from worker.cli.imports import Report, batches
from worker.delivery.dead_letters import MAX_STORED_BYTES, jsonable, original_body
from worker.delivery.handling import MalformedMessage, parse
from worker.storage.unit_of_work import derived_id


def test_a_batch_past_the_line_cap_is_too_large_not_malformed():
    per_entry = 1000
    entries = [{"invoiceNumber": f"B-{i}", "lineItems": [{}] * per_entry} for i in range(MAX_IMPORT_LINES // per_entry + 1)]
    with pytest.raises(MalformedMessage) as caught:
        parse(BulkImport, {"messageId": "m", "tenantId": "t", "batchId": "b", "invoices": entries})
    assert caught.value.reason == "too-large"
    assert parse(BulkImport, {"messageId": "m", "tenantId": "t", "batchId": "b", "invoices": entries[:-1]})


@pytest.mark.parametrize("field,value", [("paymentMethod", "x" * 51), ("cardBrand", "x" * 51), ("amount", "1e16"),
                                         ("amount", "1000000000000")])
def test_payment_fields_are_limited_to_their_columns(field, value):
    body = {"messageId": "m", "tenantId": "t", "invoiceNumber": "I", "amount": "1.00", "currency": "USD", field: value}
    with pytest.raises(ValidationError):
        RecordPayment.model_validate(body)


@pytest.mark.parametrize("customer", [{"x": {"deep": [1]}}, {"x": "a\x00"}, {"x": "\ud800"},
                                      {f"k{i}": i for i in range(21)}, {"x": "y" * 5000}])
def test_extra_fields_are_plain_bounded_and_storable(customer):
    with pytest.raises(ValidationError):
        CreateInvoice.model_validate({"messageId": "m", "tenantId": "t", "currency": "USD", "customer": customer})


@pytest.mark.parametrize("body", [{"a": "\ud800"}, {"a": "\x00"}, "x" * (MAX_STORED_BYTES + 1), b"\xff\x00raw",
                                  {"currency": [{"x": True}, float("inf")]}, [float("-inf")], {"a": "Infinity NaN"}])
def test_every_body_is_storable_and_comes_back(body):
    stored = jsonable(body)
    text = json.dumps(stored, allow_nan=False)  # what jsonb receives: standard JSON, no NUL, no lone surrogate escape
    assert "\\u0000" not in text and "\\ud800" not in text.lower()
    if isinstance(body, str) and len(body) > MAX_STORED_BYTES:
        assert stored["encoding"] == "json-truncated" and stored["length"] == len(body) + 2
    else:
        assert original_body(stored) == body


def test_a_body_that_cannot_be_json_is_kept_described():
    deep: list = []
    cursor = deep
    for _ in range(100_000):
        cursor.append([])
        cursor = cursor[0]
    stored = jsonable(deep)
    assert "unserialisable" in stored and "RecursionError" in stored["error"]


def test_derived_ids_carry_purpose_and_tenant():
    payment_of_crafted = derived_id("payment", "retry", "3f0c")
    assert payment_of_crafted != derived_id("retry", "acme", "3f0c")
    assert derived_id("payment", "a\x1fb", "c") != derived_id("payment", "a", "b\x1fc")
    assert derived_id("payment", "acme", "m-1") != derived_id("payment", "globex", "m-1")
    assert derived_id("payment", "acme", "m-1") == derived_id("payment", "acme", "m-1")


def test_csv_rows_of_two_tenants_never_join_one_invoice():
    text = ("invoiceNumber,tenantId,currency,quantity,unitPrice\n"
            "INV-1,acme,USD,1,10.00\nINV-1,globex,USD,1,99.00\n")
    entries = [line.entry for line in read_csv(io.StringIO(text))]
    assert [(e["tenantId"], len(e["lineItems"])) for e in entries] == [("acme", 1), ("globex", 1)]


def test_import_with_tenant_rejects_a_row_of_another_tenant():
    text = "invoiceNumber,tenantId,currency,quantity,unitPrice\nINV-1,acme,USD,1,10.00\nINV-2,globex,USD,1,5.00\n"
    report = Report()
    sent = [entry for _, entries, _ in batches(read_csv(io.StringIO(text)), "acme", 100, report) for entry in entries]
    assert [e["invoiceNumber"] for e in sent] == ["INV-1"]
    assert report.totals["rejected"] == 1 and "globex" in report.problems[0]


def test_endpoints_file_is_readable_by_its_owner_only(tmp_path, monkeypatch):
    from worker import endpoints
    from worker.config import settings

    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    settings.cache_clear()
    try:
        endpoints.write_endpoints("postgresql+psycopg://u:secret@h/db", "redis://:secret@h:1/0")
        assert stat.S_IMODE(os.stat(tmp_path / "endpoints.json").st_mode) == 0o600
    finally:
        settings.cache_clear()


def test_urls_are_printed_without_passwords():
    from worker.local.supervisor import _safe

    for url in ("postgresql+psycopg://u:secret@h/db", "redis://:secret@h:1/0", "amqp://guest:secret@h//"):
        assert "secret" not in _safe(url)
