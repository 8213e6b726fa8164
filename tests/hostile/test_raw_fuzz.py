"""Raw-broker fuzz: what a damaged or non-Celery client can put on a contract queue, written
straight to the broker (Redis lists; AMQP publishes with any properties and headers), interleaved
with valid messages, to a running worker. Each drawn item carries its expected outcome; the
property: the worker keeps consuming, every item ends with exactly that outcome (applied once, or
dead-lettered with the expected reason), and nothing is left on the queue, in `unacked` or parked.

`make test` draws FUZZ_EXAMPLES items (default 60) from a fixed seed; a longer run:
`FUZZ_EXAMPLES=1000 FUZZ_SEED=random python -m pytest tests/hostile/test_raw_fuzz.py` (on RabbitMQ
through `python -m worker.local.rabbitmq_node test tests/hostile/test_raw_fuzz.py`)."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.faults.checker import Ledger, conninfo, outcomes, wait_settled
from tests.faults.conftest import fault_environment, reliability, scenario  # noqa: F401 - shared fixtures
from tests.faults.traffic import order, payment, send

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SEED = os.environ.get("FUZZ_SEED", "20261206")
QUEUE = "invoices.payments"
NUMBER = "FZ-1"


@dataclass
class Case:
    """One item for the broker and what must become of it."""

    kind: str
    marker: str  # in the item's bytes and in its body: how its dead letter is found
    expected: str  # "applied", or the dead letter's reason
    raw: bytes | None = None  # Redis: the list item
    amqp: dict[str, Any] | None = None  # RabbitMQ: body, content type and encoding, headers, properties
    amount: Decimal = Decimal("0")


def celery_body(body: dict[str, Any]) -> bytes:
    return json.dumps([[body], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def celery_headers(task_id: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"lang": "py", "task": "invoices.record_payment", "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": repr((body,)), "kwargsrepr": "{}", "origin": "fuzz",
            "ignore_result": False, **extra}


def envelope(marker: str, body: bytes, headers: dict[str, Any]) -> dict[str, Any]:
    """A kombu message on a Redis list, its marker first (so that a truncated copy keeps it)."""
    return {"x-marker": marker, "body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
            "content-type": "application/json", "headers": headers,
            "properties": {"correlation_id": headers.get("id"), "reply_to": "", "delivery_mode": 2,
                           "delivery_info": {"exchange": QUEUE, "routing_key": QUEUE}, "priority": 0,
                           "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}}


def iso(delta: timedelta) -> str:
    return (datetime.now(timezone.utc) + delta).isoformat()


INT = st.integers(-(2**63), 2**63 - 1)  # AMQP carries 64-bit integers at most
WRONG_ENVELOPE = {  # a field of the envelope and a strategy of values kombu cannot read there
    "body": st.one_of(INT, st.lists(INT, max_size=2), st.none(), st.just("!!not base64"), st.just("")),
    "properties": st.one_of(INT, st.text(max_size=5), st.lists(INT, max_size=2), st.none()),
    "headers": st.one_of(INT, st.text(max_size=5), st.lists(INT, max_size=2)),
    "content-type": st.one_of(INT, st.lists(INT, max_size=1), st.booleans()),
    "delivery_info": st.one_of(INT, st.text(max_size=5), st.lists(INT, max_size=1)),
    "body_encoding": st.one_of(INT, st.just("rot13"), st.lists(INT, max_size=1)),
}
WRONG_HEADER = {  # a task header and values Celery cannot read there
    "task": st.one_of(INT, st.lists(st.text(max_size=3), max_size=2), st.booleans()),
    "id": st.one_of(INT, st.lists(INT, max_size=1), st.none()),
    "retries": st.one_of(st.text(min_size=1, max_size=3), st.lists(INT, max_size=1), st.booleans()),
    "eta": st.one_of(INT, st.lists(INT, max_size=1)),
    "timelimit": st.one_of(st.text(max_size=3), st.just([1, 2, 3]), st.just(["a", "b"])),
}


@st.composite
def cases(draw: Any, tenant: str) -> Case:
    marker = f"fz-{uuid.uuid4()}"
    amount = Decimal(draw(st.integers(1, 99))) / 100
    body = {**payment(tenant, NUMBER, str(amount)), "messageId": marker}
    task_id = str(uuid.uuid4())
    kind = draw(st.sampled_from(["valid", "blanks", "timing", "random bytes", "truncated", "wrong envelope",
                                 "wrong header", "huge header", "not JSON inside"]))
    headers = celery_headers(task_id, body)
    amqp = {"body": celery_body(body), "content_type": "application/json", "content_encoding": "utf-8",
            "headers": headers}
    raw = json.dumps(envelope(marker, celery_body(body), headers)).encode()
    if kind == "valid":
        return Case(kind, marker, "applied", raw, amqp, amount)
    if kind == "blanks":
        before, after = draw(st.sampled_from([b"", b" ", b"\n", b"\t "])), draw(st.sampled_from([b"\n", b" \r\n", b"  "]))
        return Case(kind, marker, "applied", before + raw + after, amqp, amount)
    if kind == "timing":
        which = draw(st.sampled_from(["eta soon", "eta past", "expires past", "expires later", "eta too far",
                                      "retried"]))
        extra, expected = {
            "eta soon": ({"eta": iso(timedelta(seconds=draw(st.floats(0.5, 3))))}, "applied"),
            "eta past": ({"eta": iso(timedelta(seconds=-30))}, "applied"),
            "expires past": ({"expires": iso(timedelta(minutes=-5))}, "expired"),
            "expires later": ({"expires": iso(timedelta(hours=1))}, "applied"),
            "eta too far": ({"eta": iso(timedelta(days=draw(st.integers(2, 400))))}, "eta-too-far"),
            "retried": ({"retries": draw(st.integers(1, 2))}, "applied"),
        }[which]
        headers = {**headers, **extra}
        return Case(f"{kind}: {which}", marker, expected, json.dumps(envelope(marker, celery_body(body), headers)).encode(),
                    {**amqp, "headers": headers}, amount if expected == "applied" else Decimal("0"))
    if kind == "random bytes":
        junk = draw(st.binary(max_size=200))
        return Case(kind, marker, "not-a-message", marker.encode() + junk,
                    {"body": marker.encode() + junk, "content_type": draw(st.sampled_from(
                        ["application/json", "application/octet-stream", "text/plain"])), "content_encoding": "binary",
                     "headers": {}})
    if kind == "truncated":
        cut = draw(st.integers(len(marker) + 20, len(raw) - 1))
        return Case(kind, marker, "not-a-message", raw[:cut], {**amqp, "body": amqp["body"][:-draw(st.integers(1, 20))]})
    if kind == "wrong envelope":
        field = draw(st.sampled_from(sorted(WRONG_ENVELOPE)))
        value = draw(WRONG_ENVELOPE[field])
        message = envelope(marker, celery_body(body), headers)
        if field in ("delivery_info", "body_encoding"):
            message["properties"][field] = value
        else:
            message[field] = value
        # AMQP has no such envelope: the nearest is a body that is not the JSON its type says
        return Case(f"{kind}: {field}", marker, "not-a-message", json.dumps(message).encode(),
                    {**amqp, "body": draw(st.sampled_from([marker.encode() + b"{not json", b""]))})
    if kind == "wrong header":
        name = draw(st.sampled_from(sorted(WRONG_HEADER)))
        headers = {**headers, name: draw(WRONG_HEADER[name])}
        if name == "id" and headers["id"] is None:
            del headers["id"]
        return Case(f"{kind}: {name}", marker, "not-a-message", json.dumps(envelope(marker, celery_body(body), headers)).encode(),
                    {**amqp, "headers": headers})
    if kind == "huge header":
        size = draw(st.integers(10_000, 200_000))
        headers = {**headers, "x-junk": "j" * size}
        # RabbitMQ takes a message's headers in one frame (frame_max, 128 KiB): a publisher cannot
        # even send larger ones, so the AMQP copy carries at most 100,000 characters
        return Case(kind, marker, "applied", json.dumps(envelope(marker, celery_body(body), headers)).encode(),
                    {**amqp, "headers": {**headers, "x-junk": "j" * min(size, 100_000)}}, amount)
    # the envelope is fine; what it carries is not the JSON its content type says
    inner = marker.encode() + b"[[{" + draw(st.binary(max_size=20))
    return Case(kind, marker, "not-a-message", json.dumps(envelope(marker, inner, headers)).encode(),
                {**amqp, "body": inner})


def draw_cases(tenant: str) -> list[Case]:
    drawn: list[Case] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              derandomize=False)
    @given(cases(tenant))
    def collect(case: Case) -> None:
        drawn.append(case)

    if SEED != "random":
        collect = seed(int(SEED))(collect)
    collect()
    return drawn


def stored_text(body: Any) -> str:
    from worker.delivery.dead_letters import original_body

    value = original_body(body)
    return value.decode("latin-1") if isinstance(value, bytes) else json.dumps(value)


def dead_by_marker(database_url: str, markers: set[str]) -> dict[str, list[str]]:
    with psycopg.connect(conninfo(database_url)) as db:
        rows = db.execute("SELECT reason, message_id, body, headers FROM dead_letters").fetchall()
    found: dict[str, list[str]] = {}
    for reason, message_id, body, headers in rows:  # (an empty body's marker is in its headers' argsrepr)
        text = f"{message_id} {stored_text(body)} {json.dumps(headers)}"
        for marker in markers:
            if marker in text:
                found.setdefault(marker, []).append(reason)
    return found


def publish(scenario: Any, case: Case) -> None:
    if scenario.broker_url.startswith("redis"):
        import redis

        redis.Redis.from_url(scenario.broker_url).lpush(QUEUE, case.raw)
        return
    from kombu import Connection

    with Connection(scenario.broker_url) as conn:
        conn.Producer().publish(case.amqp["body"], exchange=QUEUE, routing_key=QUEUE, serializer=None,
                                content_type=case.amqp["content_type"], content_encoding=case.amqp["content_encoding"],
                                headers=case.amqp["headers"], retry=True)


def test_whatever_arrives_on_a_queue_ends_as_expected_and_the_worker_keeps_consuming(scenario) -> None:
    worker = scenario.processes.worker(extra_env={"BROKER_VISIBILITY_TIMEOUT": "3600"})
    publisher, ledger, tenant = scenario.publisher(), Ledger(), f"t-fz-{uuid.uuid4().hex[:6]}"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, NUMBER, total="100000.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    drawn = draw_cases(tenant)
    for index, case in enumerate(drawn):
        publish(scenario, case)
        if index % 5 == 0:  # valid traffic of another kind between them
            send(publisher, ledger, "invoices.record_payment", payment(tenant, NUMBER, "0.01"))
    markers = {c.marker for c in drawn}

    def ended(case: Case) -> bool:
        return (tenant, case.marker) in done or case.marker in dead
    deadline = time.monotonic() + 90
    while True:
        done, dead = outcomes(scenario.database_url), dead_by_marker(scenario.database_url, markers)
        if all(ended(case) for case in drawn) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    wrong = [(c.kind, c.expected, done.get((tenant, c.marker)), dead.get(c.marker)) for c in drawn
             if not ((c.expected == "applied" and done.get((tenant, c.marker)) == "applied" and c.marker not in dead)
                     or (c.expected != "applied" and dead.get(c.marker) == [c.expected]
                         and (tenant, c.marker) not in done))]
    assert wrong == [], wrong
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    assert worker.poll() is None  # still consuming
    paid = sum((c.amount for c in drawn if c.expected == "applied"), Decimal("0"))
    paid += Decimal("0.01") * len(ledger.messages) - Decimal("0.01")  # the valid traffic, less the order
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        (amount_paid,) = db.execute("SELECT amount_paid FROM invoices WHERE tenant_id = %s", (tenant,)).fetchone()
    assert amount_paid == paid  # each applied once
    nothing_left(scenario)


def nothing_left(scenario: Any) -> None:
    if scenario.broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(scenario.broker_url)
        wait_for(lambda: client.hlen("unacked") == 0 and client.llen(QUEUE) == 0 and client.zcard("invoices.parked") == 0,
                 30, what="nothing left in unacked, on the queue or parked")
        return
    from kombu import Connection

    with Connection(scenario.broker_url) as conn:
        channel = conn.default_channel
        wait_for(lambda: channel.queue_declare(QUEUE, passive=True).message_count == 0, 30,
                 what="nothing left on the queue")
