"""Bounded storage: the outbox, the inbox, closed dead letters and the delivery records are pruned
by beat (invoices.prune_outbox, invoices.prune_records) in small batches, each its own short
transaction, so that no lock is held long and message handling does not pause. The invoice
history and the tombstones are kept for good."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import text

from worker.config import settings
from worker.storage import db
from worker.storage.records import INBOX_PRUNABLE

log = logging.getLogger(__name__)
# Rows per DELETE: a batch takes a few milliseconds, so a message waiting on one of its locks (or
# for the I/O it causes) waits that long at most (bench: latency during pruning).
BATCH = 1000
# invoice_waits and delivery_counts matter while a message is retried or redelivered; a day past
# the longest of those is plenty.
DELIVERY_RECORD_HOURS = 24.0

# The oldest rows first, through each table's index; locked rows (a dead letter being replayed) are
# skipped and taken by a later run.
STATEMENTS = {
    "outbox": "published_at IS NOT NULL AND published_at < :cutoff ORDER BY published_at",
    "inbox": f"{INBOX_PRUNABLE.text} AND processed_at < :cutoff ORDER BY processed_at",
    "dead_letters": "status <> 'open' AND last_seen < :cutoff ORDER BY last_seen",
    "invoice_waits": "first_seen < :cutoff ORDER BY first_seen",
    "delivery_counts": "last_seen < :cutoff ORDER BY last_seen",
}


def cutoffs(now: datetime) -> dict[str, datetime]:
    config = settings()
    delivery_hours = DELIVERY_RECORD_HOURS + (config.invoice_wait_seconds + config.broker_visibility_timeout) / 3600
    return {
        "outbox": now - timedelta(hours=config.outbox_retention_hours),
        "inbox": now - timedelta(days=config.inbox_retention_days),
        "dead_letters": now - timedelta(days=config.dead_letter_retention_days),
        "invoice_waits": now - timedelta(hours=delivery_hours),
        "delivery_counts": now - timedelta(hours=delivery_hours),
    }


def prune(table: str, cutoff: datetime, batch: int = BATCH, timings: list[float] | None = None) -> int:
    """Delete the table's rows older than the cutoff, `batch` rows per transaction (each batch's
    seconds appended to `timings` when given: the bench reports them)."""
    statement = text(f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
                     f"SELECT ctid FROM {table} WHERE {STATEMENTS[table]} LIMIT :batch FOR UPDATE SKIP LOCKED))")
    pruned = 0
    while True:
        began = time.perf_counter()
        with db.engine().begin() as connection:
            deleted = connection.execute(statement, {"cutoff": cutoff, "batch": batch}).rowcount or 0
        if timings is not None:
            timings.append(time.perf_counter() - began)
        pruned += deleted
        if deleted < batch:
            return pruned


def prune_records(now: datetime | None = None) -> dict[str, int]:
    """Prune the inbox, closed dead letters, invoice waits and delivery counts."""
    limits = cutoffs(now or datetime.now(timezone.utc))
    counts = {table: prune(table, limits[table]) for table in ("inbox", "dead_letters", "invoice_waits",
                                                              "delivery_counts")}
    if any(counts.values()):
        log.info("pruned %s", ", ".join(f"{n} {t}" for t, n in counts.items()))
    return counts


def prune_outbox(now: datetime | None = None) -> int:
    """Delete published events older than OUTBOX_RETENTION_HOURS."""
    return prune("outbox", cutoffs(now or datetime.now(timezone.utc))["outbox"])
