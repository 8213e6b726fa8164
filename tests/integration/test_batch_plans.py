"""A batch's statements find their rows through the indexes even when the planner's statistics say
its tables are tiny, as on a young database that autovacuum analyzed while it was nearly empty.
A plan made then, and cached with its prepared statement for the connection's life, scanned the
whole inbox for every outcome it wrote (worker/storage/db.py: sequential scans are off).

The batch runs here in this process, as a pool process runs it (`apply_batch`), so that its own
transaction's counters (pg_stat_xact_user_tables) can be read just before its COMMIT."""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import event, text

import tasks.payments  # noqa: F401 - declares record_payment batchable
from tests.integration.test_payment_ids import issued
from worker.delivery.batching import ACK, Entry, apply_batch
from worker.storage import db

TABLES = ("inbox", "invoices", "payments")


def entry(task: str, body: dict[str, Any]) -> Entry:
    task_id = str(uuid.uuid4())
    return Entry(task, task_id, json.dumps([[body], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                         "chord": None}]),
                 "application/json", "utf-8", {"id": task_id, "root_id": task_id, "parent_id": None, "origin": "test"})


def test_a_batch_uses_the_indexes_when_the_statistics_say_its_tables_are_tiny(database):
    tenant = f"t-plans-{uuid.uuid4().hex[:6]}"
    numbers = [issued(tenant) for _ in range(5)]
    with db.engine().connect() as conn:
        conn.execute(text(f"ANALYZE {', '.join(TABLES)}"))  # a handful of rows each: a page or two
        conn.commit()
    counts: list[dict[str, int]] = []

    def count(conn: Any) -> None:
        # The backend's counts not yet flushed to pg_stat_user_tables: earlier transactions' too,
        # but only this one's change between its start and its COMMIT.
        rows = conn.connection.driver_connection.execute(
            "SELECT relname, seq_scan FROM pg_stat_xact_user_tables WHERE relname = ANY(%s)", (list(TABLES),))
        counts.append(dict(rows.fetchall()))

    event.listen(db.engine(), "begin", count)
    event.listen(db.engine(), "commit", count)
    try:
        bodies = [{"messageId": f"pay-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": numbers[i % 5],
                   "amount": "1.00", "currency": "USD", "paymentMethod": "EFT",
                   "occurredAt": "2026-11-24T10:15:02Z"} for i in range(30)]
        assert apply_batch([entry("invoices.record_payment", body) for body in bodies]) == [ACK] * 30
    finally:
        event.remove(db.engine(), "begin", count)
        event.remove(db.engine(), "commit", count)
    # One transaction applied all 30 (a prepared statement's plan is cached after 5 runs), and
    # read none of the three tables from end to end.
    assert len(counts) == 2
    began, ended = counts
    assert {name: ended[name] - began[name] for name in TABLES} == {name: 0 for name in TABLES}
    with db.engine().connect() as conn:
        applied = conn.execute(text("SELECT count(*) FROM inbox WHERE tenant_id = :t AND outcome = 'applied' "
                                    "AND message_id LIKE 'pay-%'"), {"t": tenant}).scalar()
        paid = conn.execute(text("SELECT sum(amount_paid) FROM invoices WHERE tenant_id = :t"), {"t": tenant}).scalar()
    assert applied == 30 and str(paid) == "30.0000"
