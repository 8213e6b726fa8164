"""worker/operations/tracing.py in-process: when tracing is on, and the spans of a batch (the SDK's
in-memory exporter; the end-to-end path across processes is tests/end_to_end/test_tracing.py)."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from worker.operations import tracing

OTEL = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@pytest.mark.parametrize("env, wanted", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
])
def test_tracing_is_on_only_when_the_standard_variables_ask(monkeypatch, env, wanted):
    for name in OTEL:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.wanted() is wanted


def test_off_every_hook_does_nothing():
    assert not tracing.on()
    assert tracing.message_span("invoices.record_payment", "id", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
                                {}) is None
    assert tracing.traceparent() is None and tracing.traceparent_of(None) is None
    with tracing.batch(3), tracing.step("claim"):
        pass


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup(processor=SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.on()


def test_a_batch_s_messages_continue_their_publishers_traces_linked_to_the_batch(spans):
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    with tracing.batch(2):
        traced = tracing.message_span("invoices.record_payment", "task-1", {"traceparent": f"00-{trace_id}-{parent}-01"},
                                      {"tenantId": "acme", "messageId": "pay-1"})
        alone = tracing.message_span("invoices.record_payment", "task-2", {}, {"tenantId": "acme", "messageId": "pay-2"})
        with tracing.step("claim"):
            pass
        tracing.ended(traced, "applied")
        tracing.ended(alone, "rejected")
    by_name = {}
    for span in spans.get_finished_spans():
        by_name.setdefault(span.name, []).append(span)
    [batch], [claim] = by_name["apply batch"], by_name["claim"]
    first, second = by_name["apply invoices.record_payment"]
    assert claim.parent.span_id == batch.context.span_id
    assert f"{first.context.trace_id:032x}" == trace_id and f"{first.parent.span_id:016x}" == parent
    assert dict(first.attributes) == {"invoice.task": "invoices.record_payment", "messaging.system": "celery",
                                      "messaging.message.id": "task-1", "invoice.tenant": "acme",
                                      "invoice.message_id": "pay-1", "invoice.outcome": "applied"}
    # Without a publisher's context: a trace of its own, not a child of the batch.
    assert second.parent is None and second.context.trace_id not in (batch.context.trace_id, first.context.trace_id)
    for span in (first, second):
        assert [link.context.span_id for link in span.links] == [batch.context.span_id]
    # What the message's events carry.
    assert tracing.traceparent_of(traced) == f"00-{trace_id}-{first.context.span_id:016x}-01"


def test_carried_passes_on_only_the_trace_context():
    assert tracing.carried({"traceparent": "00-a-b-01", "tracestate": "k=v", "x-other": 1}) == {
        "traceparent": "00-a-b-01", "tracestate": "k=v"}
    assert tracing.carried(None) == {} and tracing.carried({"traceparent": ""}) == {}
