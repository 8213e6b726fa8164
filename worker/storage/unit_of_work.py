"""The unit of work: one transaction per message holding the change, its inbox record and its
outbox events, so that a message is applied at most once and its events exist iff it committed."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, bindparam, cast, exists, false, func, inspect, literal, null, select, true, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from models.address import InvoiceAddress
from models.errors import DomainError, InvoiceNotYetKnown
from models.invoice import Invoice
from worker.config import settings
from worker.storage.invoice_numbers import NEXT_NUMBER
from worker.storage.records import DeletedInvoice, InboxMessage, InvoiceHistory, InvoiceWait, OutboxEvent


@dataclass
class Outcome:
    """How a message ended: applied, duplicate, rejected or dead-lettered (CONTRACT.md section 4)."""

    outcome: str
    message_id: str | None
    reason: str | None = None
    detail: str | None = None
    invoice_id: uuid.UUID | None = None
    invoice_number: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        result = {"outcome": self.outcome, "messageId": self.message_id}
        if self.reason:
            result["reason"] = self.reason
        if self.detail:
            result["detail"] = self.detail
        if self.invoice_id:
            result["invoiceId"] = str(self.invoice_id)
        if self.invoice_number:
            result["invoiceNumber"] = self.invoice_number
        return {**result, **self.extra}


# The inbox and outbox statements of every message, built once: they run through the connection
# (Core), not the ORM, which would build, cache-key and synchronise them anew each time.
INBOX = InboxMessage.__table__
_claimed = (
    insert(INBOX)
    .values(tenant_id=bindparam("tenant"), message_id=bindparam("message"), task=bindparam("task"),
            outcome="applied", processed_at=func.now())
    .on_conflict_do_nothing()
    .returning(literal(1).label("fresh"))
    .cte("claimed")
)
_FIRST_COLUMNS = (INBOX.c.outcome, INBOX.c.reason, INBOX.c.invoice_id, INBOX.c.invoice_number, INBOX.c.result)
_FIRST = select(*_FIRST_COLUMNS).where(INBOX.c.tenant_id == bindparam("tenant"),
                                       INBOX.c.message_id == bindparam("message"))
# One round trip: the claim, or else the first copy's record. When the first copy committed while
# this one waited on it, the record is not in this statement's snapshot and neither row comes back.
CLAIM = select(true().label("fresh"), *(null().cast(c.type).label(c.name) for c in _FIRST_COLUMNS)).select_from(
    _claimed).union_all(
    select(false().label("fresh"), *_FIRST_COLUMNS).where(_FIRST.whereclause, ~exists(select(_claimed.c.fresh)))
)
RECORD = (
    update(INBOX)
    .where(INBOX.c.tenant_id == bindparam("tenant"), INBOX.c.message_id == bindparam("message"))
    .values(outcome=bindparam("outcome"), reason=bindparam("reason"), detail=bindparam("detail"),
            invoice_id=bindparam("invoice_id"), invoice_number=bindparam("invoice_number"),
            result=bindparam("result"))
)
OUTBOX_INSERT = OutboxEvent.__table__.insert()
TOMBSTONE_INSERT = DeletedInvoice.__table__.insert()
HISTORY_INSERT = InvoiceHistory.__table__.insert()
WAITS = InvoiceWait.__table__
# When this message first looked for its invoice, kept across its retries (a statement of its own
# transaction: the message's transaction rolls back). Runs only when an invoice is missing.
_WAITED = (
    insert(WAITS).values(tenant_id=bindparam("tenant"), message_id=bindparam("message"))
    .on_conflict_do_update(index_elements=[WAITS.c.tenant_id, WAITS.c.message_id],
                           set_={"first_seen": WAITS.c.first_seen})
    .returning(cast(func.extract("epoch", func.clock_timestamp() - WAITS.c.first_seen) * 1000, BigInteger)
               .label("waited_ms"))
)

ID_NAMESPACE = uuid.UUID("5d6f0c1e-8a7b-4c3d-9e2f-1a0b2c3d4e5f")


def derived_id(purpose: str, tenant_id: str, *parts: object) -> uuid.UUID:
    """A stable id from the message that creates a thing: a replay creates the same id. The purpose
    and the tenant are part of it, and the parts are JSON-encoded (not joined by a separator a
    publisher could put inside an id): no message can produce the id of another tenant's payment
    or of the scheduler's retry."""
    return uuid.uuid5(ID_NAMESPACE, json.dumps([purpose, tenant_id, *(str(p) for p in parts)]))


def offline_payment_id(tenant_id: str, message_id: str) -> uuid.UUID:
    """The paymentId of a payment recorded offline (invoices.record_payment): derived from its
    message, so that a copy of the message makes the same payment."""
    return derived_id("payment", tenant_id, message_id)


def occurred_at(moment: datetime) -> str:
    """An event's occurredAt: UTC, milliseconds, Z."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_envelope(*, type_: str, tenant_id: str, invoice_id: uuid.UUID | None, invoice_number: str | None,
                   sequence: int | None, causation_id: str | None, data: dict[str, Any],
                   at: str | None = None) -> dict[str, Any]:
    """The published shape of every event (CONTRACT.md section 6). `at`: occurredAt made once for
    many events of one moment (bulk import's batch), else now."""
    return {
        "eventId": str(uuid.uuid4()), "type": type_, "tenantId": tenant_id,
        "invoiceId": str(invoice_id) if invoice_id else None, "invoiceNumber": invoice_number,
        "sequence": sequence, "occurredAt": at or occurred_at(datetime.now(timezone.utc)),
        "causationId": causation_id, "data": data,
    }


def history_row(invoice: Invoice, events: list[dict[str, Any]], status_before: str | None, *,
                message_id: str | None, causation_id: str | None, task: str) -> dict[str, Any]:
    """The invoice_history row of one change: what caused it, its events, the status before and
    after (None after: deleted), and the amounts after."""
    return {
        "tenant_id": invoice.tenant_id, "invoice_id": invoice.id, "invoice_number": invoice.invoice_number,
        "message_id": message_id, "causation_id": causation_id, "task": task, "events": events,
        "status_before": None if status_before is None else str(status_before),
        "status_after": None if invoice.is_deleted else str(invoice.status),
        "currency": invoice.currency, "invoice_total": invoice.invoice_total, "amount_paid": invoice.amount_paid,
        "balance": invoice.balance,
    }


class Preloaded:
    """Invoices loaded (and locked) for a batch of messages, found by their address without a query.
    An address it does not hold is looked up as usual: the batch may have created it since."""

    def __init__(self, invoices: list[Invoice], payment_ids: set[tuple[uuid.UUID, uuid.UUID]] | None = None) -> None:
        self._by_id = {(i.tenant_id, i.id): i for i in invoices}
        self._by_number = {(i.tenant_id, i.invoice_number): i for i in invoices}
        # (invoice id, public payment id) of every payment these invoices had when the batch began, read
        # without loading the payments themselves; None when the batch did not read them.
        self.payment_ids = payment_ids

    def get(self, tenant_id: str, address: InvoiceAddress) -> Invoice | None:
        if address.invoice_id is not None:
            invoice = self._by_id.get((tenant_id, address.invoice_id))
            if invoice is not None and address.invoice_number not in (None, invoice.invoice_number):
                return None
        else:
            invoice = self._by_number.get((tenant_id, address.invoice_number))
        if invoice is None or invoice.is_deleted or not inspect(invoice).persistent:
            return None
        return invoice


class UnitOfWork:
    def __init__(self, session: Session, *, tenant_id: str, message_id: str | None, task: str) -> None:
        self.session = session
        self.tenant_id = tenant_id
        self.message_id = message_id
        self.task = task
        # What caused the events: the messageId, or the scheduler's scan for its own changes.
        self.causation_id = message_id
        # Each invoice the message touched, with its status before the change (None: created now).
        self._touched: dict[Invoice, str | None] = {}
        self._outbox: list[dict[str, Any]] = []
        self._history: list[dict[str, Any]] = []
        # A batch's invoices, loaded and locked together before its messages run (worker/delivery/batching.py).
        self.preloaded: Preloaded | None = None
        # The traceparent of the message's span, kept with each event it writes (None: tracing off).
        self.traceparent: str | None = None

    # ----------------------------------------------------------------- inbox

    def claim(self) -> Outcome | None:
        """Record the messageId as taken. When another copy already took it, return that copy's
        outcome as a duplicate (waiting for a concurrent copy's transaction to finish first)."""
        if self.message_id is None:
            return None
        keys = {"tenant": self.tenant_id, "message": self.message_id}
        connection = self.session.connection()
        row = connection.execute(CLAIM, {**keys, "task": self.task}).mappings().first()
        if row is None:  # the first copy committed while this one waited on it
            row = connection.execute(_FIRST, keys).mappings().first()
            assert row is not None
        elif row["fresh"]:
            return None
        return Outcome("duplicate", self.message_id, reason=row["reason"], invoice_id=row["invoice_id"],
                       invoice_number=row["invoice_number"],
                       extra={"firstOutcome": row["outcome"], **(row["result"] or {})})

    def record(self, outcome: Outcome) -> None:
        if self.message_id is None:
            return
        self.session.connection().execute(RECORD, {
            "tenant": self.tenant_id, "message": self.message_id, "outcome": outcome.outcome,
            "reason": outcome.reason, "detail": outcome.detail, "invoice_id": outcome.invoice_id,
            "invoice_number": outcome.invoice_number, "result": outcome.extra or None,
        })

    # ----------------------------------------------------------------- invoices

    def find(self, address: InvoiceAddress, *, lock: bool = True) -> Invoice | None:
        """The tenant's invoice at that address, locked against concurrent changes."""
        if self.preloaded is not None:
            hit = self.preloaded.get(self.tenant_id, address)
            if hit is not None:
                return hit
        query = select(Invoice).where(Invoice.tenant_id == self.tenant_id)
        if address.invoice_id is not None:
            query = query.where(Invoice.id == address.invoice_id)
        if address.invoice_number is not None:
            query = query.where(Invoice.invoice_number == address.invoice_number)
        if lock:
            query = query.with_for_update()
        return self.session.scalars(query).first()

    def has_payment(self, invoice: Invoice, payment_id: uuid.UUID) -> bool:
        """Whether the invoice already has that payment, without loading its payments when they
        are not loaded yet (a payment recorded offline needs none of them)."""
        if "payments" in invoice.__dict__:
            return invoice.payment(payment_id) is not None
        if self.preloaded is not None and self.preloaded.payment_ids is not None and inspect(invoice).persistent:
            if (invoice.id, payment_id) in self.preloaded.payment_ids:
                return True
            return any(p.payment_id == payment_id for p in invoice.new_rows)
        return invoice.payment(payment_id) is not None

    def find_by_id(self, invoice_id: uuid.UUID) -> Invoice | None:
        invoice = self.find(InvoiceAddress(invoice_id=invoice_id))
        return self.track(invoice) if invoice is not None else None

    def find_order_invoice(self, order_id: str, shipment_id: str | None) -> Invoice | None:
        """The invoice an order_shipped message already made for (tenant, orderId, shipmentId)."""
        return self.session.scalars(
            select(Invoice).where(
                Invoice.tenant_id == self.tenant_id, Invoice.source == "order_shipped",
                Invoice.order_id == order_id, Invoice.shipment_id == (shipment_id or ""),
            )
        ).first()

    def invoice(self, address: InvoiceAddress) -> Invoice:
        """The invoice the message names, locked. A deleted one is rejected at once; one that does
        not exist yet is waited for (INVOICE_WAIT_SECONDS after the message was first seen), then
        rejected invoice-not-found."""
        invoice = self.find(address)
        if invoice is None:
            if address.invoice_id is not None and address.invoice_number is not None and self.find(
                InvoiceAddress(invoice_id=address.invoice_id), lock=False
            ):
                raise DomainError("invoice-address-mismatch",
                                  f"invoiceId {address.invoice_id} and invoiceNumber {address.invoice_number} name different invoices")
            gone = self.tombstone(address)
            if gone is not None:
                raise DomainError("invoice-not-found",
                                  f"{gone.invoice_number} of tenant {self.tenant_id} was deleted at "
                                  f"{gone.deleted_at.isoformat(timespec='seconds')} by message {gone.message_id}")
            self._wait_for(address)
        return self.track(invoice)

    def tombstone(self, address: InvoiceAddress) -> DeletedInvoice | None:
        """The record of the tenant's deleted invoice at that address, if it was deleted."""
        query = select(DeletedInvoice).where(DeletedInvoice.tenant_id == self.tenant_id)
        if address.invoice_id is not None:
            query = query.where(DeletedInvoice.invoice_id == address.invoice_id)
        if address.invoice_number is not None:
            query = query.where(DeletedInvoice.invoice_number == address.invoice_number)
        return self.session.scalars(query.order_by(DeletedInvoice.deleted_at.desc())).first()

    def _wait_for(self, address: InvoiceAddress) -> None:
        """Raise InvoiceNotYetKnown (a passing fault) while the wait lasts, else the rejection."""
        wait = settings().invoice_wait_seconds
        missing = f"tenant {self.tenant_id} has no invoice {address.describe()}"
        if self.message_id is None or wait <= 0:
            raise DomainError("invoice-not-found", missing)
        with self.session.get_bind().connect() as connection:  # its own transaction, committed now
            waited_ms = connection.execute(_WAITED, {"tenant": self.tenant_id, "message": self.message_id}).scalar_one()
            connection.commit()
        waited = waited_ms / 1000
        if waited < wait:
            raise InvoiceNotYetKnown(address.describe(), wait - waited)
        raise DomainError("invoice-not-found", f"{missing} (waited {waited:.0f}s for it to arrive)")

    def refuse_deleted_number(self, number: str) -> None:
        """A deleted invoice's number is never used again (docs/reference-choices.md)."""
        gone = self.tombstone(InvoiceAddress(invoice_number=number))
        if gone is not None:
            raise DomainError("duplicate-invoice-number",
                              f"tenant {self.tenant_id} had an invoice {number}, deleted at "
                              f"{gone.deleted_at.isoformat(timespec='seconds')} by message {gone.message_id}; "
                              "a deleted invoice's number is not used again")

    def deleted_order_invoice(self, order_id: str, shipment_id: str | None) -> DeletedInvoice | None:
        """The tombstone of the invoice an order_shipped message made for (orderId, shipmentId)."""
        return self.session.scalars(select(DeletedInvoice).where(
            DeletedInvoice.tenant_id == self.tenant_id, DeletedInvoice.order_id == order_id,
            DeletedInvoice.shipment_id == (shipment_id or ""))).first()

    def add(self, invoice: Invoice) -> Invoice:
        self.session.add(invoice)
        self._touched.setdefault(invoice, None)
        return invoice

    def track(self, invoice: Invoice) -> Invoice:
        """Collect the events (and the history) of an invoice loaded for a change."""
        self._touched.setdefault(invoice, invoice.status)
        return invoice

    def next_invoice_number(self) -> str:
        """The next number of the tenant's gap-free sequence, in one statement. The counter row stays
        locked until commit, and a rolled-back transaction gives its number back. Numbers that an
        import or a publisher already took are skipped, and so are deleted invoices' numbers (never
        used again)."""
        return self.session.execute(NEXT_NUMBER, {"tenant": self.tenant_id}).scalar_one()

    # ----------------------------------------------------------------- outbox and commit

    def emit(self, type_: str, data: dict[str, Any], invoice: Invoice | None = None, *,
             invoice_id: uuid.UUID | None = None, invoice_number: str | None = None) -> None:
        """Write one event to the outbox. An invoice's events take its next sequence number; an
        event that only names an invoice (command.rejected) has no sequence: nothing of it changed."""
        sequence = None
        if invoice is not None:
            invoice.event_sequence += 1
            sequence = invoice.event_sequence
            invoice_id, invoice_number = invoice.id, invoice.invoice_number
        payload = event_envelope(
            type_=type_, tenant_id=self.tenant_id, invoice_id=invoice_id, invoice_number=invoice_number,
            sequence=sequence, causation_id=self.causation_id, data=data,
        )
        # Plain rows, written with one INSERT at commit: events need none of the ORM's bookkeeping.
        self._outbox.append({
            "event_id": uuid.UUID(payload["eventId"]), "type": type_, "tenant_id": self.tenant_id,
            "invoice_id": invoice_id, "sequence": sequence, "causation_id": self.causation_id, "payload": payload,
            "traceparent": self.traceparent,
        })

    def write_outbox(self) -> None:
        if self._outbox:
            self.session.connection().execute(OUTBOX_INSERT, self._outbox)
            self._outbox = []

    def write_history(self) -> None:
        if self._history:
            self.session.connection().execute(HISTORY_INSERT, self._history)
            self._history = []

    def flush_events(self) -> None:
        for invoice, status_before in self._touched.items():
            self.session.add_all(invoice.new_rows)
            invoice.new_rows.clear()
            events = []
            for event in invoice.pending_events:
                self.emit(event.type, event.data, invoice)
                events.append({"type": event.type, "sequence": invoice.event_sequence})
            invoice.pending_events.clear()
            if events and status_before is not None:  # one more version of an invoice that existed
                invoice.version += 1
            if events:  # a change: kept in the history for good
                self._history.append(history_row(invoice, events, status_before, message_id=self.message_id,
                                                 causation_id=self.causation_id, task=self.task))
            if invoice.is_deleted:
                self.session.delete(invoice)
                from_order = invoice.source == "order_shipped"
                self.session.connection().execute(TOMBSTONE_INSERT, {
                    "invoice_id": invoice.id, "tenant_id": invoice.tenant_id, "invoice_number": invoice.invoice_number,
                    "message_id": self.message_id, "task": self.task,
                    "order_id": invoice.order_id if from_order else None,
                    "shipment_id": invoice.shipment_id if from_order else None,
                })

    def commit_changes(self) -> None:
        """Commit the touched invoices and their events, with no inbox record (scheduler work)."""
        self.flush_events()
        self.write_outbox()
        self.write_history()
        self.session.commit()

    def commit(self, outcome: Outcome) -> Outcome:
        self.flush_events()
        self.record(outcome)
        self.write_outbox()
        self.write_history()
        self.session.commit()
        return outcome
