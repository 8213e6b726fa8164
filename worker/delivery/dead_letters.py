"""The dead-letter store: messages the worker could not apply, kept whole in PostgreSQL; `keep`
stores a broker message the worker will not run (the consumer's refusals, a revoked task id)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import reprlib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from worker.brokers.topology import ROUTES
from worker.operations import metrics
from worker.storage import db
from worker.storage.records import DeadLetter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What the broker handed us: the Celery task id, the task name, the body and headers."""

    delivery_id: str
    task_name: str
    body: Any
    headers: dict[str, Any]


# Beyond this, a body is kept as its first bytes, its length and its SHA-256 (the reason says so):
# a dead letter must always be storable, and PostgreSQL's jsonb holds at most 255 MB.
MAX_STORED_BYTES = 32 * 1024 * 1024
# jsonb refuses NUL and lone UTF-16 surrogates, which JSON text may carry as escapes.
_UNSTORABLE_ESCAPE = re.compile(r"\\u0000|\\ud[89a-f][0-9a-f]{2}", re.IGNORECASE)


def _raw(data: bytes, encoding: str) -> dict[str, Any]:
    if len(data) <= MAX_STORED_BYTES:
        return {"base64": base64.b64encode(data).decode("ascii"), "encoding": encoding}
    return {"base64": base64.b64encode(data[:MAX_STORED_BYTES]).decode("ascii"), "encoding": f"{encoding}-truncated",
            "length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def jsonable(value: Any) -> Any:
    """Bodies are stored as received. Bytes, and JSON that jsonb cannot hold (NUL characters,
    lone surrogates, Infinity or NaN, more than MAX_STORED_BYTES), are kept as base64; `original_body` gives them
    back. Whatever the value, this returns something storable: it never raises."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _raw(bytes(value), "bytes")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError, OverflowError) as exc:
        shown = reprlib.Repr()  # bounded: depth 6, strings and lists cut short
        shown.maxstring = shown.maxother = 10_000
        return {"unserialisable": shown.repr(value), "error": f"{type(exc).__name__}: {exc}"[:1000]}
    if len(text) > MAX_STORED_BYTES or _UNSTORABLE_ESCAPE.search(text) or _beyond_json(value, text):
        return _raw(text.encode("utf-8", errors="surrogatepass"), "json")
    return value


def _beyond_json(value: Any, text: str) -> bool:
    """Infinity or NaN: Python's JSON (kombu's) writes and reads them, jsonb refuses them (a body
    carrying one could not be dead-lettered and went round the broker for ever)."""
    if "Infinity" not in text and "NaN" not in text:
        return False
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return True
    return False


def original_body(stored: Any) -> Any:
    """The body as it was received, undoing `jsonable`'s base64 wrapping."""
    if isinstance(stored, dict) and {"base64", "encoding"} <= set(stored) and stored["encoding"] in ("json", "bytes"):
        raw = base64.b64decode(stored["base64"])
        return json.loads(raw.decode("utf-8", errors="surrogatepass")) if stored["encoding"] == "json" else raw
    return stored


def _clip(value: Any, length: int) -> str | None:
    return None if value is None else str(value)[:length]


def fingerprint(delivery: Delivery, tenant_id: str | None, message_id: str | None, body: Any) -> str:
    """The dead letter's own key: the same delivery of the same message again is one row (another
    attempt); a publisher that reuses a task id for another message, or another tenant's, gets a
    row of its own and can neither reopen nor overwrite someone else's."""
    digest = hashlib.sha256()
    for part in (delivery.delivery_id, delivery.task_name, tenant_id, message_id,
                 json.dumps(body, sort_keys=True, default=str)):
        digest.update(str(part).encode("utf-8", errors="surrogatepass") + b"\x1f")
    return digest.hexdigest()


def store(delivery: Delivery, *, reason: str, error: str) -> None:
    """Keep the message whole; the same delivery dead-lettered again counts another attempt.
    Raises only when the database cannot be reached: callers then hand the message back."""
    body = delivery.body
    message_id = body.get("messageId") if isinstance(body, dict) else None
    tenant_id = body.get("tenantId") if isinstance(body, dict) else None
    stored_body = jsonable(body)
    row = {
        "fingerprint": fingerprint(delivery, tenant_id, message_id, stored_body),
        "delivery_id": _clip(delivery.delivery_id, 200), "task_name": _clip(delivery.task_name, 200),
        "message_id": _clip(message_id, 200), "tenant_id": _clip(tenant_id, 200),
        "body": stored_body, "headers": jsonable(delivery.headers), "reason": reason[:50],
        "error": error.encode("utf-8", errors="replace").decode("utf-8").replace("\x00", "")[:20_000],
    }
    statement = insert(DeadLetter).values(**row, attempts=1, status="open", first_seen=func.now(), last_seen=func.now())
    statement = statement.on_conflict_do_update(
        index_elements=["fingerprint"],
        set_={"attempts": DeadLetter.attempts + 1, "last_seen": func.now(), "error": statement.excluded.error,
              "reason": statement.excluded.reason, "status": "open"},
    )
    with db.sessions().begin() as session:
        session.execute(statement)


def listing(status: str | None = "open", limit: int = 100) -> list[DeadLetter]:
    with db.sessions()() as session:
        query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
        if status:
            query = query.where(DeadLetter.status == status)
        return list(session.scalars(query))


def get(dead_letter_id: int) -> DeadLetter | None:
    with db.sessions()() as session:
        return session.get(DeadLetter, dead_letter_id)


def get_by_delivery(delivery_id: str) -> DeadLetter | None:
    with db.sessions()() as session:
        return session.scalars(select(DeadLetter).where(DeadLetter.delivery_id == delivery_id)).first()


def set_status(dead_letter_id: int, status: str) -> None:
    with db.sessions().begin() as session:
        row = session.get(DeadLetter, dead_letter_id, with_for_update=True)
        if row is not None:
            row.status = status


@dataclass(frozen=True)
class Filter:
    """Which dead letters an operator means: the same selection for a list, a count and a bulk
    action (CLI and console). `up_to_id` pins a bulk action to the rows that were counted when it
    was confirmed: a dead letter stored after that is not swept along."""

    status: str | None = "open"
    reason: str | None = None
    task: str | None = None
    tenant: str | None = None
    older_than_minutes: int | None = None  # last seen at least this long ago
    newer_than_minutes: int | None = None  # last seen at most this long ago
    up_to_id: int | None = None

    def where(self) -> list[Any]:
        now = datetime.now(timezone.utc)
        clauses: list[Any] = []
        if self.status:
            clauses.append(DeadLetter.status == self.status)
        if self.reason:
            clauses.append(DeadLetter.reason == self.reason)
        if self.task:
            clauses.append(DeadLetter.task_name == self.task)
        if self.tenant:
            clauses.append(DeadLetter.tenant_id == self.tenant)
        if self.older_than_minutes is not None:
            clauses.append(DeadLetter.last_seen <= now - timedelta(minutes=self.older_than_minutes))
        if self.newer_than_minutes is not None:
            clauses.append(DeadLetter.last_seen >= now - timedelta(minutes=self.newer_than_minutes))
        if self.up_to_id is not None:
            clauses.append(DeadLetter.id <= self.up_to_id)
        return clauses

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


def page(selection: Filter, before_id: int | None = None, limit: int = 50) -> list[DeadLetter]:
    """Newest first, `limit` rows with an id below `before_id`: keyset pagination, as fast on page
    2,000 as on page 1 (the (status, id) indexes; no OFFSET)."""
    query = select(DeadLetter).where(*selection.where()).order_by(DeadLetter.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(DeadLetter.id < before_id)
    with db.sessions()() as session:
        return list(session.scalars(query))


def count(selection: Filter) -> tuple[int, int | None]:
    """How many dead letters the filter selects, and the highest id among them (a bulk action's `up_to_id`)."""
    with db.sessions()() as session:
        number, highest = session.execute(select(func.count(), func.max(DeadLetter.id)).where(*selection.where())).one()
    return number, highest


def count_up_to(selection: Filter, cap: int) -> int:
    """How many the filter selects, counting no further than `cap` (a list shows "10,000+")."""
    inner = select(DeadLetter.id).where(*selection.where()).limit(cap).subquery()
    with db.sessions()() as session:
        return session.execute(select(func.count()).select_from(inner)).scalar_one()


def reasons(status: str = "open") -> list[str]:
    """The reasons among the dead letters of a status: a skip scan of the (status, reason, id)
    index, a handful of index probes however many rows there are."""
    from sqlalchemy import text

    with db.sessions()() as session:
        return list(session.scalars(text("""
            WITH RECURSIVE r(reason) AS (
              (SELECT reason FROM dead_letters WHERE status = :status ORDER BY reason LIMIT 1)
              UNION ALL
              SELECT (SELECT d.reason FROM dead_letters d WHERE d.status = :status AND d.reason > r.reason
                      ORDER BY d.reason LIMIT 1) FROM r WHERE r.reason IS NOT NULL)
            SELECT reason FROM r WHERE reason IS NOT NULL"""), {"status": status}))


def by_reason(status: str = "open") -> list[tuple[str, int]]:
    with db.sessions()() as session:
        rows = session.execute(select(DeadLetter.reason, func.count()).where(DeadLetter.status == status)
                               .group_by(DeadLetter.reason).order_by(func.count().desc()))
        return [(reason, number) for reason, number in rows]


class NotReplayable(Exception):
    """The dead letter cannot be replayed as it is (discarded, missing, or its body was not JSON)."""


def replay(dead_letter_id: int, app: Any, body: Any = None) -> dict[str, Any]:
    """Send the stored body again as its task (or a corrected `body`), under a new task id, then
    mark the dead letter replayed. The message goes through the broker like any other: its
    messageId keeps it exactly once (a replay of something that was applied meanwhile is a
    duplicate). `app` is the publishing Celery app (worker.celery_app.publishing_app())."""
    from worker.brokers.topology import queue_for

    row = get(dead_letter_id)
    if row is None:
        raise NotReplayable(f"no dead letter {dead_letter_id}")
    if row.status == "discarded":
        raise NotReplayable(f"dead letter {dead_letter_id} was discarded")
    body = original_body(row.body) if body is None else body
    if isinstance(body, bytes):
        raise NotReplayable(f"dead letter {dead_letter_id} was not JSON; give a corrected body")
    task_id = str(uuid.uuid4())
    app.send_task(row.task_name, args=[body], queue=queue_for(row.task_name), task_id=task_id)
    set_status(dead_letter_id, "replayed")
    return {"id": dead_letter_id, "task": row.task_name, "replayedAs": task_id}


def discard(dead_letter_id: int) -> None:
    """Kept for the record, never replayed."""
    if get(dead_letter_id) is None:
        raise NotReplayable(f"no dead letter {dead_letter_id}")
    set_status(dead_letter_id, "discarded")


@dataclass
class BulkResult:
    done: list[int]
    failed: dict[int, str]


def bulk(selection: Filter, action: str, app: Any = None, chunk: int = 500) -> BulkResult:
    """Replay or discard every dead letter the filter selects (pin it with `up_to_id` first: see
    Filter), one row at a time through `replay` and `discard`, so that each keeps its guarantees."""
    if action not in ("replay", "discard"):
        raise ValueError(f"unknown bulk action {action!r}")
    result = BulkResult([], {})
    before: int | None = None
    while True:
        rows = page(selection, before, chunk)
        if not rows:
            return result
        for row in rows:
            try:
                if action == "replay":
                    replay(row.id, app)
                else:
                    discard(row.id)
                result.done.append(row.id)
            except NotReplayable as exc:
                result.failed[row.id] = str(exc)
        before = rows[-1].id


def to_json(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.id, "deliveryId": row.delivery_id, "taskName": row.task_name, "messageId": row.message_id,
        "tenantId": row.tenant_id, "reason": row.reason, "error": row.error, "attempts": row.attempts,
        "status": row.status, "firstSeen": row.first_seen.isoformat(), "lastSeen": row.last_seen.isoformat(),
        "body": row.body, "headers": row.headers,
    }


def of_message(message: Any, body: Any) -> Delivery:
    """A broker message as a Delivery: its task id, task name, body (decoded when given None) and headers."""
    headers = dict(message.headers or {})
    if body is None:  # protocol 2 leaves decoding to the pool; decode here to keep the body whole
        try:
            body = message.decode()
        except Exception:
            body = message.body
    if isinstance(body, (list, tuple)) and body and isinstance(body[0], (list, tuple)):
        args = list(body[0])
        body = args[0] if len(args) == 1 else {"args": args}
    delivery_id = str(headers.get("id") or message.delivery_tag or id(message))
    return Delivery(delivery_id, str(headers.get("task") or "?"), body, {**headers, "contentType": message.content_type})


def keep(message: Any, body: Any, reason: str, error: str,
         later: Callable[[float, Callable[[], None]], Any] | None = None) -> bool:
    """Dead-letter the message; when the store cannot be reached, hand the message back to the
    broker a second later (so that a database outage is not a busy loop) and say so: a message is
    never acknowledged before it is stored. With `later` (the consumer's event-loop timer) the
    message waits unacknowledged meanwhile; without, this sleeps (a pause of every message the
    consumer handles, which the consumer must not pay)."""
    try:
        store(of_message(message, body), reason=reason, error=error)
        task = str((message.headers or {}).get("task"))
        metrics.count_message(task if task in ROUTES else "unknown", "dead_lettered")  # any name: not a label
        return True
    except Exception as exc:
        log.error("could not dead-letter a %s message (%s); handing it back to the broker", reason, exc)

        def hand_back() -> None:
            try:
                message.reject(requeue=True)
            except Exception:  # the broker is away too: it hands the message back itself
                log.warning("could not hand the message back; the broker will", exc_info=True)

        if later is not None:
            later(HAND_BACK_SECONDS, hand_back)
        else:
            time.sleep(HAND_BACK_SECONDS)
            hand_back()
        return False


# How long a message that could not be dead-lettered waits before it goes back to the broker.
HAND_BACK_SECONDS = 1.0
