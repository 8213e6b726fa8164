"""What differs between the two brokers the worker is tested on (docs/brokers.md).

The contract's queues are the same on both: a durable queue behind a direct exchange of the same
name, exactly what any Celery client declares for `send_task(queue=name)` (CONTRACT.md section 2).
Quorum queues for them were tried: RabbitMQ 3.10 then refused every publisher that did not declare
the worker's queue arguments (PRECONDITION_FAILED), which the contract does not ask of publishers.
Redis runs through our transport subclass (worker/brokers/redis_transport.py).

RabbitMQ's own queue for plain JSON, `invoices.ingress`, is a quorum queue with a delivery limit
(`x-delivery-limit` = MAX_DELIVERIES + DELIVERY_LIMIT_MARGIN, so that returns which were not the
message's fault cannot make the broker act before the worker's own count): beyond it the broker
dead-letters into `invoices.dead`, at least once, and the worker stores the message whole
(`delivery-limit`): never dropped.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

# The contract's queues and the tasks each one carries (CONTRACT.md section 2).
QUEUES = {
    "invoices.orders": ("invoices.order_shipped",),
    "invoices.payments": (
        "invoices.payment_callback", "invoices.start_hosted_payment", "invoices.complete_hosted_payment",
        "invoices.fail_payment", "invoices.record_payment", "invoices.refund_payment",
    ),
    "invoices.commands": (
        "invoices.create", "invoices.update", "invoices.issue", "invoices.apply_discount",
        "invoices.remove_discount", "invoices.void", "invoices.cancel", "invoices.delete",
    ),
    "invoices.imports": ("invoices.bulk_import",),
    "invoices.maintenance": ("invoices.retry_failed_payments", "invoices.prune_outbox", "invoices.prune_records"),
}
ROUTES = {task: queue for queue, tasks in QUEUES.items() for task in tasks}

def queue_for(task_name: str) -> str:
    return ROUTES.get(task_name, "invoices.maintenance")


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
    # The contract's queues are by default what any Celery client declares for
    # `send_task(queue=name)`: a durable classic queue behind a direct exchange of the same name, on
    # both brokers. Quorum queues (or topic exchanges) made RabbitMQ refuse such a client with
    # PRECONDITION_FAILED, so they are the opt-in of a cluster (RABBITMQ_QUEUE_TYPE=quorum,
    # CONTRACT.md section 2), whose publishers declare the same: only `x-queue-type`, behind topic
    # exchanges (Celery's native delayed delivery of countdowns routes through topic bindings).
    # The worker counts poison messages itself; no delivery limit is declared, which a publisher
    # would have to repeat (a limit belongs in a RabbitMQ policy).
    if is_amqp(broker_url) and queue_type() == "quorum":
        return [Queue(name, Exchange(name, type="topic", durable=True), routing_key=name, durable=True,
                      queue_arguments={"x-queue-type": "quorum"}) for name in names]
    return [Queue(name, Exchange(name, type="direct", durable=True), routing_key=name, durable=True)
            for name in names]


def queue_type() -> str:
    """RABBITMQ_QUEUE_TYPE: classic (the default, what a bare Celery client declares) or quorum."""
    from worker.config import settings

    return settings().rabbitmq_queue_type


def dead_queue(max_deliveries: int) -> Queue:
    """Where RabbitMQ dead-letters a message beyond its delivery limit (quorum, no limit of its own)."""
    return Queue(DEAD_QUEUE_NAME, DEAD_EXCHANGE, durable=True, queue_arguments={"x-queue-type": "quorum"})


# Celery's broker_connection_timeout (seconds per connection attempt).
CONNECT_TIMEOUT = 4


def failover_options(broker_url: str | None) -> dict[str, Any]:
    """Transport options for a `;`-separated list of a cluster's nodes. kombu gives a connection
    attempt made on first use of a channel (a pool process publishing a retry) `connect_timeout` in
    all, failover included: a first node that does not answer (cut off, not refusing) used it up,
    and the publish failed without trying the next node (seen in the cluster scenario that cuts
    mq1: "could not send ... again (OperationalError: timed out)" every 4 s). Time for one attempt
    per node, and a little more."""
    nodes = len([url for url in (broker_url or "").split(";") if url.strip()])
    if nodes < 2:
        return {}
    return {"connect_retries_timeout": CONNECT_TIMEOUT * nodes + 2}


def broker_settings(names: list[str] | tuple[str, ...], broker_url: str | None, max_deliveries: int) -> dict[str, Any]:
    """The Celery settings that depend on the broker URL."""
    return {
        "broker_url": broker_url,
        # The transport follows the URL's scheme (worker/brokers/__init__.py): none named here.
        "broker_transport": None,
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
