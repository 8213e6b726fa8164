"""The worker's consumer: messages Celery cannot even hand to a task (undecodable, not JSON,
unknown task name, not a task at all) are dead-lettered whole before Celery drops them."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.worker.consumer import Consumer

from worker.brokers.topology import QUEUES
from worker.config import settings
from worker.delivery import batching, dead_letters, task_events

log = logging.getLogger(__name__)


def _timing_problem(headers: dict[str, Any]) -> tuple[str, str] | None:
    """A publisher's `eta` far ahead would be held in memory for days (and, on Redis, handed out
    again every visibility timeout); an `expires` already past would be dropped by Celery without
    a trace. Both are dead-lettered instead. The worker's own housekeeping may expire quietly."""
    if str(headers.get("task", "")) in MAINTENANCE_TASKS:
        return None
    now = datetime.now(timezone.utc)
    eta, expires = _when(headers.get("eta")), _when(headers.get("expires"))
    horizon = timedelta(seconds=settings().broker_visibility_timeout)
    if eta is not None and eta > now + horizon:
        return "eta-too-far", f"eta {eta.isoformat()} is more than {horizon} ahead; the worker does not hold messages that long"
    if expires is not None and expires < now:
        return "expired", f"the message expired at {expires.isoformat()} before it was delivered"
    return None


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# Dead-lettering a message the consumer will not run lives in dead_letters (a revoked batched message
# is kept the same way); the consumer's names for it stay.
_kept = dead_letters.keep


MAINTENANCE_TASKS = frozenset(QUEUES["invoices.maintenance"])


class InvoiceConsumer(Consumer):
    def update_strategies(self) -> None:
        super().update_strategies()
        batching.install(self)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        task_events.leave_active()  # a batch in flight is not cancelled message by message
        super().on_connection_error_after_connected(exc)

    def cancel_active_requests(self) -> None:
        task_events.leave_active()
        super().cancel_active_requests()

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler, behind a byte cap checked before anything decodes the body
        (MAX_MESSAGE_BYTES): a larger message is dead-lettered `too-large`, whole (as bytes)."""
        handle = super().create_task_handler(*args, **kwargs)
        limit = settings().max_message_bytes

        def on_task_received(message: Any) -> Any:
            size = len(message.body or b"")
            if size > limit:  # kept as the bytes received: decoding it is what the limit prevents
                if _kept(message, message.body, "too-large", f"the body is {size} bytes; MAX_MESSAGE_BYTES allows {limit}"):
                    message.ack()
                return None
            problem = _timing_problem(message.headers or {})
            if problem is not None:
                if _kept(message, None, *problem):
                    message.ack()
                return None
            return handle(message)

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        if _kept(message, message.body, "undecodable", f"cannot decode a {message.content_type} message: {exc}"):
            super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task", "?")
        if _kept(message, body, "unknown-task", f"no task is named {str(name)[:200]!r}"):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if _kept(message, body, "not-a-task", "the message is not a Celery task message"):
            super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if _kept(message, body, "invalid-task", f"invalid task message: {exc}"):
            super().on_invalid_task(body, message, exc)
