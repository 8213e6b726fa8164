"""How one message is handled: parse, apply in one unit of work, record the outcome.

Malformed bodies are dead-lettered whole; forbidden operations commit a rejection with its
`command.rejected` event; serialization failures, deadlocks and natural-key races are retried
here; other passing faults propagate so that Celery retries the task with back-off.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, TypeVar

import psycopg
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError

from messages.fields import describe_validation
from models.errors import DomainError
from worker.delivery import dead_letters
from worker.operations import tracing
from worker.storage import db
from worker.storage.unit_of_work import Outcome, UnitOfWork

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Operation = Callable[[UnitOfWork, Any], Outcome | None]

# serialization_failure, deadlock_detected, lock_not_available
CONFLICT_SQLSTATES = {"40001", "40P01", "55P03"}
UNIQUE_VIOLATION = "23505"
LOCK_NOT_AVAILABLE = "55P03"
CONFLICT_ATTEMPTS = 8


class MalformedMessage(Exception):
    """The body does not follow the contract's schema (`malformed`) or exceeds one of its limits
    (`too-large`): dead-letter it."""

    def __init__(self, error: str, reason: str = "malformed") -> None:
        super().__init__(error)
        self.error = error
        self.reason = reason


def parse(schema: type[M], body: Any, extra_args: tuple = (), extra_kwargs: dict | None = None) -> M:
    """The body as its schema, or MalformedMessage naming every wrong field."""
    if extra_args or extra_kwargs:
        raise MalformedMessage("a task takes exactly one positional argument, the message body")
    if not isinstance(body, dict):
        raise MalformedMessage(f"the message body must be a JSON object, got {type(body).__name__}")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        too_large = any(err["type"] == "too_large" for err in exc.errors())
        raise MalformedMessage(describe_validation(exc), "too-large" if too_large else "malformed") from None
    except RecursionError:
        raise MalformedMessage("the body nests deeper than the worker reads", "too-large") from None


def _sqlstate(exc: DBAPIError | psycopg.Error) -> str | None:
    """The SQLSTATE of a failure, through SQLAlchemy or straight from psycopg (bulk COPY)."""
    return getattr(exc.orig, "sqlstate", None) if isinstance(exc, DBAPIError) else exc.sqlstate


def execute(task: str, message: Any, operation: Operation) -> Outcome:
    """Apply the message once: claim its messageId, run the operation, commit state, inbox and
    outbox together. A rule violation commits a rejection instead."""
    tenant_id, message_id = message.tenant_id, message.message_id
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            with db.sessions()() as session:
                uow = UnitOfWork(session, tenant_id=tenant_id, message_id=message_id, task=task)
                uow.traceparent = tracing.traceparent()
                duplicate = uow.claim()
                if duplicate is not None:
                    session.rollback()
                    return duplicate
                try:
                    outcome = operation(uow, message) or Outcome("applied", message_id)
                except DomainError as error:
                    session.rollback()
                    return reject(session, task, message, error)
                return uow.commit(outcome)
        except (DBAPIError, psycopg.Error) as exc:
            state = _sqlstate(exc)
            # A lock wait that ran out (LOCK_TIMEOUT_MS) is not tried again here: the row is held
            # for longer than a conflict lasts (an import, an operator), and eight more waits kept a
            # pool process for 80 s. It goes round with Celery's back-off instead.
            retryable = (state in CONFLICT_SQLSTATES and state != LOCK_NOT_AVAILABLE) or state == UNIQUE_VIOLATION
            if not retryable or attempt == CONFLICT_ATTEMPTS:
                raise
            log.info("%s %s: conflict %s, attempt %d; retrying", task, message_id, state, attempt)
            time.sleep(random.uniform(0, 0.01 * 2**attempt))
    raise AssertionError("unreachable")


def reject(session: Any, task: str, message: Any, error: DomainError) -> Outcome:
    """Commit the rejection and its command.rejected event in a fresh transaction (the change
    was rolled back). If another copy claimed the messageId meanwhile, that copy's outcome wins."""
    uow = UnitOfWork(session, tenant_id=message.tenant_id, message_id=message.message_id, task=task)
    uow.traceparent = tracing.traceparent()
    duplicate = uow.claim()
    if duplicate is not None:
        session.rollback()
        return duplicate
    return uow.commit(rejection(uow, task, message, error))


def rejection(uow: UnitOfWork, task: str, message: Any, error: DomainError) -> Outcome:
    """The rejected outcome of a message, its command.rejected event written to the unit of work."""
    address = getattr(message, "address", None)
    number = address.invoice_number if address is not None else getattr(message, "invoice_number", None)
    invoice = uow.find(address, lock=False) if address is not None else None
    outcome = Outcome("rejected", message.message_id, reason=error.code, detail=error.message,
                      invoice_id=invoice.id if invoice else None,
                      invoice_number=invoice.invoice_number if invoice else number)
    uow.emit("command.rejected", {"messageId": message.message_id, "task": task, "reason": error.code,
                                  "message": error.message},
             invoice_id=outcome.invoice_id, invoice_number=outcome.invoice_number)
    return outcome


def dead_letter(delivery: dead_letters.Delivery, reason: str, error: str) -> Outcome:
    dead_letters.store(delivery, reason=reason, error=error)
    body = delivery.body if isinstance(delivery.body, dict) else {}
    log.warning("dead-lettered %s %s: %s: %s", delivery.task_name, delivery.delivery_id, reason, error)
    return Outcome("dead-lettered", body.get("messageId") if isinstance(body.get("messageId"), str) else None,
                   reason=reason, detail=error)
