"""Issue #23, item 4: the ingress's conversion is code of ours between the broker and Celery, so
it carries a property test. Whatever bytes, content type and routing key a client sends, turning
the message into a task never raises: it yields the task's body and queue, or the dead letter
to store, with the bytes kept as received whenever they were not decoded. (The same messages
through a real worker on RabbitMQ: tests/end_to_end/test_ingress_isolation.py.)"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings, strategies as st

from worker.brokers.topology import ROUTES
from worker.celery_app import app
from worker.delivery.ingress import CONTENT_TYPE, Ingress, Letter

MAX_BYTES = 4096


@dataclass
class Received:
    """What kombu hands the ingress: the body as bytes, its content type, its routing key."""

    body: bytes
    content_type: str | None
    delivery_info: dict[str, Any]
    properties: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=20)
bodies = st.one_of(
    st.binary(max_size=MAX_BYTES + 100),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(500, MAX_BYTES).map(lambda depth: b"[" * depth),  # mostly beyond the decoder's nesting
    st.integers(MAX_BYTES - 10, MAX_BYTES + 10).map(lambda n: b'{"a": "' + b"x" * n + b'"}'),
    st.sampled_from([b'{"x": 1e999999}', b'{"x": NaN}', b'{"n": ' + b"9" * 5000 + b"}", b"\xff\xfe{}"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, content_type=st.sampled_from([CONTENT_TYPE, CONTENT_TYPE, None, "text/plain", ""]),
       task=st.sampled_from([*sorted(ROUTES)[:3], "invoices.no_such_task", "", "#"]))
def test_any_message_converts_to_a_task_or_a_dead_letter_and_never_raises(body, content_type, task):
    ingress = Ingress(app, ROUTES, MAX_BYTES)
    outcome = ingress.convert(Received(body, content_type, {"routing_key": task}), task)
    if isinstance(outcome, Letter):
        assert outcome.reason in {"too-large", "not-json", "unknown-task"}
        if outcome.body != body:  # kept byte for byte, or else as the JSON value it decoded to
            assert outcome.reason in {"not-json", "unknown-task"}
            assert json.dumps(outcome.body) == json.dumps(json.loads(body))  # NaN is not equal to itself
        if len(body) > MAX_BYTES:
            assert outcome.reason == "too-large"
    else:
        decoded, queue = outcome
        assert len(body) <= MAX_BYTES and content_type == CONTENT_TYPE and isinstance(decoded, dict)
        assert queue == ROUTES[task]
