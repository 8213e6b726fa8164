"""Dead-lettering while PostgreSQL is away: nothing is acknowledged unstored and nothing is sent
again as a copy; once the database is back, each message is one dead letter."""

from __future__ import annotations

import time
import uuid

from kombu import Connection, Exchange, Producer

from tests.faults.checker import dead_letters, wait_settled, Ledger
from tests.faults.conftest import fault_environment, reliability, scenario  # noqa: F401 - shared fixtures
from tests.faults.traffic import send


def test_dead_letters_wait_for_the_store_and_are_kept_once(scenario):
    worker = scenario.processes.worker(extra_env={"TASK_MAX_RETRIES": "20", "TASK_RETRY_BACKOFF_MAX": "1"})
    database = scenario.environment.database_server
    database.stop_immediate()
    publisher, ledger = scenario.publisher(), Ledger()
    malformed = {"messageId": f"bad-{uuid.uuid4()}", "tenantId": "t-away", "currency": "USD", "lineItems": "none"}
    send(publisher, ledger, "invoices.create", malformed)
    unknown = {"messageId": f"unknown-{uuid.uuid4()}", "tenantId": "t-away"}
    with Connection(scenario.broker_url) as connection:  # a task name no worker knows, as a publisher's typo
        Producer(connection.default_channel).publish(
            [[unknown], {}, {}], exchange=Exchange("invoices.commands", type="direct", durable=True),
            routing_key="invoices.commands", serializer="json",
            headers={"id": "unknown-1", "task": "invoices.no_such_task", "lang": "py", "argsrepr": "", "kwargsrepr": ""})
    time.sleep(6)  # both are tried while the store is away
    database.start()
    expected = {malformed["messageId"]: "malformed", unknown["messageId"]: "unknown-task"}
    ledger.record("invoices.no_such_task", unknown)
    wait_settled(scenario.database_url, ledger, expected, timeout=60)
    marker = {"messageId": f"marker-{uuid.uuid4()}", "tenantId": "t-away", "currency": "USD", "lineItems": "none"}
    send(publisher, ledger, "invoices.create", marker)  # behind anything sent again as a copy
    expected[marker["messageId"]] = "malformed"
    wait_settled(scenario.database_url, ledger, expected, timeout=60)
    rows = dead_letters(scenario.database_url)
    assert sorted((m, r) for m, r, _ in rows) == sorted(expected.items())
    assert worker.poll() is None
