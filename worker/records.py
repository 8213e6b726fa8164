"""The worker's own tables beside the invoices: inbox, outbox, dead letters, invoice numbering."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Identity, Index, Integer, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow
from models.invoice import JSONDoc


class InboxMessage(Base):
    """One row per applied, rejected or duplicate message: the idempotency record, written in the
    same transaction as the change it caused."""

    __tablename__ = "inbox"

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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("clock_timestamp()"))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set aside by the relay: the broker refused this event (or it is too large to send); it waits
    # for an operator (`events status`) while the events after it flow.
    parked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    park_reason: Mapped[str | None] = mapped_column(Text)


class DeadLetter(Base):
    """A message the worker could not apply, stored whole so that an operator can replay it."""

    __tablename__ = "dead_letters"

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
    __table_args__ = (Index("ix_deleted_invoices_number", "tenant_id", "invoice_number"),)

    invoice_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(200))
    invoice_number: Mapped[str] = mapped_column(String(200))
    message_id: Mapped[str | None] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(100))
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class InvoiceWait(Base):
    """When a message naming a not-yet-existing invoice was first seen (CONTRACT.md section 4)."""

    __tablename__ = "invoice_waits"

    tenant_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))


class DeliveryCount(Base):
    """How many times a redelivered message has started without reaching an outcome (poison
    messages, CONTRACT.md section 4). A first delivery writes nothing: only redeliveries count."""

    __tablename__ = "delivery_counts"

    delivery_id: Mapped[str] = mapped_column(Text, primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    starts: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=text("now()"))
