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

A message whose routing key names no task, that is not a JSON object, or that is not
`application/json` is dead-lettered whole here, as received. The same step stores what RabbitMQ
dead-lettered beyond a queue's delivery limit (`invoices.dead`, worker/brokers/topology.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from celery import bootsteps
from kombu import Consumer, Exchange, Queue

from worker.brokers import topology
from worker.delivery import dead_letters

log = logging.getLogger(__name__)

INGRESS_EXCHANGE = Exchange("invoices.ingress", type="topic", durable=True)
INGRESS_QUEUE_NAME = "invoices.ingress"
CONTENT_TYPE = "application/json"
PREFETCH = 20  # conversions are quick; a few in flight keep the queue moving


def ingress_queue(max_deliveries: int) -> Queue:
    return Queue(INGRESS_QUEUE_NAME, INGRESS_EXCHANGE, routing_key="#", durable=True,
                 queue_arguments=topology.quorum_arguments(max_deliveries))


def _properties(message: Any) -> dict[str, Any]:
    return {key: value for key, value in (message.properties or {}).items() if isinstance(value, (str, int, float))}


def _store(delivery_id: str, task: str, body: Any, headers: dict[str, Any], reason: str, error: str) -> None:
    dead_letters.store(dead_letters.Delivery(delivery_id, task, body, headers), reason=reason, error=error)


def settled(handler: Any) -> Any:
    """A message that cannot be settled now (PostgreSQL or the broker away) goes back to its queue,
    after a pause so that it does not spin; the broker's delivery limit bounds the rounds."""

    def on_message(message: Any) -> None:
        try:
            handler(message)
        except Exception:  # noqa: BLE001 - anything: the message must go back, not be lost
            log.exception("ingress: cannot settle a message now; handing it back")
            time.sleep(1.0)
            message.requeue()

    return on_message


class Ingress:
    """Converts plain JSON messages; each method returns once the message is settled, or raises."""

    def __init__(self, app: Any, routes: dict[str, str]) -> None:
        self.app = app
        self.routes = routes

    def on_message(self, message: Any) -> None:
        info = message.delivery_info or {}
        task = str(info.get("routing_key") or "")
        props = _properties(message)
        delivery_id = f"ingress:{props.get('message_id') or uuid.uuid4()}"
        headers = {"exchange": info.get("exchange"), "routingKey": task, "redelivered": info.get("redelivered"),
                   "contentType": message.content_type, "properties": props}
        raw = message.body
        if message.content_type != CONTENT_TYPE:
            _store(delivery_id, task, raw, headers, "not-json",
                   f"content type {message.content_type!r}; only {CONTENT_TYPE} is accepted")
            return message.ack()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            _store(delivery_id, task, raw, headers, "not-json", f"the body is not JSON: {exc}")
            return message.ack()
        if not isinstance(body, dict):
            _store(delivery_id, task, body, headers, "not-json", "the body is not a JSON object")
            return message.ack()
        if task not in self.routes or task not in self.app.tasks:
            _store(delivery_id, task, body, headers, "unknown-task",
                   f"routing key {task!r} names no task (expected a task name, e.g. invoices.record_payment)")
            return message.ack()
        queue = self.routes[task]
        # Confirmed by the broker (confirm_publish) before the plain message is acknowledged.
        self.app.send_task(task, args=[body], queue=queue, task_id=str(uuid.uuid4()),
                           headers={"ingress": True})
        message.ack()

    def on_dead(self, message: Any) -> None:
        """A message RabbitMQ dead-lettered beyond its queue's delivery limit: kept whole."""
        headers = dict(message.headers or {})
        try:
            decoded = json.loads(message.body)
        except (ValueError, UnicodeDecodeError):
            decoded = message.body
        body = decoded
        if isinstance(decoded, list) and decoded and isinstance(decoded[0], list) and len(decoded[0]) == 1:
            body = decoded[0][0]  # a Celery task message (protocol 2): args, kwargs, embed
        task = str(headers.get("task") or (message.delivery_info or {}).get("routing_key") or "?")
        death = (headers.get("x-death") or [{}])[0]
        delivery_id = str(headers.get("id") or f"dead:{_properties(message).get('message_id') or uuid.uuid4()}")
        if death.get("reason") == "rejected" and dead_letters.get_by_delivery(delivery_id) is not None:
            # Celery rejects what it cannot hand to a task (unknown task, undecodable, invalid), and the
            # queue dead-letters it here; worker/delivery/consumer.py kept it already, with its reason.
            return message.ack()
        if death.get("reason") == "expired":
            # A task sent with `expires` (beat's scans) carries it as the message's TTL on RabbitMQ;
            # Celery discards an expired task too, and the next scan supersedes it.
            log.info("dropped %s %s: it expired before a worker took it", task, delivery_id)
            return message.ack()
        reason = "delivery-limit" if death.get("reason") == "delivery_limit" else "broker-dead-lettered"
        error = (f"RabbitMQ dead-lettered the message from {death.get('queue')!r} ({death.get('reason')})"
                 + (": returned more often than its delivery limit" if reason == "delivery-limit" else ""))
        _store(delivery_id, task, body, {**headers, "contentType": message.content_type}, reason, error)
        message.ack()


class IngressStep(bootsteps.ConsumerStep):
    """The worker's consumer of `invoices.ingress` and `invoices.dead`, on RabbitMQ only."""

    def include_if(self, c: Any) -> bool:
        return topology.is_amqp(c.app.conf.broker_url)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        from worker.brokers.topology import ROUTES
        from worker.config import settings

        limit = settings().max_deliveries
        ingress = Ingress(self.app, ROUTES)
        channel.basic_qos(0, PREFETCH, False)
        return [Consumer(channel, queues=[ingress_queue(limit)], on_message=settled(ingress.on_message)),
                Consumer(channel, queues=[topology.dead_queue(limit)], on_message=settled(ingress.on_dead))]

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.app = c.app
