"""PostgreSQL goes away mid-stream: stopped `immediate` (as a crash) and started again, and every
worker connection killed with pg_terminate_backend. The outage meets messages for certain: one
payment is held mid-transaction (a row lock from outside) when the database stops, and the stream
goes on while it is down. Each payment is applied once, none is dead-lettered, and the worker goes
on by itself."""

from __future__ import annotations

import time

from tests.faults.checker import EventTap, Ledger, check, outcomes, wait_settled
from tests.faults.test_broker import invoices
from tests.faults.traffic import InvoiceHold, Stream, amounts, payment, send

# Enough retries with short back-off to outlast an 8-second outage.
PATIENT = {"TASK_MAX_RETRIES": "12", "TASK_RETRY_BACKOFF_MAX": "2"}


def test_database_stopped_and_connections_killed_mid_stream(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    scenario.processes.worker(extra_env=PATIENT)
    scenario.processes.relay(extra_env=PATIENT)
    ledger, tenant = Ledger(), "t-db"
    row = reliability.row("PostgreSQL stopped (immediate) 8 s, then every connection terminated",
                          scenario.database_url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, 20)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(360, seed=3))]
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies, per_second=30).start()
    database = scenario.environment.database_server
    stream.wait_sent(90)
    # A payment certainly in flight when the database stops: running, its transaction open.
    held = payment(tenant, "F-HELD", "1.00")
    hold = InvoiceHold(scenario.database_url, tenant, "F-HELD")
    send(scenario.publisher(), ledger, "invoices.record_payment", held)
    hold.wait_blocked()
    sent_before = stream.sent
    database.stop_immediate()  # ends the hold's connection too
    hold.release()
    time.sleep(8)  # the fault itself: the database stays away 8 s
    down_sent = stream.sent - sent_before
    database.start()
    stream.wait_sent(240)
    killed = database.terminate_backends(scenario.database_url)
    row.faults = (f"1 stop (1 payment mid-transaction then, {down_sent} sent while down), "
                  f"{killed} connections terminated")
    cleared = time.monotonic()
    stream.join()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=90, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - cleared).assert_holds()
    assert outcomes(scenario.database_url)[(tenant, held["messageId"])] == "applied"
    assert down_sent >= 100, "the stream went on while the database was down: those messages met the outage"
    assert killed >= 1, "connections of the worker or the relay were terminated"
