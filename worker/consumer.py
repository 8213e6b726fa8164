"""The worker's consumer: messages Celery cannot even hand to a task (undecodable, not JSON,
unknown task name, not a task at all) are dead-lettered whole before Celery drops them."""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer

from worker import dead_letters
from worker.operations import metrics

log = logging.getLogger(__name__)


def _delivery(message: Any, body: Any) -> dead_letters.Delivery:
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
    return dead_letters.Delivery(delivery_id, str(headers.get("task") or "?"), body,
                                 {**headers, "contentType": message.content_type})


def _store(message: Any, body: Any, reason: str, error: str) -> None:
    metrics.count_message("unknown", "dead_lettered")  # not a task of ours: no name to label it with
    try:
        dead_letters.store(_delivery(message, body), reason=reason, error=error)
    except Exception:  # the database is away: Celery still logs the whole message
        log.exception("could not dead-letter a %s message", reason)


class InvoiceConsumer(Consumer):
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _store(message, message.body, "undecodable", f"cannot decode a {message.content_type} message: {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task", "?")
        _store(message, body, "unknown-task", f"no task is named {name!r}")
        super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _store(message, body, "not-a-task", "the message is not a Celery task message")
        super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        _store(message, body, "invalid-task", f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)
