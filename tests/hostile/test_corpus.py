"""Hostile input through a real worker: every case ends as a dead letter or a rejection of that
message alone, ordinary messages sent between the cases are applied, and the worker keeps going
with bounded memory. The servers are the fault suite's own (tests/faults/conftest.py), so that
the worker's limits can be set low without touching the session's shared worker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import psutil
import psycopg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, wait_for
from tests.faults.checker import Ledger, conninfo, dead_letters, outcomes, wait_settled
from tests.faults.conftest import fault_environment, reliability, scenario  # noqa: F401 - shared fixtures
from tests.faults.traffic import order, payment, send

LIMIT = 256 * 1024


def worker_memory(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_hostile_corpus_costs_each_message_alone(scenario, tmp_path):
    worker = scenario.processes.worker(extra_env={"MAX_MESSAGE_BYTES": str(LIMIT)})
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-hostile"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "H-1", total="1000000.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)

    def base(**fields) -> dict:
        return {"messageId": f"h-{uuid.uuid4()}", "tenantId": tenant, **fields}

    create = {"currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "1.00"}]}
    dead = {  # task, body, expected dead-letter reason
        "surrogate in an extra field": ("invoices.create", base(**create, customer={"x": "\ud800"}), "malformed"),
        "NUL in an extra field": ("invoices.create", base(**create, customer={"x": "a\x00b"}), "malformed"),
        "nesting in an extra field": ("invoices.create", base(**create, customer={"x": {"y": {"z": [1]}}}), "malformed"),
        "amount beyond the columns": ("invoices.record_payment", {**payment(tenant, "H-1", "1e16")}, "malformed"),
        "paymentTerms longer than its column": ("invoices.create", base(**create, paymentTerms="N" * 200), "malformed"),
        "cardBrand longer than its column": ("invoices.record_payment",
                                             {**payment(tenant, "H-1", "1.00"), "cardBrand": "V" * 200}, "malformed"),
    }
    rejected = {  # task, body, expected rejection reason
        "quantity × price beyond the columns": ("invoices.create", base(currency="USD", lineItems=[
            {"quantity": "999999", "unitPrice": "999999999999"}]), "amount-too-large"),
        "NetN past the last date": ("invoices.create", base(currency="USD", invoiceDate="9999-12-31", paymentTerms="Net30",
                                                            lineItems=[{"quantity": "1", "unitPrice": "1"}]), "invalid-date"),
    }
    header_cases = {
        "eta far ahead": ("invoices.record_payment", payment(tenant, "H-1", "1.00"),
                          {"eta": datetime.now(timezone.utc) + timedelta(days=30)}, "eta-too-far"),
        "expired before delivery": ("invoices.record_payment", payment(tenant, "H-1", "1.00"),
                                    {"expires": datetime.now(timezone.utc) - timedelta(minutes=5)}, "expired"),
        # past the dead letters' 200-character delivery id; AMQP carries the id (correlation_id) in
        # at most 255 bytes, so a RabbitMQ publisher cannot even send 300
        "task id past its column": ("invoices.create", base(currency="USD", lineItems="not a list"),
                                    {"task_id": "t" * (250 if scenario.broker_url.startswith("amqp") else 300)},
                                    "malformed"),
    }
    reused_id = f"reused-{uuid.uuid4()}"
    for other in ("tenant-a", "tenant-b"):  # one task id, two tenants: two dead letters, neither reopens the other
        header_cases[f"reused task id ({other})"] = (
            "invoices.create", {"messageId": f"r-{uuid.uuid4()}", "tenantId": other, "currency": "USD", "lineItems": 1},
            {"task_id": reused_id}, "malformed")
    markup = {"messageId": "[/x]", "tenantId": tenant, "currency": "USD", "notes": "[/x]", "lineItems": "[bold]"}

    ordinary = []
    expected_dead: dict[str, str] = {}
    huge = base(**create, notes="x" * (LIMIT + 1))  # refused before decoding: kept as bytes, by its task id
    publisher.send_task("invoices.create", args=[huge], queue="invoices.commands", task_id="huge-one")
    for task, body, reason in dead.values():
        send(publisher, ledger, task, body)
        expected_dead[body["messageId"]] = reason
        ordinary.append(payment(tenant, "H-1", "1.00"))
        send(publisher, ledger, "invoices.record_payment", ordinary[-1])
    for task, body, options, reason in header_cases.values():
        from worker.brokers.topology import queue_for

        publisher.send_task(task, args=[body], queue=queue_for(task), **options)
        ledger.record(task, body)
        expected_dead[body["messageId"]] = reason
    for task, body, _ in rejected.values():
        send(publisher, ledger, task, body)
    send(publisher, ledger, "invoices.create", markup)
    expected_dead[markup["messageId"]] = "malformed"
    wait_settled(scenario.database_url, ledger, expected_dead, timeout=90)

    def huge_kept() -> list:
        with psycopg.connect(conninfo(scenario.database_url)) as db:
            return db.execute("SELECT reason, message_id, octet_length(body::text) FROM dead_letters "
                              "WHERE delivery_id = 'huge-one'").fetchall()

    wait_for(huge_kept, 30, what="the huge body's dead letter")
    ((reason, message_id, stored),) = huge_kept()
    assert (reason, message_id) == ("too-large", None) and stored > LIMIT  # whole, as base64
    found = {message: reason for message, reason, _ in dead_letters(scenario.database_url) if message is not None}
    assert found == expected_dead
    done = outcomes(scenario.database_url)
    for name, (_, body, reason) in rejected.items():
        assert done[(tenant, body["messageId"])] == "rejected", name
    assert all(done[(tenant, b["messageId"])] == "applied" for b in ordinary)
    assert worker.poll() is None
    env = {**os.environ, **scenario.env}
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "dead-letters", "list", "--status", "all"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "[/x]" in shown.stdout, shown.stderr  # shown as text, not read as markup
    assert worker_memory(worker.pid) < 600 * 1024 * 1024


VALID = {"messageId": "seed", "tenantId": "t-fuzz", "invoiceNumber": "H-1", "amount": "1.00", "currency": "USD",
         "paymentMethod": "EFT"}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)


@st.composite
def mutated(draw) -> dict:
    body = dict(VALID)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*VALID, "extra", "occurredAt", "status"]))
        if draw(st.booleans()) and key in body:
            del body[key]
        else:
            body[key] = draw(JSON_VALUES)
    body["messageId"] = f"fz-{uuid.uuid4()}"
    return body


def test_fuzzed_bodies_end_dead_lettered_rejected_or_applied(scenario):
    worker = scenario.processes.worker()
    publisher, ledger = scenario.publisher(), Ledger()
    send(publisher, ledger, "invoices.order_shipped", order("t-fuzz", "H-1", total="1000000.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    bodies: list[dict] = []

    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated())
    # Infinity: Python's JSON writes it, jsonb refuses it; the dead letter could not be stored and the
    # message went round for ever (a full run failed once on a drawn float('inf'))
    @example({**VALID, "currency": [{"x": True}, float("inf")], "messageId": f"fz-{uuid.uuid4()}"})
    def collect(body: dict) -> None:
        bodies.append(body)

    collect()
    for body in bodies:
        publisher.send_task("invoices.record_payment", args=[body], queue="invoices.payments")
    marker = payment("t-fuzz", "H-1", "0.01")
    send(publisher, ledger, "invoices.record_payment", marker)
    wait_settled(scenario.database_url, ledger, {}, timeout=60)

    def ended(body: dict) -> bool:
        tenant = body.get("tenantId")  # the worker strips an id's surrounding whitespace (messages/fields.py Id)
        return (isinstance(tenant, str) and (tenant.strip(), body["messageId"]) in outcomes(scenario.database_url)) or \
            body["messageId"] in {m for m, _, _ in dead_letters(scenario.database_url)}

    import time

    deadline = time.monotonic() + 90
    while not all(ended(b) for b in bodies):
        assert time.monotonic() < deadline, [b for b in bodies if not ended(b)][:3]
        time.sleep(0.5)
    reasons = {r for _, r, _ in dead_letters(scenario.database_url)}
    assert reasons <= {"malformed", "too-large"}, reasons
    assert worker.poll() is None
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        assert db.execute("SELECT count(*) FROM dead_letters WHERE reason = 'task-error'").fetchone()[0] == 0
