"""Out of order across queues (CONTRACT.md section 4): payments that reach the worker before their
invoice's order_shipped wait for it and apply once it arrives; a payment for a deleted invoice is
rejected at once; one for an invoice that never comes is rejected after INVOICE_WAIT_SECONDS."""

from __future__ import annotations

import re
import time
import uuid

import psycopg

from tests.conftest import wait_for
from tests.faults.checker import EventTap, Ledger, check, conninfo, rejected, wait_settled
from tests.faults.traffic import amounts, order, payment, send

WAIT = 8


def inbox_row(database_url: str, tenant: str, message_id: str) -> tuple | None:
    with psycopg.connect(conninfo(database_url)) as db:
        return db.execute("SELECT outcome, reason, detail FROM inbox WHERE tenant_id = %s AND message_id = %s",
                          (tenant, message_id)).fetchone()


def waits(database_url: str, tenant: str) -> set[str]:
    """The messages that met their invoice missing and wait for it."""
    with psycopg.connect(conninfo(database_url)) as db:
        return {m for (m,) in db.execute("SELECT message_id FROM invoice_waits WHERE tenant_id = %s", (tenant,))}


def test_payments_before_their_invoice_wait_for_it(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    scenario.processes.worker(extra_env={"INVOICE_WAIT_SECONDS": str(WAIT)})
    scenario.processes.relay()
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-order"
    row = reliability.row("out of order: 90 payments sent before their 30 order_shipped, tried and waiting",
                          scenario.database_url, ledger, tap)
    row.faults = "payments ahead of their invoices; one deleted, one never created"
    # A deleted invoice: its tombstone answers at once.
    create = {"messageId": f"c-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": "O-DEL", "currency": "USD",
              "lineItems": [{"quantity": "1", "unitPrice": "5.00"}]}
    delete = {"messageId": f"d-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": "O-DEL"}
    send(publisher, ledger, "invoices.create", create)
    wait_settled(scenario.database_url, ledger, {}, timeout=30)
    send(publisher, ledger, "invoices.delete", delete)
    wait_settled(scenario.database_url, ledger, {}, timeout=30)

    numbers = [f"O-{i:05d}" for i in range(30)]
    early = [payment(tenant, numbers[i % 30], a) for i, a in enumerate(amounts(90, seed=17))]
    for body in early:
        send(publisher, ledger, "invoices.record_payment", body)
    to_deleted = payment(tenant, "O-DEL", "1.00")
    never = payment(tenant, "O-NEVER", "1.00")
    send(publisher, ledger, "invoices.record_payment", to_deleted, rejected("invoice-not-found"))
    send(publisher, ledger, "invoices.record_payment", never, rejected("invoice-not-found"))
    # Every payment has been tried and is waiting (its first sight recorded); then the invoices
    # arrive through their own queue.
    waiting = {b["messageId"] for b in [*early, never]}
    wait_for(lambda: waiting <= waits(scenario.database_url, tenant), 60, what="every early payment to wait")
    for number in numbers:
        send(publisher, ledger, "invoices.order_shipped", order(tenant, number))
    arrived = time.monotonic()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=60, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - arrived).assert_holds()
    assert all(inbox_row(scenario.database_url, tenant, b["messageId"])[0] == "applied" for b in early)
    outcome, reason, detail = inbox_row(scenario.database_url, tenant, to_deleted["messageId"])
    assert (outcome, reason) == ("rejected", "invoice-not-found")
    assert "was deleted" in detail and delete["messageId"] in detail
    outcome, reason, detail = inbox_row(scenario.database_url, tenant, never["messageId"])
    assert (outcome, reason) == ("rejected", "invoice-not-found")
    waited = re.search(r"waited (\d+)s", detail)
    assert waited and int(waited.group(1)) >= WAIT, detail
