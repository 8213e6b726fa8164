"""Micro-batched application of the message queues (payments, orders, commands).

Celery hands each message to a pool process and runs it in a transaction of its own: six
statements and a COMMIT, a pipe round trip and an ORM load per message. Here the worker's main
process gathers up to APPLY_BATCH_SIZE messages, or what arrived in APPLY_BATCH_WAIT_MS, and hands
them to a pool process as one job, which applies them in one transaction:

1. one statement claims every messageId of the batch in the inbox (in key order, so two batches
   never wait on each other crosswise); the messageIds another copy already took are duplicates,
   their first outcomes read with one more statement;
2. one statement loads and locks the batch's invoices, in id order (two batches never deadlock);
3. each message runs in its own savepoint, in arrival order: a rejection rolls back that message
   alone and commits its `command.rejected` event; a copy of a messageId already in the batch is
   a duplicate of it;
4. one multi-row statement each writes the outcomes, the outbox and the history; one COMMIT.

Every message of the batch is acknowledged only after that commit. Whatever the batch cannot
decide for one message alone (an invoice or payment not known yet, a broken body, a key taken
by a concurrent copy, anything unexpected) is handed back to the broker and comes back marked
redelivered: redelivered messages, retries (with their eta) and unusual calls take Celery's
ordinary path, one message per task, with all of its rules (the poison count, back-off, dead
letters). A passing fault of the whole batch (the database away) hands every message back the
same way, and so does a pool process that dies mid-batch: each message is then applied once, by
the inbox.

One file of ~600 lines on purpose: the gathering (main process) and the applying (pool process)
share the batch's item type and its hand-back rules, and each step above is read beside the next.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import psycopg
from celery import signals
from kombu.serialization import loads
from pydantic import BaseModel
from sqlalchemy import delete, func, or_, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, selectinload
from sqlalchemy.orm.exc import StaleDataError

from models.errors import DomainError
from models.invoice import Invoice
from worker.config import settings
from worker.delivery import dead_letters, revocation, task_events
from worker.delivery.handling import (
    CONFLICT_ATTEMPTS,
    CONFLICT_SQLSTATES,
    MalformedMessage,
    Operation,
    _sqlstate,
    dead_letter,
    parse,
    rejection,
)
from worker.operations import logs, metrics, tracing
from worker.storage import db
from worker.storage.unit_of_work import (
    HISTORY_INSERT,
    INBOX,
    OUTBOX_INSERT,
    RECORD,
    InvoiceAddress,
    Outcome,
    Preloaded,
    UnitOfWork,
    offline_payment_id,
)

log = logging.getLogger(__name__)

ACK, REQUEUE = "ack", "requeue"
# A check of the raw body before it is parsed (the callback signature): (reason, error) dead-letters it.
Check = Callable[[Any], tuple[str, str] | None]


@dataclass(frozen=True)
class Spec:
    schema: type[BaseModel]
    operation: Operation
    check: Check | None = None


BATCHABLE: dict[str, Spec] = {}


def batchable(task_name: str, schema: type[BaseModel], operation: Operation, check: Check | None = None) -> None:
    """Declare that a task's messages may be applied in batches: its body schema and operation."""
    BATCHABLE[task_name] = Spec(schema, operation, check)


# ---------------------------------------------------------------- the main process


@dataclass(frozen=True)
class Entry:
    """What a pool process needs of one message: picklable, and small (the body stays encoded)."""

    task: str
    delivery_id: str
    body: Any
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    events: bool = False  # its task-received was sent: its pool process sends its task-succeeded


@dataclass
class Pending:
    entry: Entry
    message: Any
    request: task_events.BatchedRequest

    def settle(self, action: str) -> None:
        """Acknowledge the message, or hand it back. A message of a connection lost meanwhile cannot
        be either (kombu raises, and Celery would stop the worker): the broker hands it back itself,
        and the inbox makes its next run a duplicate."""
        try:
            if action == ACK:
                self.message.ack()
            else:
                self.message.reject(requeue=True)
        except Exception as exc:
            log.warning("could not %s %s %s (%s: %s); its broker connection was lost and it comes back",
                        "acknowledge" if action == ACK else "hand back", self.entry.task, self.entry.delivery_id,
                        type(exc).__name__, exc)


def acknowledge(batch: list[Pending]) -> None:
    """Acknowledge messages together where the transport can (worker/brokers/redis_transport.py: one round
    trip per batch instead of one per message); else, or when that fails, one by one."""
    by_channel: dict[Any, list[Pending]] = {}
    for pending in batch:
        by_channel.setdefault(pending.message.channel, []).append(pending)
    for channel, group in by_channel.items():
        ack_many = getattr(channel, "basic_ack_many", None)
        if ack_many is not None and len(group) > 1:
            try:
                ack_many([p.message.delivery_tag for p in group])
            except Exception as exc:
                log.warning("could not acknowledge %d messages together (%s: %s); one by one",
                            len(group), type(exc).__name__, exc)
            else:
                for pending in group:
                    pending.message._state = "ACK"  # what kombu's Message.ack records after its basic_ack
                continue
        for pending in group:
            pending.settle(ACK)


def is_ordinary(message: Any) -> bool:
    """A first delivery of a plain message: no eta or retry count, not handed back before."""
    headers = message.headers or {}
    info = message.delivery_info or {}
    return not (headers.get("eta") or headers.get("retries") or headers.get("redelivered") or info.get("redelivered"))


class Batcher:
    """Gathers the batchable messages a worker's consumer receives and hands them to the pool."""

    def __init__(self, consumer: Any) -> None:
        config = settings()
        self.consumer = consumer
        self.size = config.apply_batch_size
        self.wait = config.apply_batch_wait_ms / 1000
        self.buffer: list[Pending] = []
        self.in_flight = 0
        self.due = False
        self.timer_ref: Any = None
        self.events = task_events.TaskEvents(consumer)

    def strategy(self, task: Any, ordinary: Callable[..., Any]) -> Callable[..., Any]:
        """The task's consumer strategy: batch first deliveries; the rest take Celery's path."""
        name = task.name
        consumer = self.consumer

        def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
            if body is not None or not is_ordinary(message):
                return ordinary(message, body, ack, reject, callbacks, **kwargs)
            headers = message.headers or {}
            task_id = str(headers.get("id") or message.delivery_tag)
            if revocation.is_revoked(task_id):
                self._refuse(message, name, task_id, None)
                return None
            request = self.events.request(task_id, task, message)
            entry = Entry(name, task_id, message.body, message.content_type, message.content_encoding,
                          {k: headers.get(k) for k in ("id", "root_id", "parent_id", "origin", *tracing.CONTEXT_HEADERS)},
                          self.events.received(request))
            self.buffer.append(Pending(entry, message, request))
            signals.task_received.send(sender=consumer, request=None)
            if len(self.buffer) >= self.size:
                self.flush()
            elif self.timer_ref is None:
                self.timer_ref = consumer.timer.call_after(self.wait, self._waited)
            return None

        return on_message

    def _waited(self) -> None:
        """The wait ran out: flush now when a pool process is free, else when the next batch ends
        (a longer wait while every process is busy costs nothing and makes the batch larger)."""
        self.timer_ref = None
        if self.in_flight < self.consumer.pool.num_processes:
            self.flush()
        else:
            self.due = True

    def _cancel_timer(self) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def _refuse(self, message: Any, name: str, task_id: str, request: task_events.BatchedRequest | None) -> None:
        """A revoked message: dead-lettered `revoked` and acknowledged, never applied."""
        log.info("Discarding revoked task: %s[%s]", name, task_id)  # Celery's line for its own requests
        if revocation.keep(message, name, task_id):
            try:
                message.ack()
            except Exception as exc:  # its connection was lost: it comes back, and is refused again
                log.warning("could not acknowledge revoked %s %s (%s)", name, task_id, exc)
            self.events.revoked(request, task_id)
        elif request is not None:  # handed back (the store is away): it is refused again when it returns
            self.events.forget([request])

    def _unrevoked(self, batch: list[Pending]) -> list[Pending]:
        """The batch without what was revoked while it gathered (refused here)."""
        kept = []
        for pending in batch:
            if revocation.is_revoked(pending.entry.delivery_id):
                self._refuse(pending.message, pending.entry.task, pending.entry.delivery_id, pending.request)
            else:
                kept.append(pending)
        return kept

    def flush(self) -> None:
        self._cancel_timer()
        self.due = False
        batch, self.buffer = self._unrevoked(self.buffer), []
        if not batch:
            return
        self.in_flight += 1

        def started(pid: int, time_accepted: float) -> None:
            self.events.started([p.request for p in batch], pid, time_accepted)

        def done(actions: list[str]) -> None:
            acknowledge([p for p, action in zip(batch, actions) if action == ACK])
            for pending, action in zip(batch, actions):
                if action != ACK:
                    pending.settle(action)
            self.events.ended([p.request for p in batch], [action != ACK for action in actions])
            self._ended()

        def lost(exc_info: Any) -> None:
            # The pool process died or ran out of time: nothing of the batch committed, or all of it;
            # each message comes back redelivered and runs alone, applied once by the inbox.
            log.error("a batch of %d messages was lost with its pool process (%s); handing them back",
                      len(batch), getattr(exc_info, "exception", exc_info))
            for pending in batch:
                pending.settle(REQUEUE)
            self.events.ended([p.request for p in batch], [True] * len(batch))
            self._ended()

        config = settings()
        self.consumer.pool.apply_async(apply_batch, ([p.entry for p in batch],), callback=done, error_callback=lost,
                                       accept_callback=started,
                                       soft_timeout=config.task_soft_time_limit, timeout=config.task_time_limit)

    def discard(self) -> None:
        self._cancel_timer()
        self.events.forget([p.request for p in self.buffer])  # they come back from the broker
        self.buffer = []

    def _ended(self) -> None:
        self.in_flight -= 1
        if self.buffer and (self.due or len(self.buffer) >= self.size):
            self.flush()


def install(consumer: Any) -> None:
    """Give the batchable tasks the batching strategy (APPLY_BATCH_SIZE above 1)."""
    if settings().apply_batch_size <= 1:
        return
    old = getattr(consumer, "batcher", None)
    if old is not None:  # the connection was lost: what the old one gathered comes back from the broker
        old.discard()
    batcher = Batcher(consumer)
    consumer.batcher = batcher
    for name in BATCHABLE:
        if name in consumer.strategies:
            consumer.strategies[name] = batcher.strategy(consumer.app.tasks[name], consumer.strategies[name])


# ---------------------------------------------------------------- a pool process


@dataclass
class Item:
    index: int
    entry: Entry
    body: Any
    spec: Spec
    message: Any = None
    outcome: Outcome | None = None
    copy_of: "Item | None" = None
    # Its invoice is held by another transaction: it leaves the batch and comes back later.
    deferred: bool = False
    span: Any = None  # its tracing span (worker/operations/tracing.py), None when tracing is off
    traceparent: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.message.tenant_id, self.message.message_id


def apply_batch(entries: list[Entry]) -> list[str]:
    """Apply a batch of messages; return, per message, whether to acknowledge it or hand it back."""
    with tracing.batch(len(entries)):
        return _apply_batch(entries)


def _apply_batch(entries: list[Entry]) -> list[str]:
    started = time.perf_counter()
    actions = [ACK] * len(entries)
    items: list[Item] = []
    for index, entry in enumerate(entries):
        item = _prepare(index, entry)
        if item is None:
            actions[index] = REQUEUE
        elif item.message is not None:
            items.append(item)
            if tracing.on():
                item.span = tracing.message_span(entry.task, entry.delivery_id, entry.headers, item.body)
                item.traceparent = tracing.traceparent_of(item.span)
    if items:
        for item in _apply(items):
            actions[item.index] = ACK if _send_again(item) else REQUEUE
    if tracing.on():
        for item in items:
            tracing.ended(item.span, item.outcome.outcome if actions[item.index] == ACK and item.outcome
                          else "sent-again" if actions[item.index] == ACK else "handed-back")
    seconds = (time.perf_counter() - started) / max(1, len(entries))
    for item in items:
        if actions[item.index] == ACK and item.outcome is not None:
            _report(item, seconds)
    task_events.flush()
    return actions


def _send_again(item: Item) -> bool:
    """A message that leaves its batch goes round again as Celery retries a task (same task id and
    body, `retries` one more, so it takes the ordinary path): not handed back to the broker, whose
    redelivery would count as a start of a dying message (the poison count, CONTRACT.md section 4).
    A message whose invoice another transaction holds comes back after a back-off (a row held for
    minutes by a long import must not make its messages spin); the others at once. False when it
    could not be sent: the broker then gets it back and counts that one start."""
    from celery import current_app

    from worker.brokers.topology import queue_for
    from worker.delivery.task_base import backoff

    headers = item.entry.headers
    retries = int(headers.get("retries") or 0)
    try:
        current_app.send_task(item.entry.task, args=[item.body], task_id=item.entry.delivery_id,
                              queue=queue_for(item.entry.task), retries=retries + 1,
                              countdown=backoff(retries) if item.deferred else None,
                              root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
                              headers=tracing.carried(headers) or None)
    except Exception as exc:  # noqa: BLE001 - the broker is away: it gets the message back instead
        log.warning("could not send %s %s again (%s: %s); handing it back", item.entry.task, item.entry.delivery_id,
                    type(exc).__name__, exc)
        return False
    reason = "its invoice is held elsewhere" if item.deferred else "it cannot be decided in its batch"
    log.info("%s %s leaves its batch (%s); sent again as a retry", item.entry.task, item.entry.delivery_id, reason)
    if item.entry.events:
        task_events.retried(item.entry.delivery_id, reason)
    return True


def _prepare(index: int, entry: Entry) -> Item | None:
    """The message parsed; dead-lettered here when its body is malformed (the Item then has no
    message); None when it must take the ordinary path."""
    spec = BATCHABLE[entry.task]
    try:
        args, kwargs, _embed = loads(entry.body, entry.content_type, entry.content_encoding, accept={"application/json"})
    except Exception:
        return None
    if not isinstance(args, (list, tuple)) or len(args) != 1 or kwargs:
        return None
    item = Item(index, entry, args[0], spec)
    try:
        problem = spec.check(item.body) if spec.check is not None else None
        if problem is not None:
            raise MalformedMessage(problem[1], problem[0])
        item.message = parse(spec.schema, item.body)
    except MalformedMessage as exc:
        delivery = dead_letters.Delivery(entry.delivery_id, entry.task, item.body,
                                         {**entry.headers, "task": entry.task, "batched": True})
        try:
            item.outcome = dead_letter(delivery, exc.reason, exc.error)
        except Exception as error:
            log.warning("cannot dead-letter %s %s in its batch (%s); handing it back", entry.task, entry.delivery_id, error)
            return None
        _report(item, 0.0)
    return item


class Unsure(Exception):
    """A message of a batch applied without savepoints raised: the batch runs again with them."""


def _apply(items: list[Item]) -> list[Item]:
    """Apply the parsed messages in one transaction; return those to hand back.

    The batch first runs without savepoints and with one flush at the end (a message costs no
    statement of its own then). When any message raises (a rejection, a key taken, anything), that
    attempt is rolled back and the batch runs again with a savepoint per message, so that the
    message alone is rolled back. A conflict of the whole batch (a deadlock, a lock wait that ran
    out) runs it again; a passing fault (the database away) hands it back."""
    savepoints = False
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        for item in items:
            item.outcome, item.copy_of = None, None
        try:
            with db.sessions()() as session:
                return _transaction(session, items, savepoints)
        except Unsure as exc:
            log.debug("a batch of %d messages runs again with a savepoint per message: %s", len(items), exc.__cause__)
            savepoints = True
            continue
        except (DBAPIError, psycopg.Error) as exc:
            state = _sqlstate(exc)
            if state in CONFLICT_SQLSTATES and attempt < CONFLICT_ATTEMPTS:
                log.info("a batch of %d messages met conflict %s, attempt %d; running it again", len(items), state, attempt)
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
                continue
            log.warning("a batch of %d messages could not be applied (%s); handing them back", len(items), exc)
            return items
        except Exception:
            log.exception("a batch of %d messages broke; handing them back", len(items))
            return items
    return items


def _transaction(session: Session, items: list[Item], savepoints: bool) -> list[Item]:
    connection = session.connection()
    first: dict[tuple[str, str], Item] = {}
    for item in items:
        item.copy_of = first.get(item.key)
        if item.copy_of is None:
            first[item.key] = item
    with tracing.step("claim"):
        claimed = _claim(connection, list(first.values()))
        earlier = _first_outcomes(connection, [item.key for item in first.values() if item.key not in claimed])
    fresh = [item for item in first.values() if item.key in claimed]
    with tracing.step("load"):
        preloaded, held = _load_and_lock(session, fresh)

    outbox: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    handed_back: list[Item] = []
    for item in items:
        if item.copy_of is not None:
            continue
        if item.key not in claimed:
            item.outcome = earlier.get(item.key)
            if item.outcome is None:  # its first copy's record is gone meanwhile: the ordinary path decides
                handed_back.append(item)
            continue
        if held and _invoice_key(item) in held:  # waiting here would hold the whole batch: it goes round
            item.deferred = True
            handed_back.append(item)
            continue
        uow = UnitOfWork(session, tenant_id=item.message.tenant_id, message_id=item.message.message_id,
                         task=item.entry.task)
        uow.preloaded = preloaded
        uow.traceparent = item.traceparent
        if savepoints:
            outcome = _in_savepoint(session, uow, item)
            if outcome is None:
                handed_back.append(item)
                continue
        else:
            try:
                outcome = item.spec.operation(uow, item.message) or Outcome("applied", item.message.message_id)
                uow.flush_events()
            except Exception as exc:
                raise Unsure(f"{item.entry.task} {item.message.message_id}") from exc
        item.outcome = outcome
        outbox.extend(uow._outbox)
        history.extend(uow._history)
    if not savepoints:
        try:
            with tracing.step("flush"):
                session.flush()
        except (IntegrityError, DataError, StaleDataError) as exc:
            raise Unsure("the batch's flush") from exc

    with tracing.step("commit"):  # the batch's multi-row writes and its COMMIT
        _write(session, connection, items, claimed, handed_back, outbox, history)

    for item in items:
        if item.copy_of is not None:
            if item.copy_of in handed_back:
                item.deferred = item.copy_of.deferred
                handed_back.append(item)
            else:
                item.outcome = _as_duplicate(item.copy_of.outcome, item.message.message_id)
    return handed_back


def _write(session: Session, connection: Any, items: list[Item], claimed: set[tuple[str, str]],
           handed_back: list[Item], outbox: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
    if handed_back:  # their claims go, so that their next run is not taken for a duplicate
        keys = [item.key for item in handed_back if item.key in claimed]
        if keys:
            connection.execute(delete(INBOX).where(tuple_(INBOX.c.tenant_id, INBOX.c.message_id).in_(keys)))
    records = [_record_row(item) for item in items if item.copy_of is None and item.key in claimed
               and item not in handed_back]
    if records:
        connection.execute(RECORD, records)
    if outbox:
        connection.execute(OUTBOX_INSERT, outbox)
    if history:
        connection.execute(HISTORY_INSERT, history)
    session.commit()


def _in_savepoint(session: Session, uow: UnitOfWork, item: Item) -> Outcome | None:
    """Apply one message in a savepoint: its outcome, or None when it must leave the batch."""
    savepoint = session.begin_nested()
    try:
        outcome = item.spec.operation(uow, item.message) or Outcome("applied", item.message.message_id)
        uow.flush_events()
        session.flush()
        savepoint.commit()
        return outcome
    except DomainError as error:
        savepoint.rollback()
        uow._outbox.clear()
        uow._history.clear()
        uow._touched.clear()
        return rejection(uow, item.entry.task, item.message, error)
    except Exception as exc:  # not decidable here (not known yet, a key race, a bug): alone, later
        savepoint.rollback()
        log.info("%s %s leaves its batch: %s: %s", item.entry.task, item.message.message_id, type(exc).__name__, exc)
        return None


# One statement for the whole batch (insertmanyvalues: SQLAlchemy sends the rows as one INSERT, and
# the statement is compiled once, whatever the batch's size).
_CLAIM_MANY = (insert(INBOX).values(outcome="applied", processed_at=func.now()).on_conflict_do_nothing()
               .returning(INBOX.c.tenant_id, INBOX.c.message_id))


def _claim(connection: Any, items: list[Item]) -> set[tuple[str, str]]:
    """Take the batch's messageIds, in key order; the ones another copy already took are not returned."""
    rows = [{"tenant_id": tenant, "message_id": message, "task": task}
            for (tenant, message), task in sorted((item.key, item.entry.task) for item in items)]
    return {(row.tenant_id, row.message_id) for row in connection.execute(_CLAIM_MANY, rows)}


def _first_outcomes(connection: Any, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Outcome]:
    if not keys:
        return {}
    rows = connection.execute(select(INBOX).where(tuple_(INBOX.c.tenant_id, INBOX.c.message_id).in_(keys))).mappings()
    return {
        (row["tenant_id"], row["message_id"]): Outcome(
            "duplicate", row["message_id"], reason=row["reason"], invoice_id=row["invoice_id"],
            invoice_number=row["invoice_number"], extra={"firstOutcome": row["outcome"], **(row["result"] or {})})
        for row in rows
    }


# Tasks whose operation reads an invoice's payments; a batch without them does not load any.
RECORDS_ONLY = frozenset({"invoices.record_payment"})


def _invoice_key(item: Item) -> tuple[str, Any, Any] | None:
    """How the message names its invoice: (tenant, "id", id) or (tenant, "number", number)."""
    address: InvoiceAddress | None = getattr(item.message, "address", None)
    if address is None:
        return None
    if address.invoice_id is not None:
        return item.message.tenant_id, "id", address.invoice_id
    if address.invoice_number is not None:
        return item.message.tenant_id, "number", address.invoice_number
    return None


# How long a batch waits for an invoice another transaction holds before its messages leave the
# batch: another batch holds its invoices for the few tens of milliseconds it takes to apply, and a
# hot invoice (one customer paying in instalments through many channels) is in every batch; a long
# import holds its invoices for seconds, longer than this.
HELD_WAIT_MS = 500


def _load_and_lock(session: Session, items: list[Item]) -> tuple[Preloaded, set[tuple[str, Any, Any]]]:
    """Every invoice the batch's messages name, locked in id order, skipping those another
    transaction holds; those are then waited for, HELD_WAIT_MS at most (another batch's commit),
    and the ones still held (a long import, an operator's transaction: waiting for one made every
    message of the batch wait LOCK_TIMEOUT_MS, eight times, then go back whole) are returned beside
    them: the keys of the invoices that exist but were held, whose messages leave the batch.
    Their payments are loaded with them only when a message of the batch reads payments; a batch of
    offline payments reads just the ids of the payments the invoices have (for its duplicate
    check), without the ORM."""
    by_number, by_id = set(), set()
    for item in items:
        key = _invoice_key(item)
        if key is not None:
            (by_id if key[1] == "id" else by_number).add((key[0], key[2]))
    if not by_number and not by_id:
        return Preloaded([]), set()
    with_payments = any(item.entry.task not in RECORDS_ONLY for item in items)

    def locked(skip: bool) -> list[Invoice]:
        query = select(Invoice).where(_addressed(by_number, by_id)).order_by(Invoice.id).with_for_update(
            of=Invoice, skip_locked=skip)
        return list(session.scalars(query.options(selectinload(Invoice.payments)) if with_payments else query))

    invoices = locked(True)
    _forget(invoices, by_number, by_id)
    if by_number or by_id:  # held by another transaction, or not there: wait a moment for the held ones
        invoices.extend(_waited(session, lambda: locked(False)))
        _forget(invoices, by_number, by_id)
    preloaded = Preloaded(invoices) if with_payments else Preloaded(invoices, _existing_payments(session, items, invoices))
    if not by_number and not by_id:
        return preloaded, set()
    # Not locked: held elsewhere, or not there at all (a message out of order). Read without a lock.
    held: set[tuple[str, Any, Any]] = set()
    for tenant, invoice_id, number in session.execute(
            select(Invoice.tenant_id, Invoice.id, Invoice.invoice_number).where(_addressed(by_number, by_id))):
        if (tenant, invoice_id) in by_id:
            held.add((tenant, "id", invoice_id))
        if (tenant, number) in by_number:
            held.add((tenant, "number", number))
    return preloaded, held


# Of the given (invoice, payment id) pairs, the ones that exist: a probe of the unique index
# uq_payments_invoice_id_payment_id per pair. The LIMIT keeps the lookup a nested loop over the
# pairs: as a plain join the planner hashed the whole of a young payments table, its statistics
# still those of when it was small (1.5 ms and 130 pages a batch at 7,700 payments, growing).
EXISTING_PAYMENTS = text(
    "SELECT c.invoice_id, c.payment_id "
    "FROM unnest(CAST(:invoices AS uuid[]), CAST(:payments AS uuid[])) AS c(invoice_id, payment_id) "
    "CROSS JOIN LATERAL (SELECT FROM payments AS p WHERE p.invoice_id = c.invoice_id AND p.payment_id = c.payment_id "
    "LIMIT 1) AS found")


def _existing_payments(session: Session, items: list[Item], invoices: list[Invoice]) -> set[tuple[Any, Any]]:
    """Of the payments the batch's record_payment messages would make (their ids derived from the
    messages), the ones their invoices already have: the duplicate check of a copy whose inbox row
    was pruned. Reading every payment id of the batch's invoices instead grew each batch with every
    instalment an invoice had taken (the growth curve: a batch's load and lock 9% of a pool
    process's samples on young invoices, 44% once they held about 60 payments each)."""
    by_key: dict[tuple[str, str, Any], Invoice] = {}
    for invoice in invoices:
        by_key[(invoice.tenant_id, "id", invoice.id)] = invoice
        by_key[(invoice.tenant_id, "number", invoice.invoice_number)] = invoice
    pairs = []
    for item in items:
        invoice = by_key.get(_invoice_key(item)) if item.entry.task in RECORDS_ONLY else None
        if invoice is not None:
            pairs.append((invoice.id, offline_payment_id(item.message.tenant_id, item.message.message_id)))
    if not pairs:
        return set()
    rows = session.connection().execute(EXISTING_PAYMENTS, {"invoices": [invoice_id for invoice_id, _ in pairs],
                                                            "payments": [payment_id for _, payment_id in pairs]})
    return {(row.invoice_id, row.payment_id) for row in rows}


def _forget(invoices: list[Invoice], by_number: set[tuple[str, str]], by_id: set[tuple[str, Any]]) -> None:
    by_number -= {(i.tenant_id, i.invoice_number) for i in invoices}
    by_id -= {(i.tenant_id, i.id) for i in invoices}


def _waited(session: Session, lock: Callable[[], list[Invoice]]) -> list[Invoice]:
    """The invoices `lock` locks waiting HELD_WAIT_MS at most, in a savepoint: when the wait runs
    out (or meets a deadlock) only the savepoint rolls back, and the invoices count as held."""
    savepoint = session.begin_nested()
    try:
        session.execute(text(f"SET LOCAL lock_timeout = {HELD_WAIT_MS}"))
        invoices = lock()
        session.execute(text(f"SET LOCAL lock_timeout = {settings().lock_timeout_ms}"))
        savepoint.commit()
        return invoices
    except (DBAPIError, psycopg.Error) as exc:
        if _sqlstate(exc) not in CONFLICT_SQLSTATES:
            raise
        savepoint.rollback()  # the lock_timeout set inside it goes with it
        return []


def _addressed(by_number: set[tuple[str, str]], by_id: set[tuple[str, Any]]) -> Any:
    conditions = []
    if by_number:
        conditions.append(tuple_(Invoice.tenant_id, Invoice.invoice_number).in_(sorted(by_number)))
    if by_id:
        conditions.append(tuple_(Invoice.tenant_id, Invoice.id).in_(sorted(by_id, key=str)))
    return or_(*conditions)


def _record_row(item: Item) -> dict[str, Any]:
    outcome = item.outcome
    assert outcome is not None
    return {"tenant": item.message.tenant_id, "message": item.message.message_id, "outcome": outcome.outcome,
            "reason": outcome.reason, "detail": outcome.detail, "invoice_id": outcome.invoice_id,
            "invoice_number": outcome.invoice_number, "result": outcome.extra or None}


def _as_duplicate(first: Outcome | None, message_id: str) -> Outcome | None:
    if first is None:
        return None
    if first.outcome == "duplicate":
        return Outcome("duplicate", message_id, reason=first.reason, invoice_id=first.invoice_id,
                       invoice_number=first.invoice_number, extra=first.extra)
    return Outcome("duplicate", message_id, reason=first.reason, invoice_id=first.invoice_id,
                   invoice_number=first.invoice_number, extra={"firstOutcome": first.outcome, **first.extra})


def _report(item: Item, seconds: float) -> None:
    from worker.operations.telemetry import OUTCOME_LABELS

    result = item.outcome.to_dict() if item.outcome is not None else {}
    outcome = OUTCOME_LABELS.get(result.get("outcome", "applied"), "applied")
    metrics.count_message(item.entry.task, outcome, result.get("reason"), seconds)
    if item.entry.events:
        task_events.succeeded(item.entry.delivery_id, result, seconds)
    if logs.wants_json():
        logs.task_line(item.entry.task, item.body, result, outcome, seconds, result.get("reason"))
    else:  # the line Celery writes for a task of its own
        log.info("Task %s[%s] succeeded in %.6fs (batched): %r", item.entry.task, item.entry.delivery_id, seconds, result)
