"""Tracing (worker/operations/tracing.py) across real processes: a payment published with a W3C
`traceparent` in its Celery headers, applied in a batch by a worker whose spans the SDK's console
exporter writes to its stdout, its log (OTEL_TRACES_EXPORTER=console), and its event published by the relay
with the traceparent of the payment's span as a message header."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from typing import Any

import pytest

from tests.conftest import EventCollector, new_tenant, order_body, wait_for, wait_outcome
from tests.end_to_end.test_batching import BatchWorker
from tests.end_to_end.test_delivery import issued_invoice, payment

TRACED = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "invoice-worker-test",
          "OTEL_BSP_SCHEDULE_DELAY": "100"}


def spans_in(log: str) -> list[dict[str, Any]]:
    """The spans the console exporter wrote into a worker's log (indented JSON objects, between its
    log lines)."""
    decoder = json.JSONDecoder()
    spans = []
    for match in re.finditer(r'\{\n\s+"name": ', log):
        try:
            span, _end = decoder.raw_decode(log, match.start())
        except json.JSONDecodeError:  # cut at the end of what was written so far
            continue
        spans.append(span)
    return spans


def traced_send(worker: BatchWorker, task: str, body: dict[str, Any], traceparent: str) -> None:
    from worker.brokers.topology import queue_for

    worker.delivery_ids[body["messageId"]] = worker.publisher.send_task(
        task, args=[body], queue=queue_for(task), headers={"traceparent": traceparent}).id
    worker.sent.append(body)


def event_headers(collector: EventCollector, message_id: str, timeout: float = 30) -> dict[str, Any]:
    """The message headers of the event this messageId caused, read off the broker."""
    bound = collector.queue(collector.conn.default_channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = bound.get(no_ack=True, accept=["json"])
        if message is None:
            time.sleep(0.05)
            continue
        if message.decode().get("causationId") == message_id:
            return dict(message.headers or {})
    raise AssertionError(f"no event caused by {message_id} within {timeout}s")


def test_a_payment_s_trace_runs_from_its_publisher_through_its_batch_to_its_event(running, processes, broker):
    collector = EventCollector(broker, routing_key="payment.recorded")
    worker = BatchWorker(processes, broker)
    try:
        tenant = new_tenant("t-trace")
        number = issued_invoice(tenant)["invoiceNumber"]
        trace_id, parent_span = uuid.uuid4().hex, os.urandom(8).hex()
        traced = payment(tenant, number, "10.00")
        traced_send(worker, "invoices.record_payment", traced, f"00-{trace_id}-{parent_span}-01")
        untraced = worker.send("invoices.record_payment", payment(tenant, number, "5.00"))
        worker.start(**TRACED)  # a batch of two

        assert wait_outcome(tenant, traced["messageId"])["outcome"] == "applied"
        assert wait_outcome(tenant, untraced["messageId"])["outcome"] == "applied"

        def applied() -> list[dict[str, Any]]:
            return [s for s in spans_in(worker.log) if s["name"] == "apply invoices.record_payment"
                    and s["attributes"].get("invoice.message_id") == traced["messageId"]]

        [span] = wait_for(applied, 30, what="the payment's span in the worker's log")
        # A child of its publisher's span, in its trace, with what an operator looks it up by.
        assert span["context"]["trace_id"] == f"0x{trace_id}"
        assert span["parent_id"] == f"0x{parent_span}"
        assert span["attributes"]["invoice.tenant"] == tenant
        assert span["attributes"]["invoice.outcome"] == "applied"
        assert span["attributes"]["messaging.message.id"] == worker.delivery_ids[traced["messageId"]]
        # Linked to its batch's span, whose steps are its children.
        [link] = span["links"]
        spans = spans_in(worker.log)
        [batch] = [s for s in spans if s["context"]["span_id"] == link["context"]["span_id"]]
        assert batch["name"] == "apply batch" and batch["attributes"]["invoice.batch.size"] == 2
        steps = {s["name"] for s in spans if s.get("parent_id") == batch["context"]["span_id"]}
        assert {"claim", "load", "flush", "commit"} <= steps
        # The other payment, published without a trace context, starts a trace of its own.
        wait_for(lambda: [s for s in spans_in(worker.log) if s["attributes"].get("invoice.message_id")
                          == untraced["messageId"]], 30, what="the other payment's span")
        [other] = [s for s in spans_in(worker.log) if s["attributes"].get("invoice.message_id") == untraced["messageId"]]
        assert other["context"]["trace_id"] != f"0x{trace_id}" and other["parent_id"] is None

        # The relay (another process) publishes the payment's event with the payment span's traceparent.
        headers = event_headers(collector, traced["messageId"])
        assert headers["traceparent"] == f"00-{trace_id}-{span['context']['span_id'][2:]}-01"
    finally:
        worker.close()
        collector.close()


def test_a_message_applied_alone_continues_its_publisher_s_trace_to_its_event(running, processes, broker):
    """Batching off (APPLY_BATCH_SIZE=1): the span of Celery's own run of the task."""
    from tests.conftest import OwnWorker, _flush_broker_database, own_broker_url

    collector = EventCollector(broker, routing_key="payment.recorded")
    url = own_broker_url(broker)
    _flush_broker_database(url)
    worker = OwnWorker(processes, url, {"APPLY_BATCH_SIZE": "1", **TRACED})
    try:
        tenant = new_tenant("t-trace-alone")
        number = issued_invoice(tenant)["invoiceNumber"]
        trace_id, parent_span = uuid.uuid4().hex, os.urandom(8).hex()
        body = payment(tenant, number, "7.00")
        from worker.brokers.topology import queue_for

        task_id = worker.publisher.send_task("invoices.record_payment", args=[body], queue=queue_for("invoices.record_payment"),
                                             headers={"traceparent": f"00-{trace_id}-{parent_span}-01"}).id
        assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"

        def applied() -> list[dict[str, Any]]:
            return [s for s in spans_in(worker.log) if s["attributes"].get("invoice.message_id") == body["messageId"]]

        [span] = wait_for(applied, 30, what="the payment's span in the worker's log")
        assert span["name"] == "apply invoices.record_payment" and not span["links"]
        assert span["context"]["trace_id"] == f"0x{trace_id}" and span["parent_id"] == f"0x{parent_span}"
        assert (span["attributes"]["invoice.outcome"], span["attributes"]["messaging.message.id"]) == ("applied", task_id)
        headers = event_headers(collector, body["messageId"])
        assert headers["traceparent"] == f"00-{trace_id}-{span['context']['span_id'][2:]}-01"
    finally:
        worker.close()
        processes.stop(worker.proc)
        _flush_broker_database(url)
        collector.close()


@pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"),
                    reason="the plain-JSON ingress is RabbitMQ's")
def test_the_plain_json_ingress_continues_the_publisher_s_trace(running, processes, broker):
    import amqp

    from tests.conftest import isolated_broker_url
    from tests.end_to_end.test_ingress import plain_connection

    url = isolated_broker_url(broker)  # a worker of its own: the shared one would take the message too
    worker = processes.worker(concurrency=1, extra_env={"BROKER_URL": url, **TRACED})
    tenant = new_tenant("t-trace-plain")
    order = order_body(tenant=tenant)
    trace_id, parent_span = uuid.uuid4().hex, os.urandom(8).hex()
    conn = plain_connection(url)
    try:
        message = amqp.Message(json.dumps(order).encode(), content_type="application/json", delivery_mode=2,
                               application_headers={"traceparent": f"00-{trace_id}-{parent_span}-01"})
        conn.channel().basic_publish(message, exchange="invoices.ingress", routing_key="invoices.order_shipped")
    finally:
        conn.close()
    assert wait_outcome(tenant, order["messageId"])["outcome"] == "applied"

    def applied() -> list[dict[str, Any]]:
        return [s for s in spans_in(worker.log.read_text()) if s["name"] == "apply invoices.order_shipped"
                and s["attributes"].get("invoice.message_id") == order["messageId"]]

    [span] = wait_for(applied, 30, what="the order's span in the worker's log")
    assert span["context"]["trace_id"] == f"0x{trace_id}" and span["parent_id"] == f"0x{parent_span}"
