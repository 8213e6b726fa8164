"""The base of every invoice task: late acknowledgement, retries of passing faults with
exponential back-off and jitter, and the dead-letter store for what cannot be applied."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, NoReturn, TypeVar

import kombu.exceptions
import psycopg
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TaskPredicate
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError

from models.errors import InvoiceNotYetKnown, PaymentNotYetKnown
from worker.config import settings
from worker.delivery import dead_letters, deliveries
from worker.delivery.handling import MalformedMessage, Operation, dead_letter, execute, parse

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
    Request = "worker.delivery.revocation:Request"  # a revoked message is dead-lettered, not dropped
    max_retries = settings().task_max_retries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the message and end it in an outcome, whatever happens: a poison message (one that
        already started MAX_DELIVERIES times without an outcome) and anything that breaks
        unexpectedly, or still fails when its retries ran out, is dead-lettered here, in the task,
        so that a store that cannot be reached hands the message back instead of losing it.
        (Called by Celery's tracer with the request already pushed, so this calls run directly.)"""
        body = args[0] if len(args) == 1 and not kwargs else {"args": list(args), "kwargs": kwargs}
        try:
            if self._poisoned(body):
                return self.keep(body, "worker-lost",
                                 f"the message started {settings().max_deliveries} times without reaching an outcome "
                                 f"(its worker process died, or it was handed back: a retry that could not be sent) "
                                 f"(MAX_DELIVERIES={settings().max_deliveries}); it is not run again")
            return self.run(*args, **kwargs)
        except TaskPredicate:  # Celery's own control flow: a retry, a reject
            raise
        except Exception as exc:
            reason = "payment-unknown" if isinstance(exc, PaymentNotYetKnown) else (
                "retries-exhausted" if isinstance(exc, TRANSIENT) else
                "time-limit" if isinstance(exc, SoftTimeLimitExceeded) else "task-error")
            if reason == "task-error":
                log.exception("%s %s broke; dead-lettering it", self.name, self.request.id)
            return self.keep(body, reason, f"{type(exc).__name__}: {exc}")

    def _poisoned(self, body: Any) -> bool:
        """Only redeliveries are counted: a first delivery costs no round trip."""
        request = self.request
        if not (request.delivery_info or {}).get("redelivered") or not request.id:
            return False
        key = deliveries.delivery_key(str(request.id), body)
        starts = self.retrying(lambda: deliveries.count_start(key, self.name))
        return starts > settings().max_deliveries and not self.retrying(lambda: deliveries.has_outcome(body))

    def keep(self, body: Any, reason: str, error: str) -> dict[str, Any]:
        """Dead-letter the message. When even that fails (the database is away), the message goes
        back to its queue after a pause: it is never acknowledged unstored, nor sent again as a copy."""
        try:
            return dead_letter(self.delivery(body), reason, error).to_dict()
        except Exception as exc:
            log.error("cannot dead-letter %s %s (%s: %s); handing it back", self.name, self.request.id, reason, exc)
            time.sleep(min(backoff(self.request.retries), 5))
            raise Reject(f"dead letter store unreachable: {exc}", requeue=True) from None

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
            malformed = exc  # `exc` is unbound when the except block ends; the lambda keeps its own name
            return self.retrying(lambda: dead_letter(self.delivery(body), malformed.reason, malformed.error).to_dict())
        return self.retrying(lambda: execute(self.name, message, operation).to_dict())

    def retrying(self, work: Callable[[], T]) -> T:
        """Run work; on a passing fault, send the message round again after an exponential back-off
        with jitter (never zero, so that a late message has time to arrive). When the retries run
        out, the fault is raised and `__call__` dead-letters the message."""
        try:
            return work()
        except InvoiceNotYetKnown as exc:
            # Out of order across queues: bounded by time (INVOICE_WAIT_SECONDS), not by TASK_MAX_RETRIES.
            countdown = max(1.0, min(backoff(self.request.retries), exc.wait_left + 0.5))
            self.again(exc, countdown, max_retries=self.request.retries + 1)
        except TRANSIENT as exc:
            self.again(exc, backoff(self.request.retries))

    def again(self, exc: Exception, countdown: float, **options: Any) -> NoReturn:
        """Celery's retry; when the retry cannot be sent, the message goes back to its queue. Celery
        rejects it without requeue then (Task.retry: `raise Reject(exc, requeue=False)`), and
        RabbitMQ drops a message rejected so: lost, seen in the cluster scenarios when a retry's
        countdown went to a delay exchange that was not there. Handed back instead, its next
        delivery tries again, and the poison count dead-letters it when its deliveries run out."""
        try:
            raise self.retry(exc=exc, countdown=countdown, **options) from None
        except Reject as refused:
            log.warning("%s %s: its retry could not be sent (%s); handing it back", self.name, self.request.id,
                        refused.reason)
            raise Reject(refused.reason, requeue=True) from None

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        """Only what escaped `__call__` arrives here (it dead-letters everything else)."""
        log.error("%s %s failed outside its outcome handling: %s: %s", self.name, task_id, type(exc).__name__, exc)


def backoff(retries: int) -> float:
    """Equal jitter: half of min(cap, 2^retries) seconds fixed, the other half random; at least one
    second, because RabbitMQ's native delayed delivery counts whole seconds and refuses less than
    one (Celery would raise ValueError on a countdown of 0.7)."""
    ceiling = min(settings().task_retry_backoff_max, 2 ** retries)
    return max(1.0, ceiling / 2 + random.uniform(0, ceiling / 2))
