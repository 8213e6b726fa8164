"""The worker's own tables beside the invoices: inbox, outbox, dead letters, invoice numbering."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, Integer, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow
from models.invoice import JSONDoc
from models.payment import MONEY

# Tasks whose inbox rows are kept for good: a copy arriving after its row was pruned would apply
# again, as no natural key catches it (docs/reference-choices.md). update,
# apply_discount and remove_discount would put back what a later message changed; create without
# an invoiceNumber would make a second invoice; a bulk_import batch would undo a later batch's
# changes to the same invoices (its fingerprints catch only a plain repeat). Every other task's copy
# is caught by its natural key, so its rows go after INBOX_RETENTION_DAYS.
INBOX_KEPT_TASKS = ("invoices.create", "invoices.update", "invoices.apply_discount", "invoices.remove_discount",
                    "invoices.bulk_import")
INBOX_PRUNABLE = text("task NOT IN ({})".format(", ".join(f"'{t}'" for t in INBOX_KEPT_TASKS)))


class InboxMessage(Base):
    """One row per applied, rejected or duplicate message: the idempotency record, written in the
    same transaction as the change it caused."""

    __tablename__ = "inbox"
    __table_args__ = (Index("ix_inbox_prunable", "processed_at", postgresql_where=INBOX_PRUNABLE),
                      # The last hour's outcomes (status, the console's chart) without reading the whole
                      # table. BRIN: a few pages, next to nothing per insert on the hot path (rows arrive in
                      # processed_at order; the newest, unsummarised ranges are always read).
                      Index("ix_inbox_processed_at_brin", "processed_at", postgresql_using="brin"))

    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    task: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(String(100))
    detail: Mapped[str | None] = mapped_column(Text)
    invoice_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    invoice_number: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDoc)
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=text("now()"))


class OutboxEvent(Base):
    """An event waiting for (or done with) publication on the exchange invoices.events."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
        Index("ix_outbox_published_at", "published_at", postgresql_where=text("published_at IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    type: Mapped[str] = mapped_column(String(50))
    tenant_id: Mapped[str] = mapped_column(String(200))
    invoice_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    sequence: Mapped[int | None] = mapped_column(Integer)
    causation_id: Mapped[str | None] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    # The W3C traceparent of the message span that wrote the event (tracing on), sent as its header.
    traceparent: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set aside by the relay: the broker refused this event (or it is too large to send); it waits
    # for an operator (`events status`) while the events after it flow.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    park_reason: Mapped[str | None] = mapped_column(Text)


class DeadLetter(Base):
    """A message the worker could not apply, stored whole so that an operator can replay it."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_closed_last_seen", "last_seen", postgresql_where=text("status <> 'open'")),
                      # The console's list, newest first within a status (keyset pagination on id), and
                      # its filters by reason and by tenant (worker/console: 100,000 rows stay fast).
                      Index("ix_dead_letters_status_id", "status", "id"),
                      Index("ix_dead_letters_status_reason_id", "status", "reason", "id"),
                      Index("ix_dead_letters_status_tenant_id", "status", "tenant_id", "id"),
                      Index("ix_dead_letters_first_seen", "first_seen"))

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # The worker's own key (dead_letters.fingerprint): the same delivery of the same message is one row.
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    # The broker-level id of the delivery (Celery task id), as the publisher chose it.
    delivery_id: Mapped[str] = mapped_column(String(200), index=True)
    task_name: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    tenant_id: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[Any] = mapped_column(JSONDoc)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    reason: Mapped[str] = mapped_column(String(50))
    error: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(20), default="open", index=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InvoiceNumberSequence(Base):
    """The last generated invoice number of a tenant; incremented under a row lock, so gap-free."""

    __tablename__ = "invoice_number_sequences"

    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    last_value: Mapped[int] = mapped_column(Integer, default=0)


class DeletedInvoice(Base):
    """The tombstone of a deleted invoice: a later message naming it is rejected at once (it does not
    wait for the invoice to arrive), and `invoices get` says when and by which message it went."""

    __tablename__ = "deleted_invoices"
    __table_args__ = (Index("ix_deleted_invoices_number", "tenant_id", "invoice_number"),
                      Index("ix_deleted_invoices_order", "tenant_id", "order_id", "shipment_id"))

    invoice_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200))
    invoice_number: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(100))
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    # An order's invoice: a later order_shipped for the same (orderId, shipmentId) is caught here.
    order_id: Mapped[str | None] = mapped_column(String(200))
    shipment_id: Mapped[str | None] = mapped_column(String(200))


class InvoiceWait(Base):
    """When a message naming a not-yet-existing invoice was first seen (CONTRACT.md section 4)."""

    __tablename__ = "invoice_waits"
    __table_args__ = (Index("ix_invoice_waits_first_seen", "first_seen"),)

    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class DeliveryCount(Base):
    """How many times a redelivered message has started without reaching an outcome (poison
    messages, CONTRACT.md section 4). A first delivery writes nothing: only redeliveries count."""

    __tablename__ = "delivery_counts"
    __table_args__ = (Index("ix_delivery_counts_last_seen", "last_seen"),)

    delivery_id: Mapped[str] = mapped_column(Text, primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    starts: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class InvoiceHistory(Base):
    """One row per applied change of an invoice, written in the change's own transaction and kept
    for good (the outbox keeps events for a week; this keeps what happened, deleted invoices too)."""

    __tablename__ = "invoice_history"
    __table_args__ = (Index("ix_invoice_history_invoice", "invoice_id", "id"),
                      Index("ix_invoice_history_number", "tenant_id", "invoice_number"))

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200))
    invoice_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    invoice_number: Mapped[str] = mapped_column(String(200))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    # The message that caused the change; None for the scheduler's own changes (see causation_id).
    message_id: Mapped[str | None] = mapped_column(String(200))
    causation_id: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(100))
    # [{"type": ..., "sequence": ...}] of the events the change produced, in order.
    events: Mapped[list[dict[str, Any]]] = mapped_column(JSONDoc)
    status_before: Mapped[str | None] = mapped_column(String(16))  # None: the change created it
    status_after: Mapped[str | None] = mapped_column(String(16))  # None: the change deleted it
    currency: Mapped[str] = mapped_column(String(3))
    invoice_total: Mapped[Decimal] = mapped_column(MONEY)
    amount_paid: Mapped[Decimal] = mapped_column(MONEY)
    balance: Mapped[Decimal] = mapped_column(MONEY)


class Heartbeat(Base):
    """A process of the worker (worker, relay, beat) saying it is alive: it refreshes `seen_at`
    every few seconds (worker/operations/heartbeats.py); `status` and the console read it."""

    __tablename__ = "heartbeats"

    component: Mapped[str] = mapped_column(String(20), primary_key=True)
    instance: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class ConsoleAudit(Base):
    """Every action taken in the operator's console: who (the token's name), what, which rows, when."""

    __tablename__ = "console_audit"
    __table_args__ = (Index("ix_console_audit_at", "at"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    who: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(50))
    # What the action selected: dead-letter or outbox ids, and the filter of a bulk action.
    target: Mapped[dict[str, Any]] = mapped_column(JSONDoc)
    detail: Mapped[str | None] = mapped_column(Text)
