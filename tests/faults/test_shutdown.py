"""SIGTERM while a 10,000-entry import runs: Celery's warm shutdown lets the import finish, the
worker exits, and after a restart nothing is applied twice: the import is applied once."""

from __future__ import annotations

import os
import signal
import time

import psutil
import psycopg

from tests.conftest import wait_for
from tests.faults.checker import EventTap, Ledger, check, conninfo, wait_settled
from tests.faults.test_poison import GROWTH_BYTES, large_import
from tests.faults.traffic import send

STOP_SECONDS = 30  # WORKER_STOP_SECONDS: what `run` would allow before killing the worker


def running_large_task(worker_pid: int, baseline: dict[int, int]) -> bool:
    for child in psutil.Process(worker_pid).children():
        rss = child.memory_info().rss
        if rss - baseline.setdefault(child.pid, rss) > GROWTH_BYTES // 2:
            return True
    return False


def test_sigterm_during_a_large_import_loses_nothing(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    worker = scenario.processes.worker()
    scenario.processes.relay()
    ledger, tenant = Ledger(), "t-sigterm"
    row = reliability.row("SIGTERM during a 10,000-entry import (warm shutdown), then a restart",
                          scenario.database_url, ledger, tap)
    body = large_import(tenant)
    baseline: dict[int, int] = {}
    running_large_task(worker.pid, baseline)
    send(scenario.publisher(), ledger, "invoices.bulk_import", body)
    wait_for(lambda: running_large_task(worker.pid, baseline), 60, 0.02, what="the import to run")
    os.kill(worker.pid, signal.SIGTERM)
    stopping = time.monotonic()
    worker.wait(60)
    stopped_in = time.monotonic() - stopping
    row.faults = f"1 SIGTERM; the worker stopped in {stopped_in:.1f} s"
    scenario.processes.worker()
    cleared = time.monotonic()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=120, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - cleared).assert_holds()
    assert stopped_in < STOP_SECONDS, f"the worker took {stopped_in:.1f}s to stop"
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        assert db.execute("SELECT count(*) FROM invoices WHERE tenant_id = %s", (tenant,)).fetchone()[0] == 10_000
    completed = [e for e in tap.events.values() if e["type"] == "import.completed"]
    assert len(completed) == 1 and completed[0]["data"]["counts"]["created"] == 10_000
