"""Plain JSON for non-Celery publishers (CONTRACT.md section 2), RabbitMQ only: a JSON object
published to the durable topic exchange `invoices.ingress` with routing key = task name is the
same message as the Celery task with that body.

A consumer bootstep of the worker takes each message from the durable quorum queue
`invoices.ingress` and turns it into that Celery task message, on that task's queue, with the
broker's publisher confirm; only then is the plain message acknowledged. From there the message
takes the one path every message takes (pool process, inbox, poison counting, retries, outcomes,
dead letters, metrics). Running tasks here instead would put them in the worker's main process,
outside the pool: a message that kills its process would kill the consumer, and the pool's
limits and counts would not apply. A worker that dies between the confirm and the
acknowledgement converts the message again; the inbox makes the second copy a duplicate.

One message costs only itself here (issue #23): a body over MAX_MESSAGE_BYTES is dead-lettered
`too-large` before anything decodes it; a routing key that names no task, a body that is not a
JSON object or not `application/json`, and any exception at all while turning the message into a
task (`[` × 200,000 raises RecursionError in the decoder) dead-letter that message alone, whole,
as received. The same step stores what RabbitMQ dead-lettered into `invoices.dead`
(worker/brokers/topology.py): beyond a queue's delivery limit (`delivery-limit`), or expired by
its TTL before a worker took it (`expired`; the worker's own maintenance tasks expire quietly).

Only a message that cannot be settled now (the dead-letter store or the broker away) goes back to
its queue: never acknowledged before it is stored. It goes back later, by the event loop's timer,
and never by sleeping in this thread, which is the worker's consumer: a pause here would stop
every message of every queue.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from celery import bootsteps
from kombu import Consumer, Exchange, Queue

from worker.brokers import topology
from worker.delivery import dead_letters
from worker.operations import tracing

log = logging.getLogger(__name__)

INGRESS_EXCHANGE = Exchange("invoices.ingress", type="topic", durable=True)
INGRESS_QUEUE_NAME = "invoices.ingress"
CONTENT_TYPE = "application/json"
PREFETCH = 20  # conversions are quick; a few in flight keep the queue moving
# A message handed back waits this long, doubling with each delivery of it, before it is returned
# to its queue (held unacknowledged meanwhile, so the broker does not send it straight back).
HAND_BACK_SECONDS = 1.0
HAND_BACK_MAX_SECONDS = 30.0
MAINTENANCE_TASKS = frozenset(topology.QUEUES["invoices.maintenance"])


class KeptAlready(Exception):
    """The dead-letter store holds this delivery already."""


class StoreAway(Exception):
    """The dead-letter store cannot be read now."""


@dataclass(frozen=True)
class Letter:
    """What to store for a message that will not become a task: the body as received, and why."""

    reason: str
    error: str
    body: Any
    task: str | None = None


def ingress_queue(max_deliveries: int) -> Queue:
    return Queue(INGRESS_QUEUE_NAME, INGRESS_EXCHANGE, routing_key="#", durable=True,
                 queue_arguments=topology.quorum_arguments(max_deliveries))


def _properties(message: Any) -> dict[str, Any]:
    return {key: value for key, value in (message.properties or {}).items() if isinstance(value, (str, int, float))}


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def hand_back_delay(message: Any) -> float:
    """HAND_BACK_SECONDS doubled with each earlier delivery of the message (RabbitMQ's count)."""
    try:
        count = int((message.headers or {}).get("x-delivery-count") or 0)
    except (TypeError, ValueError):
        count = 0
    return min(HAND_BACK_MAX_SECONDS, HAND_BACK_SECONDS * 2 ** min(count, 10))


class Ingress:
    """Converts plain JSON messages and stores the broker's dead letters. Each handler settles its
    message: acknowledged once converted or stored, or handed back later when it cannot be."""

    def __init__(self, app: Any, routes: dict[str, str], max_bytes: int,
                 later: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes
        self.later = later

    # -- plain JSON on invoices.ingress

    def on_message(self, message: Any) -> None:
        try:
            delivery_id, task, headers = self._envelope(message)
        except Exception as exc:  # noqa: BLE001 - properties no client library would send
            delivery_id, task, headers = f"ingress:{uuid.uuid4()}", "?", {"envelope": _failure(exc)}
        try:
            outcome = self.convert(message, task)
        except Exception as exc:  # noqa: BLE001 - any fault of this one message costs that message alone
            log.warning("ingress: cannot turn %s into a task (%s); dead-lettering it", delivery_id, _failure(exc))
            outcome = Letter("not-a-message", f"cannot turn the message into a task: {_failure(exc)}", message.body)
        if isinstance(outcome, Letter):
            return self._store(message, dead_letters.Delivery(delivery_id, task, outcome.body, headers),
                               outcome.reason, outcome.error)
        body, queue = outcome
        try:
            # Confirmed by the broker (confirm_publish) before the plain message is acknowledged.
            self.app.send_task(task, args=[body], queue=queue, task_id=str(uuid.uuid4()), headers={"ingress": True, **tracing.carried(message.headers)})
        except Exception:  # noqa: BLE001 - the broker away: the message goes back, not lost
            log.exception("ingress: cannot publish %s as a task now; handing it back", delivery_id)
            return self._hand_back(message)
        message.ack()

    def _envelope(self, message: Any) -> tuple[str, str, dict[str, Any]]:
        info = message.delivery_info or {}
        task = str(info.get("routing_key") or "")
        props = _properties(message)
        delivery_id = f"ingress:{props.get('message_id') or uuid.uuid4()}"
        headers = {"exchange": info.get("exchange"), "routingKey": task, "redelivered": info.get("redelivered"),
                   "contentType": message.content_type, "properties": props}
        return delivery_id, task, headers

    def convert(self, message: Any, task: str) -> tuple[dict[str, Any], str] | Letter:
        """(body, queue) of the task to publish, or the Letter that says why there is none."""
        raw = message.body
        if len(raw) > self.max_bytes:  # kept as received: decoding it is what the limit prevents
            return Letter("too-large", f"the body is {len(raw)} bytes; MAX_MESSAGE_BYTES allows {self.max_bytes}", raw)
        if message.content_type != CONTENT_TYPE:
            return Letter("not-json", f"content type {message.content_type!r}; only {CONTENT_TYPE} is accepted", raw)
        try:
            body = json.loads(raw)
        except RecursionError:
            return Letter("too-large", "the body nests deeper than the worker reads", raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return Letter("not-json", f"the body is not JSON: {exc}", raw)
        if not isinstance(body, dict):
            return Letter("not-json", "the body is not a JSON object", body)  # JSON: kept as the value it is
        if task not in self.routes or task not in self.app.tasks:
            return Letter("unknown-task",
                          f"routing key {task!r} names no task (expected a task name, e.g. invoices.record_payment)",
                          body)
        return body, self.routes[task]

    # -- what RabbitMQ dead-lettered into invoices.dead

    def on_dead(self, message: Any) -> None:
        """A message RabbitMQ dead-lettered (delivery limit, TTL): kept whole; never looped."""
        try:
            headers = dict(message.headers or {})
            delivery_id, task, letter = self._death(message, headers)
        except KeptAlready:
            return message.ack()
        except StoreAway as exc:
            log.error("cannot read the dead-letter store now (%s); handing a dead-lettered message back", exc)
            return self._hand_back(message)
        except Exception as exc:  # noqa: BLE001 - any fault of this one message costs that message alone
            log.warning("a dead-lettered message cannot be read (%s); storing it as received", _failure(exc))
            delivery_id, task, headers = f"dead:{uuid.uuid4()}", "?", {"error": _failure(exc)}
            letter = Letter("not-a-message", f"RabbitMQ dead-lettered a message that cannot be read: {_failure(exc)}",
                            message.body)
        if letter is None:
            return message.ack()
        self._store(message, dead_letters.Delivery(delivery_id, task, letter.body,
                                                   {**headers, "contentType": message.content_type}),
                    letter.reason, letter.error)

    def _death(self, message: Any, headers: dict[str, Any]) -> tuple[str, str, Letter | None]:
        body = message.body
        if len(body) <= self.max_bytes:  # a larger one is kept as the bytes received, never decoded
            try:
                body = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                pass
        if isinstance(body, list) and body and isinstance(body[0], list) and len(body[0]) == 1:
            body = body[0][0]  # a Celery task message (protocol 2): args, kwargs, embed
        task = str(headers.get("task") or (message.delivery_info or {}).get("routing_key") or "?")
        death = (headers.get("x-death") or [{}])[0]
        queue, why = death.get("queue"), death.get("reason")
        plain_id = _properties(message).get("message_id") or uuid.uuid4()
        default_id = f"ingress:{plain_id}" if queue == INGRESS_QUEUE_NAME else f"dead:{plain_id}"
        delivery_id = str(headers.get("id") or default_id)
        if why == "rejected" and self._kept(delivery_id):
            # Celery rejects what it cannot hand to a task (unknown task, undecodable, invalid), and the
            # queue dead-letters it here; worker/delivery/consumer.py kept it already, with its reason.
            raise KeptAlready(delivery_id)
        if why == "expired":
            if task in MAINTENANCE_TASKS:
                # Beat's scans carry `expires` as the message's TTL on RabbitMQ; the next scan supersedes it.
                log.info("dropped %s %s: it expired before a worker took it", task, delivery_id)
                return delivery_id, task, None
            return delivery_id, task, Letter("expired", f"the message expired in {queue!r} (its TTL) before a "
                                             "worker took it", body)
        reason = "delivery-limit" if why == "delivery_limit" else "broker-dead-lettered"
        error = (f"RabbitMQ dead-lettered the message from {queue!r} ({why})"
                 + (": returned more often than its delivery limit" if reason == "delivery-limit" else ""))
        return delivery_id, task, Letter(reason, error, body)

    @staticmethod
    def _kept(delivery_id: str) -> bool:
        try:
            return dead_letters.get_by_delivery(delivery_id) is not None
        except Exception as exc:  # noqa: BLE001 - the store away: not the message's fault
            raise StoreAway(exc) from exc

    # -- settling

    def _store(self, message: Any, delivery: dead_letters.Delivery, reason: str, error: str) -> None:
        try:
            dead_letters.store(delivery, reason=reason, error=error)
        except Exception as exc:  # noqa: BLE001 - the store away: never acknowledged before it is stored
            log.error("ingress: cannot dead-letter %s (%s) now (%s); handing it back",
                      delivery.delivery_id, reason, _failure(exc))
            return self._hand_back(message)
        message.ack()

    def _hand_back(self, message: Any) -> None:
        """Return the message to its queue after hand_back_delay, by the event loop's timer (the
        broker's delivery limit bounds the rounds); at once when there is no event loop."""

        def requeue() -> None:
            try:
                message.requeue()
            except Exception as exc:  # noqa: BLE001 - the channel is gone: the broker returns it itself
                log.info("could not hand the message back (%s); the broker does when the channel closes", _failure(exc))

        if self.later is None:
            return requeue()
        self.later(hand_back_delay(message), requeue)


class IngressStep(bootsteps.ConsumerStep):
    """The worker's consumer of `invoices.ingress` and `invoices.dead`, on RabbitMQ only."""

    def include_if(self, c: Any) -> bool:
        return topology.is_amqp(c.app.conf.broker_url)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        from worker.brokers.topology import ROUTES
        from worker.config import settings

        config = settings()
        hub = getattr(self.consumer, "hub", None)
        later = (lambda seconds, action: hub.call_later(seconds, action)) if hub is not None else None
        ingress = Ingress(self.app, ROUTES, config.max_message_bytes, later)
        channel.basic_qos(0, PREFETCH, False)
        return [Consumer(channel, queues=[ingress_queue(config.max_deliveries)], on_message=ingress.on_message),
                Consumer(channel, queues=[topology.dead_queue(config.max_deliveries)], on_message=ingress.on_dead)]

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.app = c.app
        self.consumer = c
