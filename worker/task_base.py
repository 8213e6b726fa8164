"""The base of every invoice task: late acknowledgement, retries of passing faults with
exponential back-off and jitter, and the dead-letter store for what cannot be applied."""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, TypeVar

import kombu.exceptions
import psycopg
from celery import Task
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError

from models.errors import InvoiceNotYetKnown, PaymentNotYetKnown
from worker import dead_letters, deliveries
from worker.config import settings
from worker.handling import MalformedMessage, Operation, dead_letter, execute, parse

log = logging.getLogger(__name__)
T = TypeVar("T")

# Passing faults: the database or broker is away, a conflict outlasted its quick retries, or a
# message names a payment that has not arrived yet. Celery retries these with back-off.
TRANSIENT = (OperationalError, InterfaceError, psycopg.OperationalError, PaymentNotYetKnown,
             kombu.exceptions.OperationalError, ConnectionError, TimeoutError)


class InvoiceTask(Task):
    abstract = True
    typing = False  # the body is validated by its schema, so that a wrong call is dead-lettered, not lost
    acks_late = True
    reject_on_worker_lost = True
    max_retries = settings().task_max_retries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the message, unless it is a poison message: one that has already started
        MAX_DELIVERIES times without reaching an outcome. Only redeliveries are counted.
        (Called by Celery's tracer with the request already pushed, so this calls run directly.)"""
        request = self.request
        if (request.delivery_info or {}).get("redelivered") and request.id:
            starts = self.retrying(lambda: deliveries.count_start(str(request.id), self.name))
            limit = settings().max_deliveries
            body = args[0] if args else None
            if starts > limit and not self.retrying(lambda: deliveries.has_outcome(body)):
                error = (f"the message started {starts - 1} times and its worker process died each time "
                         f"(MAX_DELIVERIES={limit}); it is not run again")
                return self.retrying(lambda: dead_letter(self.delivery(body), "worker-lost", error).to_dict())
        return self.run(*args, **kwargs)

    def delivery(self, body: Any) -> dead_letters.Delivery:
        request = self.request
        headers = {
            "id": request.id, "task": self.name, "retries": request.retries, "rootId": request.root_id,
            "parentId": request.parent_id, "origin": getattr(request, "origin", None),
            "deliveryInfo": dict(request.delivery_info or {}),
        }
        return dead_letters.Delivery(str(request.id), self.name, body, headers)

    def handle(self, schema: type[BaseModel], body: Any, operation: Operation,
               args: tuple = (), kwargs: dict | None = None) -> dict[str, Any]:
        """Parse the body, apply it once, return its outcome; a malformed body is dead-lettered."""
        try:
            message = parse(schema, body, args, kwargs)
        except MalformedMessage as exc:
            return self.retrying(lambda: dead_letter(self.delivery(body), "malformed", exc.error).to_dict())
        return self.retrying(lambda: execute(self.name, message, operation).to_dict())

    def retrying(self, work: Callable[[], T]) -> T:
        """Run work; on a passing fault, send the message round again after an exponential back-off
        with jitter (never zero, so that a late message has time to arrive). When the retries run
        out, the fault is raised and on_failure dead-letters the message."""
        try:
            return work()
        except InvoiceNotYetKnown as exc:
            # Out of order across queues: bounded by time (INVOICE_WAIT_SECONDS), not by TASK_MAX_RETRIES.
            countdown = max(1.0, min(backoff(self.request.retries), exc.wait_left + 0.5))
            raise self.retry(exc=exc, countdown=countdown, max_retries=self.request.retries + 1) from None
        except TRANSIENT as exc:
            raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from None

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        """Retries ran out, or something unexpected broke: keep the message whole for an operator."""
        body = args[0] if len(args) == 1 and not kwargs else {"args": list(args), "kwargs": kwargs}
        reason = "payment-unknown" if isinstance(exc, PaymentNotYetKnown) else (
            "retries-exhausted" if isinstance(exc, TRANSIENT) else "task-error")
        error = f"{type(exc).__name__}: {exc}"
        try:
            dead_letter(self.delivery(body), reason, error)
        except Exception:
            # The store is away too. Send the message round again later rather than lose it.
            log.exception("cannot dead-letter %s %s; sending it again", self.name, task_id)
            self.apply_async(args=args, kwargs=kwargs, countdown=settings().task_retry_backoff_max)


def backoff(retries: int) -> float:
    """Equal jitter: half of min(cap, 2^retries) seconds fixed, the other half random; at least one
    second, because RabbitMQ's native delayed delivery counts whole seconds and refuses less than
    one (Celery would raise ValueError on a countdown of 0.7)."""
    ceiling = min(settings().task_retry_backoff_max, 2 ** retries)
    return max(1.0, ceiling / 2 + random.uniform(0, ceiling / 2))
