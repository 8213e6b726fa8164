"""A retry that cannot be sent loses nothing (worker/delivery/task_base.py `again`).

Celery rejects a message without requeue when the publish of its retry fails (Task.retry:
`raise Reject(exc, requeue=False)`), and RabbitMQ drops a message rejected so. The cluster
scenarios met it: a retry's countdown goes to Celery's delay exchanges on quorum queues, and when
those were not there (the worker had not declared them) every payment that waited for its invoice
was lost, without a trace. Here the top delay exchange is deleted under the running worker; a
payment for an invoice that does not exist yet must wait (a retry with a countdown) and cannot: it
goes back to its queue each time and is dead-lettered when its deliveries run out.

Last in `make test-rabbitmq-quorum`: the worker's pool processes meet a closed channel here."""

from __future__ import annotations

import os

import pytest

from tests.conftest import dead_letters_of, new_tenant, send, wait_for
from tests.end_to_end.test_delivery import payment

pytestmark = pytest.mark.skipif(
    not os.environ.get("BROKER_URL", "").startswith("amqp") or os.environ.get("RABBITMQ_QUEUE_TYPE") != "quorum",
    reason="Celery's native delayed delivery: quorum queues on RabbitMQ")


def test_a_retry_that_cannot_be_sent_goes_back_and_ends_dead_lettered_not_dropped(running, broker):
    import amqp
    from kombu import Connection
    from kombu.transport.native_delayed_delivery import declare_native_delayed_delivery_exchanges_and_queues

    host = broker.split("@", 1)[1].split("/", 1)[0]
    with amqp.Connection(host, userid="guest", password="guest") as conn:
        conn.channel().exchange_delete("celery_delayed_27")  # where every countdown is published
    try:
        tenant = new_tenant()
        message_id = send("invoices.record_payment", payment(tenant, "NOT-YET", "5.00"))
        (letter,) = wait_for(lambda: dead_letters_of(message_id), 120, what="the payment dead-lettered")
        assert letter["taskName"] == "invoices.record_payment" and letter["body"]["invoiceNumber"] == "NOT-YET"
        assert letter["reason"] == "worker-lost", letter  # the poison count: its deliveries ran out
    finally:
        with Connection(broker) as conn:
            declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
