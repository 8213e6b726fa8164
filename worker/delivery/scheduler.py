"""The scheduled retry of failed payments (CONTRACT.md section 8), driven by Celery beat through
the invoices.maintenance queue (housekeeping is in worker/storage/housekeeping.py)."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models.errors import DomainError
from models.invoice import Invoice
from models.payment import Payment
from worker.storage import db
from worker.storage.unit_of_work import UnitOfWork, derived_id

log = logging.getLogger(__name__)
SCAN_LIMIT = 500


def due_retries(now: datetime, limit: int = SCAN_LIMIT) -> list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, str]]:
    """(payment key, public payment id, invoice, tenant) of the failed attempts whose next retry is
    due: one indexed query. The key (Payment.id) finds the payment; the public id is for the log."""
    with db.sessions()() as session:
        rows = session.execute(
            select(Payment.id, Payment.payment_id, Payment.invoice_id, Invoice.tenant_id)
            .join(Invoice, Invoice.id == Payment.invoice_id)
            .where(Payment.next_retry_at.is_not(None), Payment.next_retry_at <= now)
            .order_by(Payment.next_retry_at)
            .limit(limit)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def retry_failed_payments(scan_id: str, now: datetime | None = None) -> dict[str, int]:
    """Create the next Pending attempt for every due retry, each in its own transaction under the
    invoice's row lock. The attempt's id derives from the failed one and `retry_of` is unique, so
    two schedulers or a repeated scan never create two attempts for the same due retry."""
    now = now or datetime.now(timezone.utc)
    requested = dropped = 0
    for key, payment_id, invoice_id, tenant_id in due_retries(now):
        try:
            outcome = _retry_one(scan_id, key, invoice_id, tenant_id, now)
        except IntegrityError:
            # Another scan created this attempt a moment ago (retry_of is unique): nothing to do.
            log.info("retry scan %s: payment %s of invoice %s was retried by another scan", scan_id, payment_id,
                     invoice_id)
            continue
        except DomainError as error:
            # One payment the rules refuse costs that payment alone, never the rest of the scan.
            log.warning("retry scan %s: payment %s of invoice %s not retried: %s", scan_id, payment_id, invoice_id,
                        error)
            continue
        requested += outcome == "requested"
        dropped += outcome == "dropped"
    if requested or dropped:
        log.info("retry scan %s: %d retries requested, %d dropped", scan_id, requested, dropped)
    return {"requested": requested, "dropped": dropped}


def _retry_one(scan_id: str, key: uuid.UUID, invoice_id: uuid.UUID, tenant_id: str, now: datetime) -> str | None:
    """One due retry in a transaction of its own, under the invoice's row lock. The new attempt's
    public id derives from the failed attempt's internal key, which no publisher knows, so no
    message can take it beforehand."""
    with db.sessions()() as session:
        uow = UnitOfWork(session, tenant_id=tenant_id, message_id=None, task="invoices.retry_failed_payments")
        invoice = uow.find_by_id(invoice_id)
        failed = invoice.payment_by_key(key) if invoice else None
        if failed is None or failed.next_retry_at is None or failed.next_retry_at > now:
            session.rollback()  # another scan took it, or it stopped being due
            return None
        retry = invoice.request_retry(failed, derived_id("retry", tenant_id, failed.id), now=now)
        uow.causation_id = f"{scan_id}:{failed.payment_id}"
        uow.commit_changes()
        return "dropped" if retry is None else "requested"


def prune_event_tails(app: Any) -> list[str]:
    """The queues of `events tail` processes that are gone, on Redis (worker/brokers/event_tails.py)."""
    from worker.brokers.event_tails import prune_orphans

    with app.connection_for_write() as connection:
        return prune_orphans(connection)
