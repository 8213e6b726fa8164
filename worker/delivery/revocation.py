"""Revoked by task id (`celery -A worker control revoke ID`, `app.control.revoke`): the message is
not applied, and, so that nothing is lost silently, it is dead-lettered `revoked` (CONTRACT.md
section 4): kept whole, counted as dead-lettered, replayable under a new task id.

Celery keeps the revoked ids in each worker's main process (a revoke is broadcast to the workers
running at the time) and, on its own path, drops a revoked message with an acknowledgement.
Here that drop stores the message first (`Request`, the request class of every invoice task), and
a batched message is checked against the same ids when it is received and when its batch is handed
to a pool process (worker/delivery/batching.py). A message whose batch or task already started is
not stopped: it ends in its outcome.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.backends.base import DisabledBackend
from celery.worker import state as worker_state
from celery.worker.request import Request as CeleryRequest

from worker.delivery import dead_letters

log = logging.getLogger(__name__)

REASON = "revoked"


def is_revoked(task_id: str) -> bool:
    return task_id in worker_state.revoked


def keep(message: Any, name: str, task_id: str, why: str = "before it ran") -> bool:
    """Dead-letter a revoked message (the caller then acknowledges it). False when the store could
    not be reached: the message was handed back, and is refused again when it returns."""
    log.info("%s[%s] dead-lettered %s", name, task_id, REASON)
    return dead_letters.keep(message, None, REASON, f"revoked by task id (celery control revoke) {why}")


class Request(CeleryRequest):
    """Celery's request, whose revoked messages are dead-lettered before Celery acknowledges them,
    and whose body reaches the pool process decoded.

    Celery's main process decodes every message in full (its strategy asks whether the body has an
    `args` key, and the request reads its args from the decoded body: a body that does not decode,
    or is not three values, is refused there and dead-lettered by the consumer), then hands the pool
    process both the decoded args (in the request's dict) and the encoded body, which the pool
    process decodes again. Here the pool process gets the decoded body instead, as Celery's own
    requests from older protocols do: the args cross the pipe once, and nothing is decoded twice
    (a bulk import of 10,000 invoices is megabytes of JSON)."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        if not self._decoded:
            self._body = self._request_dict["args"], self._request_dict["kwargs"], message.payload[2]
            self._decoded = True
            self._content_type = self._content_encoding = None

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        if expired or self._already_revoked:  # expiry stays Celery's (the consumer dead-letters what arrives expired)
            return super()._announce_revoked(reason, terminated, signum, expired)
        why = f"and terminated while running (signal {signum})" if terminated else "before it ran"
        if not keep(self._message, self.name, self.id, why):
            worker_state.task_ready(self)
            self.acknowledged = True  # handed back by keep(): not to be acknowledged now
            self._already_revoked = True
            return None
        return super()._announce_revoked(reason, terminated, signum, expired)


class NoResults(DisabledBackend):
    """The app's result backend: none, as Celery's DisabledBackend, except that a task's state is
    PENDING (what any backend says of a task it holds nothing for). Celery's `revoke` asks each
    revoked id's state so as not to overwrite a finished one; DisabledBackend answered
    NotImplementedError, which Celery logged as a WARNING for every revoke."""

    def get_state(self, task_id: str) -> str:
        return states.PENDING

    get_status = get_state
