"""The cost of tracing (issue #28): end to end with batching on, tracing off and on (the SDK's
console exporter writing every span into the worker's log file: the spans made, batched, formatted
and written, as an exporter would, without a collector), and, in-process, the CPU a batched
message's tracing costs (its span, its traceparent, its batch's share of the batch span and steps)
with the SDK's in-memory exporter."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from bench.harness import Environment
from bench.payments import end_to_end

TRACING_ON = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "invoice-worker-bench"}


def side_by_side(env: Environment, make_bodies: Any, concurrency: int, rounds: int = 2) -> dict[str, Any]:
    """End to end (batching on) with tracing off and on, alternating, `rounds` times each (the bench's
    payments carry no traceparent: each message's span starts a trace, which costs what a child does)."""
    off: list[dict[str, float]] = []
    on: list[dict[str, float]] = []
    for _ in range(rounds):
        off.append(end_to_end(env, make_bodies(), concurrency, {"OTEL_TRACES_EXPORTER": "none"}))
        on.append(end_to_end(env, make_bodies(), concurrency, TRACING_ON))
    return {"off": [r["rate"] for r in off], "on": [r["rate"] for r in on],
            "cpu_off_us": statistics.mean(r["worker_cpu_us"] for r in off),
            "cpu_on_us": statistics.mean(r["worker_cpu_us"] for r in on), **micro()}


def micro(batches: int = 200, size: int = 100) -> dict[str, float]:
    """CPU per message of the batch path's tracing hooks, in this process: off (the hooks' tests),
    and on with the in-memory exporter (spans made, ended and kept)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from worker.operations import tracing

    headers = {"traceparent": f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"}
    body = {"tenantId": "bench", "messageId": "pay-1"}

    def run() -> float:
        began = time.process_time()
        for _ in range(batches):
            with tracing.batch(size):
                spans = []
                for i in range(size):
                    span = tracing.message_span("invoices.record_payment", str(i), headers, body) if tracing.on() else None
                    spans.append((span, tracing.traceparent_of(span)))
                for step in ("claim", "load", "flush", "commit"):
                    with tracing.step(step):
                        pass
                for span, _ in spans:
                    tracing.ended(span, "applied")
        return (time.process_time() - began) / (batches * size) * 1e6

    off_us = run()
    exporter = InMemorySpanExporter()
    tracing.setup(processor=SimpleSpanProcessor(exporter))
    try:
        on_us = run()
        kept = len(exporter.get_finished_spans())
    finally:
        tracing.shutdown()
    assert kept == batches * (size + 5), kept
    return {"hooks_off_us": off_us, "hooks_on_us": on_us}
