"""Issue #23, items 4 and 10 (RabbitMQ only): on the plain JSON ingress one message costs only
itself. A body the decoder cannot read (nesting that raises RecursionError), a body over
MAX_MESSAGE_BYTES, and a message expired by its TTL each end as one dead letter, stored once and
as received, while the messages published around them are applied."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any

import pytest

from tests.conftest import dead_letters_of, isolated_broker_url, order_body, wait_for, wait_outcome
from tests.end_to_end.test_ingress import PlainClient, plain_connection

pytestmark = pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"),
                                reason="plain JSON ingress is RabbitMQ's (CONTRACT.md section 2); Redis has no exchanges")


def raw_of(letter: dict[str, Any]) -> bytes:
    body = letter["body"]
    assert isinstance(body, dict) and body.get("encoding") == "bytes", body
    return base64.b64decode(body["base64"])


def ingress_letter(message_id: str) -> list[dict[str, Any]]:
    return [d for d in dead_letters_of() if d["deliveryId"] == f"ingress:{message_id}"]


def publish(channel: Any, routing_key: str, raw: bytes, message_id: str, **properties: Any) -> None:
    import amqp

    channel.basic_publish(amqp.Message(raw, content_type="application/json", delivery_mode=2, message_id=message_id,
                                       **properties), exchange="invoices.ingress", routing_key=routing_key)


def queue_depth(channel: Any, name: str) -> int:
    return channel.queue_declare(name, passive=True).message_count


def test_a_body_nested_past_the_decoder_is_dead_lettered_once_as_received_and_the_next_message_applies(running,
                                                                                                        broker):
    """Before the fix: RecursionError escaped the handler, which slept 1 s in the worker's main
    process and handed the message back, again and again, then RabbitMQ moved it to invoices.dead,
    where the same error looped for ever: no dead letter was ever stored."""
    client = PlainClient(broker)
    try:
        nested_id = f"nest-{uuid.uuid4()}"
        nested = b"[" * 200_000
        publish(client.channel, "invoices.record_payment", nested, nested_id)
        order = order_body(tenant="t-plain", autoIssue=True)
        client.publish("invoices.order_shipped", order)
        (letter,) = wait_for(lambda: ingress_letter(nested_id), 60, what="the nested body's dead letter")
        assert letter["reason"] == "too-large" and "nests deeper" in letter["error"]
        assert letter["taskName"] == "invoices.record_payment" and letter["attempts"] == 1
        assert raw_of(letter) == nested  # byte for byte
        assert wait_outcome("t-plain", order["messageId"], 60)["outcome"] == "applied"
        # settled: neither handed back to the ingress nor moved to invoices.dead
        wait_for(lambda: queue_depth(client.channel, "invoices.ingress") == 0, 30, what="the ingress to empty")
        assert queue_depth(client.channel, "invoices.dead") == 0
        time.sleep(2)
        assert [d["attempts"] for d in ingress_letter(nested_id)] == [1]
    finally:
        client.close()


def test_a_body_over_max_message_bytes_is_dead_lettered_too_large_before_it_is_decoded(processes, broker):
    """Before the fix the ingress decoded any size and published it as a task; the Celery message
    built from it was then dead-lettered by the task consumer: another delivery id, and the body
    re-encoded, no longer the bytes the publisher sent."""
    url = isolated_broker_url(broker)
    processes.worker(name=f"ingress-cap-{uuid.uuid4().hex[:6]}@localhost",
                     extra_env={"BROKER_URL": url, "MAX_MESSAGE_BYTES": "4096"})
    conn = plain_connection(url)
    try:
        channel = conn.channel()
        big_id, small_id = f"big-{uuid.uuid4()}", f"small-{uuid.uuid4()}"
        big = json.dumps(order_body(tenant="t-cap", note="x" * 5000)).encode() + b"\n"
        small = order_body(tenant="t-cap", autoIssue=True)
        publish(channel, "invoices.order_shipped", big, big_id)
        publish(channel, "invoices.order_shipped", json.dumps(small).encode(), small_id)
        (letter,) = wait_for(lambda: ingress_letter(big_id), 60, what="the large body's dead letter")
        assert letter["reason"] == "too-large" and "MAX_MESSAGE_BYTES allows 4096" in letter["error"]
        assert raw_of(letter) == big and letter["taskName"] == "invoices.order_shipped"
        assert wait_outcome("t-cap", small["messageId"], 60)["outcome"] == "applied"
        assert dead_letters_of(json.loads(big)["messageId"]) == []  # nothing was decoded to find its messageId
    finally:
        conn.close()


def test_a_plain_message_expired_by_its_ttl_is_dead_lettered_expired_and_a_maintenance_task_is_not(processes,
                                                                                                   broker):
    """Before the fix every message RabbitMQ dead-lettered as `expired` was dropped with an INFO
    line: a publisher's message that waited past its TTL left no trace an operator could see.
    The messages expire in a vhost with no worker yet, then a worker stores what they became."""
    from kombu import Connection

    from worker.brokers.topology import dead_queue
    from worker.config import settings
    from worker.delivery.ingress import ingress_queue

    url = isolated_broker_url(broker)
    with Connection(url) as kombu_conn:  # the queues as the worker declares them
        ingress_queue(settings().max_deliveries)(kombu_conn.default_channel).declare()
        dead_queue(settings().max_deliveries)(kombu_conn.default_channel).declare()
    payment_id, scan_id = f"exp-{uuid.uuid4()}", f"scan-{uuid.uuid4()}"
    payment = {"messageId": payment_id, "tenantId": "t-exp", "invoiceNumber": "INV-1", "amount": "1.00",
               "currency": "USD", "paymentMethod": "EFT"}
    conn = plain_connection(url)
    try:
        channel = conn.channel()
        publish(channel, "invoices.record_payment", json.dumps(payment).encode(), payment_id, expiration="1")
        publish(channel, "invoices.prune_outbox", b"{}", scan_id, expiration="1")
        seen = []

        def expired() -> bool:
            seen.append((queue_depth(channel, "invoices.ingress"), queue_depth(channel, "invoices.dead")))
            return seen[-1][0] == 0 and seen[-1][1] >= 2

        wait_for(expired, 30, interval=0.2, what="both messages to expire")
    finally:
        conn.close()
    processes.worker(name=f"ingress-exp-{uuid.uuid4().hex[:6]}@localhost", queues="invoices.maintenance",
                     extra_env={"BROKER_URL": url})
    (letter,) = wait_for(lambda: dead_letters_of(payment_id), 60, what="the expired message's dead letter")
    assert letter["reason"] == "expired" and "'invoices.ingress'" in letter["error"]
    assert letter["body"] == payment and letter["taskName"] == "invoices.record_payment"
    assert letter["deliveryId"] == f"ingress:{payment_id}"
    check = plain_connection(url)
    try:
        wait_for(lambda: queue_depth(check.channel(), "invoices.dead") == 0, 30, what="invoices.dead to empty")
    finally:
        check.close()
    assert [d for d in dead_letters_of(task="invoices.prune_outbox") if scan_id in d["deliveryId"]] == []
