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
from dataclasses import dataclass
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
