"""What differs between the two brokers the worker is tested on (README, "Brokers").

Redis keeps kombu's direct exchanges and plain lists, with our transport subclass
(worker/redis_transport.py). RabbitMQ gets durable quorum queues:

- `x-delivery-limit`: the broker counts every return of a message (a dead pool process, but also
  a dropped connection, a restart, a shutdown that hands messages back). The worker dead-letters
  a poison message `worker-lost` itself at its start MAX_DELIVERIES + 1, counted from the
  `redelivered` flag in PostgreSQL; the broker's limit is MAX_DELIVERIES + DELIVERY_LIMIT_MARGIN,
  so that returns which were not the message's fault cannot make the broker act first. A message
  returned more often than that (a worker that cannot reach PostgreSQL to count, or a consumer
  that dies at every delivery before it starts the task) is dead-lettered by the broker into
  `invoices.dead`, at least once, and the worker stores it in the dead-letter store
  (`delivery-limit`): never dropped.
- topic exchanges (one per queue, routing key = queue name, as on Redis), because Celery's native
  delayed delivery only serves non-direct exchanges: a retry's countdown waits in the broker's
  `celery_delayed_*` queues, not unacknowledged inside the worker. With quorum queues the prefetch
  count is static (no global QoS), so a countdown held by the worker would take a prefetch slot
  until it ran, and count against RabbitMQ's consumer_timeout.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from worker.redis_transport import transport_for

# Returns the broker may count that are not the message's fault, before its own limit applies.
DELIVERY_LIMIT_MARGIN = 10
DEAD_EXCHANGE = Exchange("invoices.dead", type="fanout", durable=True)
DEAD_QUEUE_NAME = "invoices.dead"


def is_amqp(broker_url: str | None) -> bool:
    return bool(broker_url) and broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")


def quorum_arguments(max_deliveries: int) -> dict[str, Any]:
    """Arguments of every durable queue the worker consumes on RabbitMQ."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": max_deliveries + DELIVERY_LIMIT_MARGIN,
        "x-dead-letter-exchange": DEAD_EXCHANGE.name,
        # at-least-once dead-lettering (RabbitMQ ≥ 3.10) requires reject-publish overflow; no length
        # limit is set, so nothing is ever rejected for length.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def task_queues(names: list[str] | tuple[str, ...], broker_url: str | None, max_deliveries: int) -> list[Queue]:
    """The worker's queues for this broker. Python publishers that declare queues (Celery does,
    at every send_task) must declare these same ones on RabbitMQ: it refuses a queue declared
    with other arguments (PRECONDITION_FAILED)."""
    if not is_amqp(broker_url):
        return [Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)
                for name in names]
    arguments = quorum_arguments(max_deliveries)
    return [Queue(name, Exchange(name, type="topic", durable=True), routing_key=name, durable=True,
                  queue_arguments=arguments) for name in names]


def dead_queue(max_deliveries: int) -> Queue:
    """Where RabbitMQ dead-letters a message beyond its delivery limit (quorum, no limit of its own)."""
    return Queue(DEAD_QUEUE_NAME, DEAD_EXCHANGE, durable=True, queue_arguments={"x-queue-type": "quorum"})


def broker_settings(names: list[str] | tuple[str, ...], broker_url: str | None, max_deliveries: int) -> dict[str, Any]:
    """The Celery settings that depend on the broker URL."""
    return {
        "broker_url": broker_url,
        # Redis: kombu's transport, handing back at once what a broker restart left unacknowledged.
        "broker_transport": transport_for(broker_url),
        "task_queues": task_queues(names, broker_url, max_deliveries),
    }


def configure(app: Any, names: list[str] | tuple[str, ...], broker_url: str, max_deliveries: int) -> None:
    """Point an existing app at another broker (tests, `publish` finding the embedded one)."""
    app.conf.update(broker_settings(names, broker_url, max_deliveries))
    # Celery computes the queues, the router and the task sender once, on first use, each holding
    # the queue declarations of the previous broker: computed again on next use.
    for cached in ("queues", "default_queue", "router", "send_task_message"):
        app.amqp.__dict__.pop(cached, None)
    app.amqp._rtable = None
    # Connections pooled for the previous broker would still be used (by control.ping, send_task):
    # drop them as Celery itself does after a fork (Celery._after_fork).
    if app._pool is not None:
        app._pool.force_close_all()
        app._pool = None
    app.amqp._producer_pool = None
