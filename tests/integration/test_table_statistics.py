"""An import that leaves the invoices table's statistics behind refreshes them (worker/storage/
table_statistics.py), and a batch for the imported tenant then finds its invoices by key instead of
walking the tenant's invoices. Both run here in this process, as a pool process runs them."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import event, text

from tests.integration.test_batch_plans import entry
from tests.integration.test_import_plans import send as imported
from worker.delivery.batching import ACK, apply_batch
from worker.storage import db, table_statistics

INVOICES = 1200
PAID = 30


def send(tenant: str, numbers: list[str]) -> dict[str, int]:
    """Imported part paid (as bench/payments.py's setup does), so that payments apply."""
    return imported(tenant, numbers, lineItems=[{"quantity": "1", "unitPrice": "100.00"}],
                    importedInvoiceTotal="100.00", importedBalance="99.00")


def invoice_entries_read(tenant: str, first: int) -> int:
    """Index entries of invoices a batch of PAID record_payment (invoices first.. of the tenant) reads."""
    reads: list[int] = []

    def count(conn: Any) -> None:
        # This backend's counts, flushed or not: the change between the batch's start and its COMMIT.
        reads.append(int(conn.connection.driver_connection.execute(
            "SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid)) FROM pg_index "
            "WHERE indrelid = 'invoices'::regclass").fetchone()[0]))

    bodies = [{"messageId": f"pay-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": f"N-{first + i:05d}",
               "amount": "1.00", "currency": "USD", "paymentMethod": "EFT", "occurredAt": "2026-11-24T10:15:02Z"}
              for i in range(PAID)]
    event.listen(db.engine(), "begin", count)
    event.listen(db.engine(), "commit", count)
    try:
        assert apply_batch([entry("invoices.record_payment", body) for body in bodies]) == [ACK] * PAID
    finally:
        event.remove(db.engine(), "begin", count)
        event.remove(db.engine(), "commit", count)
    # Every payment applied: one transaction (a rejection would run the batch again with savepoints),
    # read between its start and its COMMIT (a backend's counts are flushed, and reset, only
    # between transactions).
    assert len(reads) == 2
    return reads[1] - reads[0]


def test_an_import_that_outgrows_the_statistics_refreshes_them(database, monkeypatch):
    monkeypatch.setattr(table_statistics, "STALE_ROWS", INVOICES // 2)
    tenant = f"t-stats-{uuid.uuid4().hex[:6]}"
    with db.engine().connect() as conn:
        conn.execute(text("ANALYZE invoices"))  # before any invoice of this tenant: it looks empty
        conn.commit()
    assert not table_statistics.refresh_if_stale()  # nothing changed since
    for b in range(INVOICES // 200):
        assert send(tenant, [f"N-{b * 200 + i:05d}" for i in range(200)])["created"] == 200
    # Payments to the tenant, on the plans the stale statistics give: the tenant's invoices walked.
    for k in range(5):  # a statement is prepared (its generic plan cached) from its sixth run
        invoice_entries_read(tenant, k * PAID)
    stale = invoice_entries_read(tenant, 5 * PAID)
    assert stale >= INVOICES, stale

    assert table_statistics.refresh_if_stale()  # 1,200 rows and more changed: analyzed
    assert not table_statistics.refresh_if_stale()  # and not again
    fresh = invoice_entries_read(tenant, 6 * PAID)
    # Each paid invoice read by key a few times (its lookup and lock, the payment's foreign key
    # check, its UPDATE by id...: 108 entries here), nothing walked (1,200 entries and more before).
    assert fresh <= 4 * PAID, fresh


def test_one_analyze_at_a_time(database, monkeypatch):
    """While another worker analyzes (holds the advisory lock), an import goes on without waiting."""
    monkeypatch.setattr(table_statistics, "STALE_ROWS", 1)
    send(f"t-stats-{uuid.uuid4().hex[:6]}", ["N-1", "N-2"])
    with db.engine().connect() as conn:  # the import's counts are there: only the lock can say no
        assert conn.execute(text("SELECT n_mod_since_analyze FROM pg_stat_user_tables "
                                 "WHERE relid = 'invoices'::regclass")).scalar() >= 2
    with db.engine().connect() as other:
        assert other.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": table_statistics.ANALYZE_LOCK}).scalar()
        assert not table_statistics.refresh_if_stale()
        other.rollback()
    assert table_statistics.refresh_if_stale()
