"""What the console's pages show, read in one short database visit each (raw SQL on a pooled
connection: the overview stays well under 100 ms with 100,000 dead letters, `make bench`)."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from worker.storage import db

# Per minute from %(since)s up to now. The finished minutes of the hour are read once a minute
# (`PerMinute`); each request reads only the minute under way.
PER_MINUTE = """
WITH minutes AS (SELECT generate_series(%(since)s::timestamptz, date_trunc('minute', now()), interval '1 minute') AS m),
outcomes AS (SELECT date_trunc('minute', processed_at) AS m, count(*) FILTER (WHERE outcome = 'applied') AS applied,
                    count(*) FILTER (WHERE outcome = 'rejected') AS rejected
             FROM inbox WHERE processed_at >= %(since)s GROUP BY 1),
dead AS (SELECT date_trunc('minute', first_seen) AS m, count(*) AS dead
         FROM dead_letters WHERE first_seen >= %(since)s GROUP BY 1)
SELECT minutes.m, coalesce(applied, 0), coalesce(rejected, 0), coalesce(dead, 0)
FROM minutes LEFT JOIN outcomes USING (m) LEFT JOIN dead USING (m) ORDER BY minutes.m
"""


class PerMinute:
    """The chart's rows: the 59 finished minutes kept from the first request of each minute (a row
    committed late into a finished minute shows from the next minute on), the current one read live."""

    def __init__(self) -> None:
        self.minute: datetime | None = None
        self.finished: list[tuple[Any, ...]] = []

    def rows(self, pg: Any) -> list[tuple[Any, ...]]:
        (now,) = pg.execute("SELECT date_trunc('minute', now())").fetchone()
        if now != self.minute:
            rows = pg.execute(PER_MINUTE, {"since": now - timedelta(minutes=59)}).fetchall()
            self.minute, self.finished = now, rows[:-1]
            return rows
        return self.finished + pg.execute(PER_MINUTE, {"since": now}).fetchall()[-1:]


PER_MINUTE_CACHE = PerMinute()
OUTBOX = ("SELECT count(*) FILTER (WHERE published_at IS NULL AND parked_at IS NULL), "
          "min(created_at) FILTER (WHERE published_at IS NULL AND parked_at IS NULL), "
          "count(*) FILTER (WHERE published_at IS NULL AND parked_at IS NOT NULL) FROM outbox "
          "WHERE published_at IS NULL")
# Open dead letters per reason: the reasons by a skip scan of the (status, reason, id) index, each
# counted up to REASON_CAP + 1 (shown "10,000+"): with 100,000 open, a third of the work of a GROUP BY.
REASON_CAP = 10_000
BY_REASON = f"""
WITH RECURSIVE r(reason) AS (
  (SELECT reason FROM dead_letters WHERE status = 'open' ORDER BY reason LIMIT 1)
  UNION ALL
  SELECT (SELECT d.reason FROM dead_letters d WHERE d.status = 'open' AND d.reason > r.reason ORDER BY d.reason LIMIT 1)
  FROM r WHERE r.reason IS NOT NULL)
SELECT reason, (SELECT count(*) FROM (SELECT 1 FROM dead_letters d WHERE d.status = 'open' AND d.reason = r.reason
                                      LIMIT {REASON_CAP + 1}) capped)
FROM r WHERE reason IS NOT NULL ORDER BY 2 DESC, 1
"""
WAITING = "SELECT count(*), min(first_seen) FROM invoice_waits"
RETRIES_DUE = ("SELECT count(*) FROM payments WHERE next_retry_at IS NOT NULL "
               "AND next_retry_at < now() + interval '1 day'")


@dataclass
class Chart:
    """Applied, rejected and dead-lettered per minute over the last hour, as SVG polylines."""

    minutes: list[str]
    series: dict[str, list[int]]
    width: int = 600
    height: int = 120

    @property
    def top(self) -> int:
        return max([1, *(v for values in self.series.values() for v in values)])

    def points(self, name: str) -> str:
        values = self.series[name]
        step = self.width / max(1, len(values) - 1)
        return " ".join(f"{i * step:.1f},{self.height - v * self.height / self.top:.1f}" for i, v in enumerate(values))

    def total(self, name: str) -> int:
        return sum(self.series[name])


def _pg(conn: Any) -> Any:
    return conn.connection.driver_connection


def overview(database_url: str, broker_url: str, queues: Any, wait_seconds: float) -> dict[str, Any]:
    from worker.operations.health import Snapshot, read_queues

    snapshot = Snapshot(taken=0.0)
    # Each queue's length by declaring it as the worker does (Redis LLEN, AMQP queue_declare's
    # message count): nothing is taken off a queue, so nothing is marked redelivered.
    read_queues(broker_url, queues, snapshot)
    data: dict[str, Any] = {"queues": snapshot.queue_depth, "problems": dict(snapshot.problems)}
    data.update(chart=None, outbox=None, deadLetters=[], deadLettersOpen="?", waiting=None, retriesDue=None,
                heartbeats={})
    try:
        _read_database(data, wait_seconds)
    except Exception as exc:  # the page says what it could not read, as `status` does
        first = str(exc).strip().splitlines()
        data["problems"]["database"] = f"PostgreSQL does not answer: {type(exc).__name__}: {first[0] if first else ''}"
    return data


def _read_database(data: dict[str, Any], wait_seconds: float) -> None:
    from worker.operations import heartbeats

    with db.engine().connect() as conn:
        pg = _pg(conn)
        rows = PER_MINUTE_CACHE.rows(pg)
        data["chart"] = Chart([r[0].strftime("%H:%M") for r in rows],
                              {"applied": [r[1] for r in rows], "rejected": [r[2] for r in rows],
                               "dead-lettered": [r[3] for r in rows]})
        unpublished, oldest, parked = pg.execute(OUTBOX).fetchone()
        data["outbox"] = {"unpublished": unpublished, "parked": parked,
                          "oldestAgeSeconds": (datetime.now(timezone.utc) - oldest).total_seconds() if oldest else None}
        by_reason = pg.execute(BY_REASON).fetchall()
        data["deadLetters"] = [(reason, f"{REASON_CAP:,}+" if n > REASON_CAP else str(n)) for reason, n in by_reason]
        total = sum(min(n, REASON_CAP) for _, n in by_reason)
        data["deadLettersOpen"] = f"{total:,}+" if any(n > REASON_CAP for _, n in by_reason) else str(total)
        waiting, first = pg.execute(WAITING).fetchone()
        data["waiting"] = {"count": waiting,
                           "nextGivesUpAt": (first + timedelta(seconds=wait_seconds)) if first else None}
        (data["retriesDue"],) = pg.execute(RETRIES_DUE).fetchone()
        data["heartbeats"] = heartbeats.read(pg)
        conn.rollback()


def waiting(wait_seconds: float, limit: int = 200) -> list[dict[str, Any]]:
    with db.engine().connect() as conn:
        rows = _pg(conn).execute("SELECT tenant_id, message_id, first_seen FROM invoice_waits ORDER BY first_seen "
                                 "LIMIT %s", (limit,)).fetchall()
        conn.rollback()
    return [{"tenantId": t, "messageId": m, "firstSeen": f, "until": f + timedelta(seconds=wait_seconds)}
            for t, m, f in rows]


def scheduled_retries(limit: int = 200) -> list[dict[str, Any]]:
    with db.engine().connect() as conn:
        rows = _pg(conn).execute(
            "SELECT i.tenant_id, i.invoice_number, i.id, p.payment_id, p.amount, p.currency, p.attempt, "
            "p.failure_code, p.next_retry_at FROM payments p JOIN invoices i ON i.id = p.invoice_id "
            "WHERE p.next_retry_at IS NOT NULL ORDER BY p.next_retry_at LIMIT %s", (limit,)).fetchall()
        conn.rollback()
    keys = ("tenantId", "invoiceNumber", "invoiceId", "paymentId", "amount", "currency", "attempt", "failureCode",
            "nextRetryAt")
    return [dict(zip(keys, r)) for r in rows]


def audit(limit: int = 200, before_id: int | None = None) -> list[Any]:
    from worker.storage.records import ConsoleAudit

    query = select(ConsoleAudit).order_by(ConsoleAudit.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(ConsoleAudit.id < before_id)
    with db.sessions()() as session:
        return list(session.scalars(query))


def record(who: str, action: str, target: dict[str, Any], detail: str | None = None) -> None:
    from worker.storage.records import ConsoleAudit

    with db.sessions().begin() as session:
        session.add(ConsoleAudit(who=who, action=action, target=target, detail=detail))


def readable_body(stored: Any) -> tuple[str, str]:
    """The stored body as text for a <pre>, and how it was stored. base64 is decoded where it can
    be (JSON, or UTF-8 text); what cannot be decoded is shown as its base64. Always text: the
    template escapes it, nothing of a body is ever markup."""
    from worker.delivery.dead_letters import original_body

    try:
        body = original_body(stored)
    except (ValueError, UnicodeDecodeError):
        return json.dumps(stored, indent=2, ensure_ascii=False), "stored as base64; could not be decoded"
    if isinstance(body, bytes):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(body).decode("ascii"), "raw bytes, not UTF-8: shown as base64"
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False), "raw bytes, decoded: JSON"
        except ValueError:
            return text, "raw bytes, decoded as UTF-8 text"
    how = "JSON" if body is stored else "stored as base64, decoded: JSON"
    return json.dumps(body, indent=2, ensure_ascii=False, default=str), how


def find_invoice(tenant: str | None, number: str | None, order_id: str | None, payment_id: str | None) -> dict[str, Any]:
    """Where a search leads: {"invoiceId": ...}, {"tombstone": ...}, {"many": [...]} or {"problem": ...}."""
    from models.invoice import Invoice
    from models.payment import Payment
    from models.queries import AmbiguousInvoice, get_invoice
    from worker.storage import history

    with db.sessions()() as session:
        if payment_id:
            try:
                public = uuid.UUID(payment_id.strip())
            except ValueError:
                return {"problem": f"{payment_id!r} is not a payment id (a GUID)"}
            query = select(Payment.invoice_id).where(Payment.payment_id == public).limit(20)
            ids = list(session.scalars(query))
        elif order_id:
            query = select(Invoice.id).where(Invoice.order_id == order_id.strip()).limit(20)
            if tenant:
                query = query.where(Invoice.tenant_id == tenant.strip())
            ids = list(session.scalars(query))
        elif number:
            try:
                found = get_invoice(session, number.strip(), tenant.strip() if tenant else None)
                gone = history.tombstone(session, number.strip(), tenant.strip() if tenant else None) \
                    if found is None else None
            except AmbiguousInvoice as exc:
                return {"problem": f"{exc} (give the tenant)"}
            if gone is not None:
                return {"invoiceId": str(gone.invoice_id)}
            ids = [found.id] if found else []
        else:
            return {"problem": None}
    if not ids:
        return {"problem": "no invoice found"}
    if len(ids) > 1:
        return {"many": [str(i) for i in ids]}
    return {"invoiceId": str(ids[0])}


def invoice_page(invoice_id: str) -> dict[str, Any] | None:
    from models.queries import get_invoice
    from worker.storage import history

    with db.sessions()() as session:
        found = get_invoice(session, invoice_id)
        data = found.to_json() if found is not None else None
        changes = [history.to_json(r) for r in history.history(session, invoice_id)]
        gone = history.tombstone(session, invoice_id) if found is None else None
        tombstone = None if gone is None else {
            "sentence": history.deleted_sentence(gone), "deletedAt": gone.deleted_at, "messageId": gone.message_id,
            "task": gone.task, "tenantId": gone.tenant_id, "invoiceNumber": gone.invoice_number}
    if data is None and tombstone is None and not changes:
        return None
    return {"invoice": data, "history": changes, "tombstone": tombstone}
