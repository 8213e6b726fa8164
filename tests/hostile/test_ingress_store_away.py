"""Issue #23, items 4 and 10, the one case where the ingress hands a message back (RabbitMQ): the
dead-letter store is away. A message that must be dead-lettered is never acknowledged unstored;
it waits, unacknowledged, on the event loop's timer (not in a sleep of the consumer's thread,
which would stop every queue), is handed back, and once PostgreSQL is back it is stored once,
whole. Meanwhile the ingress goes on converting the valid messages behind it."""

from __future__ import annotations

import base64
import json
import os
import uuid

import psycopg
import pytest

from tests.conftest import order_body, wait_for
from tests.end_to_end.test_ingress import plain_connection
from tests.end_to_end.test_ingress_isolation import publish, queue_depth
from tests.faults.checker import conninfo
from tests.faults.conftest import fault_environment, scenario  # noqa: F401 - shared fixtures

pytestmark = pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"),
                                reason="plain JSON ingress is RabbitMQ's (CONTRACT.md section 2)")


def ingress_rows(database_url: str) -> list[tuple[str, str, int, object]]:
    with psycopg.connect(conninfo(database_url)) as db:
        return db.execute("SELECT delivery_id, reason, attempts, body FROM dead_letters "
                          "WHERE delivery_id LIKE 'ingress:%' ORDER BY id").fetchall()


def applied(database_url: str, tenant: str, message_id: str) -> bool:
    with psycopg.connect(conninfo(database_url)) as db:
        return db.execute("SELECT outcome FROM inbox WHERE tenant_id = %s AND message_id = %s",
                          (tenant, message_id)).fetchone() == ("applied",)


def test_ingress_dead_letters_wait_for_the_store_and_are_kept_once(scenario):
    worker = scenario.processes.worker(extra_env={"TASK_MAX_RETRIES": "20", "TASK_RETRY_BACKOFF_MAX": "1"})
    database = scenario.environment.database_server
    database.stop_immediate()
    nested_id, broken_id = f"nest-{uuid.uuid4()}", f"broken-{uuid.uuid4()}"
    nested, broken = b"[" * 200_000, b'{"messageId": "x", '
    order = order_body(tenant="t-away", autoIssue=True)
    conn = plain_connection(scenario.broker_url)
    try:
        channel = conn.channel()
        publish(channel, "invoices.record_payment", nested, nested_id)
        publish(channel, "invoices.create", broken, broken_id)
        publish(channel, "invoices.order_shipped", json.dumps(order).encode(), f"order-{uuid.uuid4()}")
        log = worker.log  # type: ignore[attr-defined]
        # each is handed back more than once while the store is away...
        wait_for(lambda: log.read_text().count(f"cannot dead-letter ingress:{nested_id}") >= 2
                 and log.read_text().count(f"cannot dead-letter ingress:{broken_id}") >= 2, 60,
                 what="the ingress to hand both messages back, twice each")
        # ...and the valid message behind them became its task meanwhile (it waits for the database too)
        wait_for(lambda: "invoices.order_shipped[" in log.read_text(), 60, what="the order to reach its task")
    finally:
        database.start()
    try:
        wait_for(lambda: len(ingress_rows(scenario.database_url)) == 2, 120, what="both dead letters once back")
        wait_for(lambda: applied(scenario.database_url, "t-away", order["messageId"]), 120, what="the order")
        rows = {delivery_id: (reason, attempts, body) for delivery_id, reason, attempts, body
                in ingress_rows(scenario.database_url)}
        assert set(rows) == {f"ingress:{nested_id}", f"ingress:{broken_id}"}
        for delivery_id, raw, reason in ((f"ingress:{nested_id}", nested, "too-large"),
                                         (f"ingress:{broken_id}", broken, "not-json")):
            stored_reason, attempts, body = rows[delivery_id]
            assert (stored_reason, attempts) == (reason, 1)  # stored once: nothing was acknowledged unstored
            assert base64.b64decode(body["base64"]) == raw
        channel = conn.channel()
        wait_for(lambda: queue_depth(channel, "invoices.ingress") == 0, 30, what="the ingress to empty")
        assert queue_depth(channel, "invoices.dead") == 0 and worker.poll() is None
    finally:
        conn.close()
