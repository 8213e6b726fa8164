"""The dead-letter store: messages the worker could not apply, kept whole in PostgreSQL."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from worker import db
from worker.records import DeadLetter


@dataclass(frozen=True)
class Delivery:
    """What the broker handed us: the Celery task id, the task name, the body and headers."""

    delivery_id: str
    task_name: str
    body: Any
    headers: dict[str, Any]


def jsonable(value: Any) -> Any:
    """Bodies are stored as received. Bytes, and JSON that PostgreSQL's jsonb cannot hold (NUL
    characters), are kept exactly as base64; `original_body` gives them back."""
    if isinstance(value, (bytes, bytearray)):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii"), "encoding": "bytes"}
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return {"unserialisable": repr(value)}
    if "\\u0000" in text:
        return {"base64": base64.b64encode(text.encode("utf-8")).decode("ascii"), "encoding": "json"}
    return value


def original_body(stored: Any) -> Any:
    """The body as it was received, undoing `jsonable`'s base64 wrapping."""
    if isinstance(stored, dict) and set(stored) == {"base64", "encoding"}:
        raw = base64.b64decode(stored["base64"])
        return json.loads(raw) if stored["encoding"] == "json" else raw
    return stored


def store(delivery: Delivery, *, reason: str, error: str) -> None:
    """Keep the message whole; the same delivery dead-lettered again counts another attempt."""
    body = delivery.body
    message_id = body.get("messageId") if isinstance(body, dict) else None
    tenant_id = body.get("tenantId") if isinstance(body, dict) else None
    row = {
        "delivery_id": delivery.delivery_id, "task_name": delivery.task_name,
        "message_id": str(message_id)[:200] if message_id is not None else None,
        "tenant_id": str(tenant_id)[:200] if tenant_id is not None else None,
        "body": jsonable(body), "headers": jsonable(delivery.headers), "reason": reason, "error": error[:20_000],
    }
    statement = insert(DeadLetter).values(**row, attempts=1, status="open", first_seen=func.now(), last_seen=func.now())
    statement = statement.on_conflict_do_update(
        index_elements=["delivery_id"],
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


def to_json(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.id, "deliveryId": row.delivery_id, "taskName": row.task_name, "messageId": row.message_id,
        "tenantId": row.tenant_id, "reason": row.reason, "error": row.error, "attempts": row.attempts,
        "status": row.status, "firstSeen": row.first_seen.isoformat(), "lastSeen": row.last_seen.isoformat(),
        "body": row.body, "headers": row.headers,
    }
