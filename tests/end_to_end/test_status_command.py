"""`invoice-worker status [--json]` against the session's real worker and relay: every figure
agrees with the database and the broker it was read from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from sqlalchemy import text

from tests.conftest import ROOT, order_body, send, wait_for, wait_outcome
from worker.brokers.relay import wait_until_drained
from worker.brokers.topology import QUEUES
from worker.storage import db

TENANT = "t-status"


def count(sql: str) -> object:
    with db.engine().connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "status", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_status_agrees_with_the_database_and_the_broker(running, database):
    orders = [order_body(tenant=TENANT, autoIssue=True) for _ in range(3)]
    for body in orders:
        send("invoices.order_shipped", body)
    number = [wait_outcome(TENANT, b["messageId"]) for b in orders][0]["invoiceNumber"]
    too_much = {"messageId": f"pay-{uuid.uuid4()}", "tenantId": TENANT, "invoiceNumber": number,
                "amount": "1000000.00", "currency": "USD", "paymentMethod": "EFT"}
    send("invoices.record_payment", too_much)
    assert wait_outcome(TENANT, too_much["messageId"])["outcome"] == "rejected"
    send("invoices.record_payment", {"messageId": f"bad-{uuid.uuid4()}", "tenantId": TENANT})
    wait_for(lambda: count("SELECT count(*) FROM dead_letters") == 1, 30, what="the dead letter")
    assert wait_until_drained(database)

    shown = status("--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["problems"] == {}
    assert report["queues"] == {queue: 0 for queue in QUEUES}
    assert "shared@localhost" in report["workers"]
    # The session's worker and relay refresh their heartbeats; no beat runs in this session.
    assert report["heartbeats"]["worker"]["alive"] and report["heartbeats"]["relay"]["alive"]
    assert 0 <= report["heartbeats"]["relay"]["lastSeenAgeSeconds"] <= 20
    assert "relay: alive, heartbeat" in status().stdout
    assert report["outbox"] == {"unpublished": 0, "oldestUnpublishedAgeSeconds": 0.0}
    assert report["deadLettersOpen"] == count("SELECT count(*) FROM dead_letters WHERE status = 'open'") == 1
    assert report["lastHour"] == {
        "applied": count("SELECT count(*) FROM inbox WHERE outcome = 'applied'"),
        "rejected": count("SELECT count(*) FROM inbox WHERE outcome = 'rejected'"),
        "duplicate": count("SELECT count(*) FROM inbox WHERE outcome = 'duplicate'"),
        "deadLettered": count("SELECT count(*) FROM dead_letters"),
    } == {"applied": 3, "rejected": 1, "duplicate": 0, "deadLettered": 1}
    age_now = float(count("SELECT extract(epoch FROM now() - max(processed_at)) FROM inbox WHERE outcome = 'applied'"))
    assert 0 <= report["lastAppliedAgeSeconds"] <= age_now

    screen = status()
    assert screen.returncode == 0, screen.stderr
    assert "last hour: 3 applied, 1 rejected, 0 duplicate, 1 dead-lettered" in screen.stdout
    assert "open dead letters: 1" in screen.stdout
    assert "invoices.payments" in screen.stdout


def test_status_names_what_it_cannot_read_and_exits_1(database):
    broken = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "BROKER_URL": "redis://127.0.0.1:1/0"})
    assert broken.returncode == 1
    report = json.loads(broken.stdout)
    assert list(report["problems"]) == ["broker"] and report["queues"] is None and report["workers"] is None
    assert report["lastHour"] is not None  # the database still answered
