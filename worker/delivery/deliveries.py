"""Poison messages (CONTRACT.md section 4): a message whose worker process dies while running it
is handed back by the broker, but not forever. Redis keeps no delivery count, so the worker keeps
its own, in PostgreSQL, committed before the message runs (the message's own transaction dies with
its process). A first delivery costs nothing: only a delivery the broker marks as redelivered
(Redis and RabbitMQ both do when they hand a message back) is counted.

A message's starts are counted under its task id together with a digest of its body: the task id
alone is the publisher's choice, and five forged copies carrying another tenant's task id and
`redelivered` made that tenant's message `worker-lost` at its first real redelivery. Only copies of
the same message (same id, same body) share a count, and a copy that is the same message is
harmless: it has the same outcome. A batch never hands a message back to the broker (it sends it
again as a retry, worker/delivery/batching.py), so only deaths are counted."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import insert

from worker.storage import db
from worker.storage.records import DeliveryCount, InboxMessage

COUNTS = DeliveryCount.__table__
# A redelivery is at least the second start of the message.
_COUNT_START = (
    insert(COUNTS).values(delivery_id=bindparam("delivery"), task=bindparam("task"), starts=2)
    .on_conflict_do_update(index_elements=[COUNTS.c.delivery_id],
                           set_={"starts": COUNTS.c.starts + 1, "last_seen": func.now()})
    .returning(COUNTS.c.starts)
)
INBOX = InboxMessage.__table__
_HAS_OUTCOME = select(INBOX.c.outcome).where(INBOX.c.tenant_id == bindparam("tenant"),
                                             INBOX.c.message_id == bindparam("message"))


def delivery_key(task_id: str, body: Any) -> str:
    """The key a message's starts are counted under: its task id and a digest of its body."""
    try:
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        canonical = repr(body)
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{task_id}:{digest}"


def count_start(delivery_id: str, task: str) -> int:
    """Count one more start of a redelivered message; return how many starts it has had, this one
    included. Committed at once, so that a process that dies next does not take the count along."""
    with db.engine().begin() as connection:
        return int(connection.execute(_COUNT_START, {"delivery": delivery_id, "task": task}).scalar_one())


def has_outcome(body: object) -> bool:
    """Whether the message already reached an outcome: its copies are then plain duplicates."""
    if not isinstance(body, dict):
        return False
    tenant, message = body.get("tenantId"), body.get("messageId")
    if not isinstance(tenant, str) or not isinstance(message, str):
        return False
    with db.engine().connect() as connection:
        return connection.execute(_HAS_OUTCOME, {"tenant": tenant, "message": message}).first() is not None
