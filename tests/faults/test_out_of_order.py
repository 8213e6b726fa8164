"""Out of order across queues (CONTRACT.md section 4): payments that reach the worker before their
invoice's order_shipped wait for it and apply once it arrives; a payment for a deleted invoice is
rejected at once; one for an invoice that never comes is rejected after INVOICE_WAIT_SECONDS."""

from __future__ import annotations

import re
import time
import uuid

import psycopg

from tests.faults.checker import EventTap, Ledger, ReliabilityRow, check, conninfo, wait_settled
from tests.faults.traffic import amounts, order, payment, send

WAIT = 8


def inbox_row(database_url: str, tenant: str, message_id: str) -> tuple | None:
    with psycopg.connect(conninfo(database_url)) as db:
        return db.execute("SELECT outcome, reason, detail FROM inbox WHERE tenant_id = %s AND message_id = %s",
                          (tenant, message_id)).fetchone()


def test_payments_before_their_invoice_wait_for_it(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    scenario.processes.worker(extra_env={"INVOICE_WAIT_SECONDS": str(WAIT)})
    scenario.processes.relay()
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-order"
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
    send(publisher, ledger, "invoices.record_payment", to_deleted)
    send(publisher, ledger, "invoices.record_payment", never)
    time.sleep(2)  # the payments are tried and wait; then the invoices arrive through their own queue
    for number in numbers:
        send(publisher, ledger, "invoices.order_shipped", order(tenant, number))
    arrived = time.monotonic()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=60)
    verdict = check(scenario.database_url, ledger, tap)
    reliability.append(ReliabilityRow(
        "out of order: 90 payments sent 2 s before their 30 order_shipped", verdict.sent, verdict.copies,
        "payments ahead of their invoices; one deleted, one never created", verdict.lost, verdict.applied_twice,
        verdict.events_missing, done - arrived))
    tap.close()
    verdict.assert_holds()
    assert all(inbox_row(scenario.database_url, tenant, b["messageId"])[0] == "applied" for b in early)
    outcome, reason, detail = inbox_row(scenario.database_url, tenant, to_deleted["messageId"])
    assert (outcome, reason) == ("rejected", "invoice-not-found")
    assert "was deleted" in detail and delete["messageId"] in detail
    outcome, reason, detail = inbox_row(scenario.database_url, tenant, never["messageId"])
    assert (outcome, reason) == ("rejected", "invoice-not-found")
    waited = re.search(r"waited (\d+)s", detail)
    assert waited and int(waited.group(1)) >= WAIT, detail
