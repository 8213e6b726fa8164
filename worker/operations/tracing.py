"""OpenTelemetry tracing: one payment followed from its publisher, through this worker, to the events
its consumers receive. Off unless OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER is set (and
OTEL_SDK_DISABLED is not true); then every pool process sends its spans through the SDK's batch
processor to the exporters OTEL_TRACES_EXPORTER names (default `otlp`; `console`, `none`, or any
exporter installed under the SDK's entry point), configured by the standard OTEL_* variables the SDK
and exporter read themselves (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER,
OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_BSP_*, ...).

- A message applied alone (Celery's own path): a span `apply <task>` from task_prerun to
  task_postrun, a child of the context its publisher put in the Celery headers (W3C `traceparent`);
  the plain-JSON ingress copies the AMQP header `traceparent` into the task it publishes.
- A batch (worker/delivery/batching.py, which bypasses Celery's per-task run, and with it
  opentelemetry-instrumentation-celery's spans): a span `apply batch` with children `claim`,
  `load`, `flush` and `commit`; each message of it a span `apply <task>` of its publisher's trace,
  linked to the batch's span.
- Every outbox row a message writes keeps the `traceparent` of its span; the relay publishes it as
  the event's message header, so that a consumer continues the publisher's trace.

Message spans carry `messaging.message.id` (the task id), `invoice.task`, `invoice.tenant`,
`invoice.message_id` and `invoice.outcome`. Off, each hook is one test of a module-level bool.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from celery import signals

log = logging.getLogger(__name__)

# The headers of the W3C trace context a message carries (Celery headers, AMQP headers, events).
CONTEXT_HEADERS = ("traceparent", "tracestate")

_on = False
_tracer: Any = None
_provider: Any = None
_running: dict[str, tuple[Any, Any]] = {}  # task id -> (span, context token), between prerun and postrun
_NULL = contextlib.nullcontext()


def wanted() -> bool:
    """Whether the environment asks for traces (the standard variables; OTEL_TRACES_EXPORTER=none does not)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def on() -> bool:
    return _on


def _exporters() -> list[Any]:
    """The span exporters OTEL_TRACES_EXPORTER names, found as the SDK finds them (entry points)."""
    from importlib.metadata import entry_points

    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if n.strip()]
    found = []
    for name in names:
        if name == "none":
            continue
        if name == "otlp":  # the SDK's rule: the protocol picks the exporter (grpc unless said otherwise)
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
            name = "otlp_proto_http" if protocol.startswith("http") else "otlp_proto_grpc"
        if name == "console":  # the process's own stdout: Celery's worker makes sys.stdout a logger
            import sys

            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            found.append(ConsoleSpanExporter(out=sys.__stdout__))
            continue
        points = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not points:
            log.error("tracing: no span exporter named %r (OTEL_TRACES_EXPORTER); spans of this process are dropped", name)
            continue
        found.append(next(iter(points)).load()())
    return found


def setup(processor: Any = None) -> bool:
    """Start tracing in this process when the environment asks for it (a pool process after its fork:
    the batch processor's thread must be this process's). `processor`: a span processor of the
    caller's instead of the exporters' (`make bench`'s in-memory exporter)."""
    global _on, _tracer, _provider, _api, _context, _propagator
    if _on or not (wanted() or processor is not None):
        return _on
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "invoice-worker"}
    _provider = TracerProvider(resource=Resource.create(attributes))
    for part in [processor] if processor is not None else [BatchSpanProcessor(e) for e in _exporters()]:
        _provider.add_span_processor(part)
    if processor is None:
        trace.set_tracer_provider(_provider)
    _tracer = _provider.get_tracer("invoice-worker")
    _api, _context, _propagator = trace, context, TraceContextTextMapPropagator()
    if not _connected:
        _connect()
    _on = True
    return True


def shutdown() -> None:
    """Send what is still buffered (a pool process that ends, the worker's shutdown)."""
    global _on
    if _provider is not None:
        _provider.shutdown()
    _on = False


_connected = False
_api: Any = None  # opentelemetry.trace, once on
_context: Any = None  # opentelemetry.context, once on
_propagator: Any = None


def _connect() -> None:
    global _connected
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_ended, weak=False)
    signals.worker_process_shutdown.connect(_process_ends, weak=False)
    _connected = True


def _process_ends(**_: Any) -> None:
    shutdown()


def carried(headers: dict[str, Any] | None) -> dict[str, str]:
    """The trace context among a message's headers, to pass on (the ingress's task message)."""
    if not headers:
        return {}
    return {k: str(headers[k]) for k in CONTEXT_HEADERS if headers.get(k)}


def _parent(traceparent: Any, tracestate: Any) -> Any:
    """The publisher's context; without one, an empty context: the message starts a trace of its own
    (not a child of whatever is current, such as its batch's span)."""
    if not traceparent:
        return _context.Context()
    carrier = {"traceparent": str(traceparent)}
    if tracestate:
        carrier["tracestate"] = str(tracestate)
    return _propagator.extract(carrier)


def traceparent() -> str | None:
    """The `traceparent` of the current span (what this message's events carry); None when off."""
    if not _on:
        return None
    return traceparent_of(_api.get_current_span())


def traceparent_of(span: Any) -> str | None:
    """What the message's events carry: the `traceparent` of its span (None when off or not recording)."""
    if span is None:
        return None
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _message_attributes(task: str, task_id: str | None, body: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {"invoice.task": task, "messaging.system": "celery"}
    if task_id:
        attributes["messaging.message.id"] = task_id
    if isinstance(body, dict):
        tenant, message_id = body.get("tenantId"), body.get("messageId")
        if isinstance(tenant, str):
            attributes["invoice.tenant"] = tenant
        if isinstance(message_id, str):
            attributes["invoice.message_id"] = message_id
    return attributes


# ---------------------------------------------------------------- Celery's own path, one message


def _task_started(task_id: str | None = None, task: Any = None, args: tuple = (), **_: Any) -> None:
    if not _on or not task_id or task is None:
        return
    request = task.request
    parent = _parent(getattr(request, "traceparent", None), getattr(request, "tracestate", None))
    span = _tracer.start_span(f"apply {task.name}", context=parent, kind=_api.SpanKind.CONSUMER,
                              attributes=_message_attributes(task.name, task_id, args[0] if args else None))
    token = _context.attach(_api.set_span_in_context(span, parent))
    _running[task_id] = (span, token)


def _task_ended(task_id: str | None = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    running = _running.pop(task_id, None) if task_id else None
    if running is None:
        return
    span, token = running
    if state == "SUCCESS":
        outcome = retval.get("outcome", "applied") if isinstance(retval, dict) else "applied"
    else:
        outcome = "retried" if state == "RETRY" else "dead-lettered"
    span.set_attribute("invoice.outcome", outcome)
    span.end()
    _context.detach(token)


# ---------------------------------------------------------------- a batch (worker/delivery/batching.py)


def batch(size: int) -> Any:
    """The batch's span, current while the batch applies (a no-op context when off)."""
    if not _on:
        return _NULL
    return _tracer.start_as_current_span("apply batch", attributes={"invoice.batch.size": size})


def step(name: str) -> Any:
    """A step of the batch (claim, load, flush, commit): a child span of the batch's."""
    if not _on:
        return _NULL
    return _tracer.start_as_current_span(name)


def message_span(task: str, task_id: str, headers: dict[str, Any], body: Any) -> Any:
    """A started span for one message of the current batch, a child of its publisher's context and
    linked to the batch's span; None when off. End it with `ended`."""
    if not _on:
        return None
    batch_context = _api.get_current_span().get_span_context()
    return _tracer.start_span(f"apply {task}", context=_parent(headers.get("traceparent"), headers.get("tracestate")),
                              kind=_api.SpanKind.CONSUMER,
                              links=(_api.Link(batch_context),) if batch_context.is_valid else None,
                              attributes=_message_attributes(task, task_id, body))


def ended(span: Any, outcome: str) -> None:
    if span is not None:
        span.set_attribute("invoice.outcome", outcome)
        span.end()


@signals.worker_process_init.connect
def _pool_process_started(**_: Any) -> None:
    try:
        setup()
    except Exception:  # a wrong OTEL_* value must not stop a pool process from applying messages
        log.exception("tracing: could not start; this process applies its messages untraced")
