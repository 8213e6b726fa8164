"""PostgreSQL goes away mid-stream: stopped `immediate` (as a crash) and started again, and every
worker connection killed with pg_terminate_backend. Each payment is applied once, none is
dead-lettered, and the worker goes on by itself."""

from __future__ import annotations

import time

from tests.faults.checker import EventTap, Ledger, ReliabilityRow, check, wait_settled
from tests.faults.test_broker import invoices
from tests.faults.traffic import Stream, amounts, payment

# Enough retries with short back-off to outlast an 8-second outage.
PATIENT = {"TASK_MAX_RETRIES": "12", "TASK_RETRY_BACKOFF_MAX": "2"}


def test_database_stopped_and_connections_killed_mid_stream(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    scenario.processes.worker(extra_env=PATIENT)
    scenario.processes.relay(extra_env=PATIENT)
    ledger, tenant = Ledger(), "t-db"
    numbers = invoices(scenario, ledger, tenant, 20)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(360, seed=3))]
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies, per_second=30).start()
    database = scenario.environment.database_server
    stream.wait_sent(90)
    database.stop_immediate()
    time.sleep(8)
    database.start()
    stream.wait_sent(240)
    killed = database.terminate_backends(scenario.database_url)
    cleared = time.monotonic()
    stream.join()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=90)
    verdict = check(scenario.database_url, ledger, tap)
    reliability.append(ReliabilityRow(
        "PostgreSQL stopped (immediate) 8 s, then every connection terminated", verdict.sent, verdict.copies,
        f"1 stop, {killed} connections terminated", verdict.lost, verdict.applied_twice, verdict.events_missing,
        done - cleared))
    tap.close()
    verdict.assert_holds()
    assert killed >= 2, "the worker's and the relay's connections were terminated"
