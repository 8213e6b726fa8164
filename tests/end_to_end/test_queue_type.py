"""RABBITMQ_QUEUE_TYPE (CONTRACT.md section 2): the contract's queues are classic queues behind
direct exchanges by default, quorum queues behind topic exchanges when it says `quorum` (a
cluster's, replicated). `make test-rabbitmq-quorum` runs the retry back-off, the invoice wait and
the payment-retry schedule on quorum queues (Celery's native delayed delivery carries the
countdowns); this test shows which kind the run had."""

from __future__ import annotations

import os

import pytest


@pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"), reason="RabbitMQ's queue types")
def test_the_contract_queues_are_of_the_configured_type(running, broker):
    import amqp

    from worker.brokers.topology import QUEUES
    from worker.config import settings

    quorum = settings().rabbitmq_queue_type == "quorum"
    same = {"x-queue-type": "quorum"} if quorum else None
    other = None if quorum else {"x-queue-type": "quorum"}
    host = broker.split("@", 1)[1].split("/", 1)[0]
    with amqp.Connection(host, userid="guest", password="guest") as conn:
        for name in QUEUES:
            conn.channel().queue_declare(name, durable=True, auto_delete=False, arguments=same)  # as declared: fine
            with pytest.raises(amqp.exceptions.PreconditionFailed):
                conn.channel().queue_declare(name, durable=True, auto_delete=False, arguments=other)
        if quorum:  # countdowns wait in the broker's delayed-delivery levels, bound through topic exchanges
            conn.channel().exchange_declare("celery_delayed_delivery", "topic", passive=True)
