"""Bulk import: invoices with 3 line items each through the real worker, against a raw COPY of
the same rows into the same tables in the same run."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from bench.harness import Environment, PeakMemory, wait, worker
from bench.payments import publish

BATCH = 1000  # IMPORT_BATCH_SIZE's default, what `invoice-worker import` sends


def entries(prefix: str, count: int) -> list[dict[str, Any]]:
    return [{"invoiceNumber": f"{prefix}-{i:06d}", "orderId": f"O-{i}", "currency": "USD",
             "customer": {"customerId": f"C-{i % 500}", "companyName": "Globex"}, "invoiceDate": "2026-10-01",
             "paymentTerms": "Net30", "importedInvoiceTotal": "60.00", "importedBalance": "20.00" if i % 3 else "60.00",
             "lineItems": [{"sku": f"S-{j}", "description": "Widget", "quantity": "2", "unitPrice": "10.00"}
                           for j in range(3)]} for i in range(count)]


def through_worker(env: Environment, count: int, concurrency: int, tenant: str = "bench-import") -> dict[str, float]:
    bodies = []
    data = entries("W", count)
    for start in range(0, count, BATCH):
        bodies.append({"messageId": f"bulk-{uuid.uuid4()}", "tenantId": tenant, "batchId": f"b-{start}",
                       "invoices": data[start:start + BATCH]})
    del data
    proc = worker(concurrency)
    try:
        with PeakMemory(proc) as memory:
            started = publish("invoices.bulk_import", bodies, "invoices.imports").began
            done = wait(lambda: env.sql("SELECT count(*) FROM inbox WHERE tenant_id = %s", (tenant,))[0][0]
                        >= len(bodies), 600, interval=0.2)
        created = env.sql("SELECT count(*) FROM invoices WHERE tenant_id = %s", (tenant,))[0][0]
        assert created == count, f"{created} of {count} invoices imported"
        return {"rate": count / (done - started), "seconds": done - started, "pss_mb": memory.mb, "rss_mb": memory.rss_mb}
    finally:
        proc.stop()


def created_event(entry: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The invoice.created event the worker writes for an imported entry, made once as a template."""
    from messages.schemas import ImportEntry
    from models.invoice import Invoice
    from worker.storage.unit_of_work import event_envelope

    content = ImportEntry.model_validate(entry).content()
    invoice = Invoice.create(tenant_id="bench-copy", invoice_number=entry["invoiceNumber"], content=content,
                             source="import", now=now, announce=False)
    return event_envelope(type_="invoice.created", tenant_id="bench-copy", invoice_id=invoice.id,
                          invoice_number=invoice.invoice_number, sequence=1, causation_id="bench-copy",
                          data={"invoice": invoice.to_json(), "source": "import"})


def raw_copy(env: Environment, count: int) -> dict[str, float]:
    """The same rows (invoice, 3 lines, its invoice.created event with the whole invoice, and its
    invoice_history row, as the worker writes them) with plain COPY, nothing else. (The history
    row came with the audit trail; before 2026-11-28 this baseline left it out: 5 of the 6 rows.)"""
    from worker.storage.bulk_import import HISTORY_COLUMNS
    now = datetime.now(timezone.utc)
    template = created_event(entries("R", 1)[0], now)
    invoices, lines, events, history = [], [], [], []
    for i in range(count):
        invoice_id = uuid.uuid4()
        number = f"R-{i:06d}"
        payload = {**template, "eventId": str(uuid.uuid4()), "invoiceId": str(invoice_id), "invoiceNumber": number,
                   "data": {**template["data"], "invoice": {**template["data"]["invoice"], "id": str(invoice_id),
                                                            "invoiceNumber": number, "orderId": f"O-{i}"}}}
        invoices.append((invoice_id, "bench-copy", number, f"O-{i}", "import", "", "PartiallyPaid",
                         "2026-10-01", "2026-10-31", "Net30", "USD",
                         Jsonb({"customerId": f"C-{i % 500}", "companyName": "Globex"}),
                         f"C-{i % 500}", Decimal("60.00"), Decimal("60.00"), Decimal("20.00"), Decimal("60.00"),
                         Decimal(0), Decimal("60.00"), Decimal("40.00"), Decimal("20.00"), True, 1, 1, now, now))
        for j in range(3):
            lines.append((invoice_id, j + 1, f"S-{j}", "Widget", Decimal(2), Decimal("10.00"), Decimal(0),
                          Decimal("20.00")))
        events.append((uuid.UUID(payload["eventId"]), "invoice.created", "bench-copy", invoice_id, 1, Jsonb(payload)))
        history.append(("bench-copy", invoice_id, number, "bench-copy", "bench-copy", "invoices.bulk_import",
                        Jsonb([{"type": "invoice.created", "sequence": 1}]), None, "PartiallyPaid", "USD",
                        Decimal("60.00"), Decimal("40.00"), Decimal("20.00")))
    columns = ("id, tenant_id, invoice_number, order_id, source, shipment_id, status, invoice_date, due_date, "
               "payment_terms, currency, customer, customer_id, imported_invoice_total, imported_balance, "
               "subtotal, discount_amount, tax_amount, invoice_total, amount_paid, balance, is_active, "
               "event_sequence, version, created_at, updated_at")
    started = time.monotonic()
    with psycopg.connect(env.libpq) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY invoices ({columns}) FROM STDIN") as copy:
            for row in invoices:
                copy.write_row(row)
        with cursor.copy("COPY line_items (invoice_id, position, sku, description, quantity, unit_price, "
                         "discount_amount, line_total) FROM STDIN") as copy:
            for row in lines:
                copy.write_row(row)
        with cursor.copy("COPY outbox (event_id, type, tenant_id, invoice_id, sequence, payload) FROM STDIN") as copy:
            for row in events:
                copy.write_row(row)
        with cursor.copy(f"COPY invoice_history ({', '.join(HISTORY_COLUMNS)}) FROM STDIN") as copy:
            for row in history:
                copy.write_row(row)
        conn.commit()
    seconds = time.monotonic() - started
    return {"rate": count / seconds, "seconds": seconds}


def run(env: Environment, count: int, concurrency: int) -> dict[str, Any]:
    # Each side starts from a settled database: before this, the raw COPY's 100,000 events were
    # marked published right after it (an UPDATE of 100,000 rows of ~1.2 KB), and vacuuming that
    # ran inside the worker's window (100,000 invoices: 8,122/s, against ~9,500/s at 50,000).
    env.settle()
    copy = raw_copy(env, count)
    env.settle()
    through = through_worker(env, count, concurrency)
    # No relay ran: the events of both would be the next part's backlog (its latency baseline then
    # waited ~10 s behind them: p95 9.9 s in the run of 3e21e80).
    env.sql("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
    env.settle()
    return {"worker": through, "copy": copy, "ratio": through["rate"] / copy["rate"]}
