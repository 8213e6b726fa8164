"""What the fault scenarios send, as an upstream service would: invoices to pay, then payments."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Iterable

from tests.faults.checker import Expected, Ledger

PUBLISH_RETRY = {"max_retries": 60, "interval_start": 0.1, "interval_step": 0.25, "interval_max": 1.0}


def send(publisher: Any, ledger: Ledger, task: str, body: dict[str, Any], expected: Expected | None = None) -> None:
    """Publish, retrying while the broker is away (as a careful publisher does); record it as sent,
    with what the sender expects of it (by default: applied, with its events)."""
    from worker.brokers.topology import queue_for

    try:
        publisher.send_task(task, args=[body], queue=queue_for(task), retry=True, retry_policy=PUBLISH_RETRY)
    except AttributeError:
        # kombu's Redis producer, retrying while the broker is killed, can revive a channel it has
        # already torn down (`'NoneType' object has no attribute 'client'`) instead of retrying; a
        # careful publisher starts again on a connection of its own (seen once in the kill scenario).
        with publisher.connection_for_write() as connection:
            publisher.send_task(task, args=[body], queue=queue_for(task), connection=connection, retry=True,
                                retry_policy=PUBLISH_RETRY)
    ledger.record(task, body, expected)


def order(tenant: str, number: str, total: str = "1000.00", **extra: Any) -> dict[str, Any]:
    return {"messageId": f"o-{uuid.uuid4()}", "tenantId": tenant, "orderId": f"ORD-{number}", "invoiceNumber": number,
            "orderNumber": number, "currency": "USD", "autoIssue": True, "taxAmount": "0", "paymentTerms": "Net30",
            "lineItems": [{"sku": "S", "description": "d", "quantity": "1", "unitPrice": total}], **extra}


def payment(tenant: str, number: str, amount: str) -> dict[str, Any]:
    return {"messageId": f"p-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": number, "amount": amount,
            "currency": "USD", "paymentMethod": "EFT"}


def amounts(count: int, seed: int = 7) -> list[str]:
    """Small exact amounts (0.01–9.99) that never exceed an invoice of 1000.00 in a scenario."""
    import random

    rng = random.Random(seed)
    return [f"{rng.randint(1, 999) / 100:.2f}" for _ in range(count)]


class Stream:
    """Sends bodies at a steady rate in a thread of its own; `sent` counts those published."""

    def __init__(self, publisher: Any, ledger: Ledger, task: str, bodies: Iterable[dict[str, Any]],
                 per_second: float) -> None:
        self.sent = 0
        self._args = (publisher, ledger, task, list(bodies), per_second)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        publisher, ledger, task, bodies, per_second = self._args
        start = time.monotonic()
        for i, body in enumerate(bodies):
            delay = start + i / per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            send(publisher, ledger, task, body)
            self.sent += 1

    def start(self) -> "Stream":
        self.thread.start()
        return self

    def wait_sent(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < count:
            assert time.monotonic() < deadline, f"only {self.sent} of {count} sent"
            time.sleep(0.02)

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the publisher did not finish"


class InvoiceHold:
    """Holds one invoice's row lock from outside, so that a task on it stops mid-transaction: the
    fault then meets a message that is certainly in flight (delivered, unacknowledged, running)."""

    def __init__(self, database_url: str, tenant: str, number: str) -> None:
        import psycopg

        from tests.faults.checker import conninfo

        self.conninfo = conninfo(database_url)
        self.db = psycopg.connect(self.conninfo)
        self.db.execute("SELECT 1 FROM invoices WHERE tenant_id = %s AND invoice_number = %s FOR UPDATE",
                        (tenant, number))

    def wait_blocked(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]
            if waiting:
                return
            assert time.monotonic() < deadline, "no task blocked on the held invoice"
            time.sleep(0.05)

    def release(self) -> None:
        try:
            self.db.rollback()
            self.db.close()
        except Exception:
            pass
