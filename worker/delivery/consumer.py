"""The worker's consumer: messages Celery cannot even hand to a task (undecodable, not JSON,
unknown task name, not a task at all) are dead-lettered whole before Celery drops them."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.worker.consumer import Consumer
from kombu.utils.functional import retry_over_time

from worker.brokers.redis_transport import NOT_A_MESSAGE, header_time
from worker.brokers.topology import QUEUES, is_amqp
from worker.config import settings
from worker.delivery import batching, dead_letters, task_events

log = logging.getLogger(__name__)


def eta_horizon(amqp: bool) -> timedelta:
    """How far ahead an `eta` may be. Redis: the visibility timeout (such a message waits in Redis,
    parked; beyond it a worker would hold it past the time Redis hands unacknowledged messages out
    again). RabbitMQ: also below its consumer_timeout, less a minute: a message held for its eta
    longer makes RabbitMQ close the channel and redeliver every message in flight on it."""
    config = settings()
    seconds = config.broker_visibility_timeout
    if amqp:
        seconds = min(seconds, config.broker_consumer_timeout - 60)
    return timedelta(seconds=seconds)


def _timing_problem(headers: dict[str, Any], horizon: timedelta) -> tuple[str, str] | None:
    """A publisher's `eta` beyond the horizon is not held (eta_horizon); an `expires` already
    past would be dropped by Celery without a trace. Both are dead-lettered instead. The worker's
    own housekeeping may expire quietly."""
    if str(headers.get("task", "")) in MAINTENANCE_TASKS:
        return None
    now = datetime.now(timezone.utc)
    eta, expires = header_time(headers.get("eta")), header_time(headers.get("expires"))
    if eta is not None and eta > now + horizon:
        return "eta-too-far", f"eta {eta.isoformat()} is more than {horizon} ahead; the worker does not hold messages that long"
    if expires is not None and expires < now:
        return "expired", f"the message expired at {expires.isoformat()} before it was delivered"
    return None


# Celery reads these headers of a task message; a value of another type made it raise where it
# catches nothing (a task name that is a list: unhashable), which stopped the consumer.
_HEADER_TYPES: dict[str, tuple[type, ...]] = {
    "task": (str,), "id": (str,), "eta": (str, type(None)), "expires": (str, type(None)), "retries": (int, type(None)),
    "root_id": (str, type(None)), "parent_id": (str, type(None)), "group": (str, type(None)),
    "timelimit": (list, tuple, type(None)), "argsrepr": (str, type(None)), "kwargsrepr": (str, type(None)),
    "origin": (str, type(None)), "shadow": (str, type(None)), "lang": (str, type(None)),
}


def _header_problem(headers: dict[str, Any]) -> tuple[str, str] | None:
    """A task message whose headers Celery cannot read (wrong types): not a message, kept whole."""
    for name, types in _HEADER_TYPES.items():
        value = headers.get(name)
        if name in headers and (not isinstance(value, types) or isinstance(value, bool)):
            return "not-a-message", f"header {name!r} is a {type(value).__name__}; a task message's is {types[0].__name__}"
    if "task" in headers and "id" not in headers:
        return "not-a-message", "a task message (protocol 2) carries its task id in the header 'id'"
    limits = headers.get("timelimit")
    if limits is not None and (len(limits) != 2 or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in limits)):
        return "not-a-message", "header 'timelimit' is not two numbers"
    return None


# Dead-lettering a message the consumer will not run lives in dead_letters (a revoked batched message
# is kept the same way); the consumer's names for it stay. When the store is away, the message
# waits on the consumer's timer before it goes back: the consumer never sleeps.
_kept = dead_letters.keep


MAINTENANCE_TASKS = frozenset(QUEUES["invoices.maintenance"])
# What a message's content (not the broker, the pool or the database) makes Celery's handling raise.
MESSAGE_FAULTS = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, OverflowError)


try:  # Celery 5.5 on: native delayed delivery (quorum queues); 5.4 has no such step to replace
    from celery.worker.consumer.delayed_delivery import (MAX_RETRIES, RETRIED_EXCEPTIONS, RETRY_INTERVAL,
                                                         DelayedDelivery)
except ImportError:
    ClusterDelayedDelivery = None
else:
    class ClusterDelayedDelivery(DelayedDelivery):
        """Celery's native delayed delivery (quorum queues), set up through the node the consumer is
        connected to. Celery's own step declares the delay exchanges and queues on every URL of a
        `;`-separated BROKER_URL, as if each were a broker of its own, retrying each for about 15 s:
        with one node of a cluster down, every reconnect of the consumer waited those 15 s before it
        consumed again (seen in the cluster scenario that kills a node). The nodes of one cluster share
        their exchanges and queues: declaring them once, on the connected node, is enough."""

        def start(self, c: Any) -> None:
            urls = str(c.app.conf.broker_url or "").split(";")
            if len(urls) < 2 or c.connection is None:
                return super().start(c)
            self._validate_configuration(c.app)
            url = c.connection.as_uri(include_password=True)
            try:
                retry_over_time(self._setup_delayed_delivery, args=(c, url), catch=RETRIED_EXCEPTIONS,
                                errback=self._on_retry, interval_start=RETRY_INTERVAL, max_retries=MAX_RETRIES)
            except Exception as exc:  # noqa: BLE001 - as Celery's step: logged, the consumer goes on
                log.warning("could not set up delayed delivery on %s: %s", c.connection.as_uri(), exc)


class InvoiceConsumer(Consumer):
    class Blueprint(Consumer.Blueprint):
        default_steps = [f"{__name__}:ClusterDelayedDelivery" if step.endswith(":DelayedDelivery") else step
                         for step in Consumer.Blueprint.default_steps]

    def update_strategies(self) -> None:
        super().update_strategies()
        batching.install(self)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        task_events.leave_active()  # a batch in flight is not cancelled message by message
        super().on_connection_error_after_connected(exc)

    def cancel_active_requests(self) -> None:
        task_events.leave_active()
        super().cancel_active_requests()

    def _later(self, delay: float, call: Any) -> None:
        self.timer.call_after(delay, call)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's handler, behind a byte cap checked before anything decodes the body
        (MAX_MESSAGE_BYTES): a larger message is dead-lettered `too-large`, whole (as bytes)."""
        handle = super().create_task_handler(*args, **kwargs)
        limit = settings().max_message_bytes
        horizon = eta_horizon(is_amqp(self.app.conf.broker_url))
        later = self._later

        def on_task_received(message: Any) -> Any:
            size = len(message.body or b"")
            if size == 0:  # Celery unpacks nothing from it, fails in the pool and acknowledges it: gone
                if _kept(message, message.body, "not-a-message", "the message has no body", later):
                    message.ack()
                return None
            if size > limit:  # kept as the bytes received: decoding it is what the limit prevents
                if _kept(message, message.body, "too-large", f"the body is {size} bytes; MAX_MESSAGE_BYTES allows {limit}",
                         later):
                    message.ack()
                return None
            problem = _header_problem(message.headers or {}) or _timing_problem(message.headers or {}, horizon)
            if problem is not None:
                if _kept(message, None if problem[0] != "not-a-message" else message.body, *problem, later):
                    message.ack()
                return None
            try:
                return handle(message)
            except MESSAGE_FAULTS as exc:  # what a message's content makes Celery raise: that message alone
                if message.acknowledged:
                    raise
                log.exception("Celery could not take a message; dead-lettering it")
                if _kept(message, message.body, "invalid-task", f"the worker could not take the message: "
                                                               f"{type(exc).__name__}: {exc}", later):
                    message.ack()
                return None

        return on_task_received

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        # Not a decodable message (CONTRACT.md section 2): kept byte for byte, `not-a-message`.
        if message.content_type == NOT_A_MESSAGE:  # the Redis transport's wrapping of what is no message
            error = "what arrived on the queue is not a message the worker can read (its envelope is broken)"
        else:
            error = f"cannot decode a {message.content_type} message: {exc}"
        if _kept(message, message.body, "not-a-message", error, self._later):
            super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = (message.headers or {}).get("task", "?")
        if _kept(message, body, "unknown-task", f"no task is named {str(name)[:200]!r}", self._later):
            super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        if _kept(message, body, "not-a-task", "the message is not a Celery task message", self._later):
            super().on_unknown_message(body, message)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if _kept(message, body, "invalid-task", f"invalid task message: {exc}", self._later):
            super().on_invalid_task(body, message, exc)
