"""Plain JSON from any AMQP client (CONTRACT.md section 2, RabbitMQ only): published with py-amqp's
own channel.basic_publish (no kombu, no Celery) to the topic exchange invoices.ingress with routing
key = task name, applied as the Celery message would be; events read back by a plain AMQP consumer."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from tests.conftest import dead_letters_of, invoice_json, order_body, wait_for, wait_outcome

pytestmark = pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"),
                                reason="plain JSON ingress is RabbitMQ's (CONTRACT.md section 2); Redis has no exchanges")


def plain_connection(broker_url: str) -> Any:
    import amqp

    url = urlparse(broker_url)
    vhost = unquote(url.path[1:]) or "/"
    conn = amqp.Connection(f"{url.hostname}:{url.port}", userid=url.username, password=url.password,
                           virtual_host=vhost, confirm_publish=True)
    conn.connect()
    return conn


class PlainClient:
    """What a service in another language does: publish JSON with confirms, consume events."""

    def __init__(self, broker_url: str) -> None:
        import amqp

        self.amqp = amqp
        self.conn = plain_connection(broker_url)
        self.channel = self.conn.channel()
        self.events_queue = f"plain-events-{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(self.events_queue, exclusive=True, auto_delete=True)
        self.channel.queue_bind(self.events_queue, "invoices.events", routing_key="#")
        self.events: list[dict[str, Any]] = []

    def publish(self, routing_key: str, body: bytes | dict[str, Any], content_type: str = "application/json") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        message = self.amqp.Message(raw, content_type=content_type, delivery_mode=2, message_id=str(uuid.uuid4()))
        self.channel.basic_publish(message, exchange="invoices.ingress", routing_key=routing_key)  # confirmed

    def drain(self, until, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.channel.basic_get(self.events_queue, no_ack=True)
            if message is None:
                if until(self.events):
                    break
                time.sleep(0.02)
                continue
            assert message.properties.get("content_type") == "application/json"
            self.events.append(json.loads(message.body))
        return self.events

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def plain(running, broker):
    client = PlainClient(broker)
    yield client
    client.close()


def test_plain_json_is_applied_like_the_celery_message_and_its_events_read_back(plain):
    order = order_body(tenant="t-plain", autoIssue=True)
    plain.publish("invoices.order_shipped", order)
    created = wait_outcome("t-plain", order["messageId"])
    assert created["outcome"] == "applied"
    number = created["invoiceNumber"]
    pay = {"messageId": f"pay-{uuid.uuid4()}", "tenantId": "t-plain", "invoiceNumber": number, "amount": "10.00",
           "currency": "USD", "paymentMethod": "EFT"}
    plain.publish("invoices.record_payment", pay)
    assert wait_outcome("t-plain", pay["messageId"])["outcome"] == "applied"
    plain.publish("invoices.record_payment", pay)  # the same message again, from the same client
    events = plain.drain(lambda e: {"invoice.created", "payment.recorded"} <= {x["type"] for x in e})
    assert {"invoice.created", "payment.recorded"} <= {e["type"] for e in events}
    assert all(e["tenantId"] == "t-plain" for e in events)
    assert {e["causationId"] for e in events} >= {order["messageId"], pay["messageId"]}
    wait_for(lambda: invoice_json("t-plain", number)["amountPaid"] == "10.00", 20, what="the payment")
    # the copy: a duplicate (nothing changes, no new event), recorded once under its messageId
    time.sleep(1)
    assert invoice_json("t-plain", number)["amountPaid"] == "10.00"
    later = plain.drain(lambda e: False, timeout=1)
    assert len([e for e in later if e["causationId"] == pay["messageId"]]) == \
        len([e for e in events if e["causationId"] == pay["messageId"]])


def test_plain_json_rules_and_malformed_bodies_end_as_the_celery_message_would(plain):
    pay = {"messageId": f"bad-{uuid.uuid4()}", "tenantId": "t-plain", "invoiceNumber": "INV-1", "amount": "abc",
           "currency": "USD"}
    plain.publish("invoices.record_payment", pay)
    (letter,) = wait_for(lambda: dead_letters_of(pay["messageId"]), 20, what="the dead letter")
    assert letter["reason"] == "malformed" and letter["body"] == pay and letter["taskName"] == "invoices.record_payment"


def test_what_is_not_a_task_message_is_dead_lettered_whole(plain):
    unknown = {"messageId": f"u-{uuid.uuid4()}", "tenantId": "t-plain"}
    plain.publish("invoices.no_such_task", unknown)
    plain.publish("invoices.record_payment", [1, 2, 3])
    plain.publish("invoices.record_payment", b"{not json")
    plain.publish("invoices.record_payment", b'{"messageId": "x"}', content_type="text/plain")

    def letters() -> list[dict[str, Any]]:
        found = [d for d in dead_letters_of() if d["deliveryId"].startswith("ingress:")]
        return found if len(found) >= 4 else []

    found = wait_for(letters, 20, what="four dead letters from the ingress")
    by_reason = sorted((d["reason"], d["taskName"]) for d in found)
    assert by_reason == [("not-json", "invoices.record_payment")] * 3 + [("unknown-task", "invoices.no_such_task")]
    bodies = [d["body"] for d in found]
    assert unknown in bodies and [1, 2, 3] in bodies
    raw = [base64.b64decode(b["base64"]) for b in bodies if isinstance(b, dict) and b.get("encoding") == "bytes"]
    assert sorted(raw) == [b'{"messageId": "x"}', b"{not json"]  # kept as received, byte for byte


def test_a_message_returned_beyond_the_delivery_limit_is_kept_in_the_dead_letter_store(processes, database, broker):
    """RabbitMQ's own limit on the ingress queue (MAX_DELIVERIES + 10 returns) dead-letters into
    invoices.dead, and the worker stores the message whole (`delivery-limit`). Here a plain
    consumer returns it each time, in a vhost of its own, before any worker consumes there."""
    import amqp
    from kombu import Connection

    from tests.conftest import isolated_broker_url
    from worker.brokers.topology import DELIVERY_LIMIT_MARGIN, dead_queue
    from worker.config import settings
    from worker.delivery.ingress import ingress_queue

    url = isolated_broker_url(broker)
    limit = settings().max_deliveries + DELIVERY_LIMIT_MARGIN
    with Connection(url) as kombu_conn:  # the queues as the worker declares them
        ingress_queue(settings().max_deliveries)(kombu_conn.default_channel).declare()
        dead_queue(settings().max_deliveries)(kombu_conn.default_channel).declare()
    body = {"messageId": f"lim-{uuid.uuid4()}", "tenantId": "t-plain", "invoiceNumber": "INV-1"}
    conn = plain_connection(url)
    try:
        channel = conn.channel()
        channel.basic_publish(amqp.Message(json.dumps(body), content_type="application/json", delivery_mode=2),
                              exchange="invoices.ingress", routing_key="invoices.issue")
        returns = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = channel.basic_get("invoices.ingress")
            if message is None:
                if returns > limit:
                    break
                time.sleep(0.05)
                continue
            assert message.headers.get("x-delivery-count", 0) == returns
            channel.basic_reject(message.delivery_tag, requeue=True)
            returns += 1
        assert returns == limit + 1  # delivered limit + 1 times, then gone from the queue
    finally:
        conn.close()
    processes.worker(name="dead-letters@localhost", queues="invoices.maintenance", extra_env={"BROKER_URL": url})
    (letter,) = wait_for(lambda: dead_letters_of(body["messageId"]), 20, what="the broker's dead letter to be stored")
    assert letter["reason"] == "delivery-limit" and letter["body"] == body and letter["taskName"] == "invoices.issue"
