"""A bulk import's lookup of the invoices it already has is planned with its numbers in hand, every
time. Found with pg_stat_statements: as a prepared statement (psycopg prepares a statement from
its sixth run) the lookup ran a generic plan, made while the tenant's invoices were few (a fresh
import, nothing analyzed yet), that walked the tenant's invoices in number order and compared each
with the batch's numbers one after another: 476 ms a batch of 1,000 at 50,000 invoices and
growing, 23.8 s of an import's 27 s of statements. Planned with the numbers as a constant, a
filter by them is a hash lookup (an import of 50,000: PostgreSQL's CPU 402 → 84 µs an invoice).

The imports run here in this process (`execute`, as a pool process runs them), on one connection,
so that the connection's prepared statements can be read just before the last one's COMMIT."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import event, text

from messages.schemas import BulkImport
from worker.delivery.handling import execute, parse
from worker.storage import db
from worker.storage.bulk_import import import_batch

BATCH = 200


def send(tenant: str, numbers: list[str], **fields: Any) -> dict[str, int]:
    """One import of these invoice numbers (each entry one line of 10.00, and `fields`), in-process."""
    entries = [{"invoiceNumber": n, "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "10.00"}],
                **fields} for n in numbers]
    message = parse(BulkImport, {"messageId": f"imp-{uuid.uuid4()}", "tenantId": tenant, "batchId": "b",
                                 "invoices": entries})
    return execute("invoices.bulk_import", message, import_batch).extra["counts"]


def test_the_lookup_of_existing_invoices_is_never_a_prepared_statement(database):
    tenant = f"t-import-plans-{uuid.uuid4().hex[:6]}"
    with db.engine().connect() as conn:
        conn.execute(text("ANALYZE invoices"))  # before any invoice of this tenant: it looks empty
        conn.commit()
    # Six batches, on the pool's one connection: a statement run as often as this is prepared.
    for b in range(6):
        assert send(tenant, [f"N-{b}-{i:04d}" for i in range(BATCH)])["created"] == BATCH
    prepared: list[list[str]] = []

    def keep(conn: Any) -> None:
        rows = conn.connection.driver_connection.execute(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%%FROM invoices%%FOR UPDATE%%'")
        prepared.append([row[0] for row in rows])

    event.listen(db.engine(), "commit", keep)
    try:
        # 100 numbers the tenant has (re-sent, unchanged) and 100 new ones, among its 1,200 invoices.
        counts = send(tenant, [f"N-0-{i:04d}" for i in range(100)] + [f"N-9-{i:04d}" for i in range(100)])
    finally:
        event.remove(db.engine(), "commit", keep)
    assert counts == {"created": 100, "updated": 0, "unchanged": 100, "deactivated": 0, "rejected": 0}
    with db.engine().connect() as conn:  # the statement was there to be prepared: it ran seven times
        assert conn.execute(text("SELECT count(*) FROM invoices WHERE tenant_id = :t"), {"t": tenant}).scalar() == 1300
    assert prepared == [[]]
