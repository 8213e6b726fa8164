"""SIGTERM while a 10,000-entry import runs: the worker stops within its soft shutdown time (the
import stopped and handed back, its transaction rolled back), and after a restart the import is
applied once."""

from __future__ import annotations

import os
import signal
import time

import psutil
import psycopg

from tests.conftest import wait_for
from tests.faults.checker import EventTap, Ledger, ReliabilityRow, check, conninfo, wait_settled
from tests.faults.test_poison import GROWTH_BYTES, large_import
from tests.faults.traffic import send

SOFT_SHUTDOWN = 0.5  # shorter than the import: it is stopped and handed back


def running_large_task(worker_pid: int, baseline: dict[int, int]) -> bool:
    for child in psutil.Process(worker_pid).children():
        rss = child.memory_info().rss
        if rss - baseline.setdefault(child.pid, rss) > GROWTH_BYTES // 2:
            return True
    return False


def test_sigterm_during_a_large_import_loses_nothing(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    env = {"WORKER_SOFT_SHUTDOWN_SECONDS": str(SOFT_SHUTDOWN)}
    worker = scenario.processes.worker(extra_env=env)
    scenario.processes.relay()
    ledger, tenant = Ledger(), "t-sigterm"
    body = large_import(tenant)
    baseline: dict[int, int] = {}
    running_large_task(worker.pid, baseline)
    send(scenario.publisher(), ledger, "invoices.bulk_import", body)
    wait_for(lambda: running_large_task(worker.pid, baseline), 60, 0.02, what="the import to run")
    os.kill(worker.pid, signal.SIGTERM)
    stopping = time.monotonic()
    worker.wait(60)
    stopped_in = time.monotonic() - stopping
    scenario.processes.worker(extra_env=env)
    cleared = time.monotonic()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=120)
    verdict = check(scenario.database_url, ledger, tap)
    reliability.append(ReliabilityRow(
        f"SIGTERM during a 10,000-entry import (soft shutdown {SOFT_SHUTDOWN} s), then a restart", verdict.sent,
        verdict.copies, f"1 SIGTERM; the worker stopped in {stopped_in:.1f} s", verdict.lost, verdict.applied_twice,
        verdict.events_missing, done - cleared))
    tap.close()
    verdict.assert_holds()
    assert stopped_in < SOFT_SHUTDOWN + 10, f"the worker took {stopped_in:.1f}s to stop"
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        assert db.execute("SELECT count(*) FROM invoices WHERE tenant_id = %s", (tenant,)).fetchone()[0] == 10_000
    completed = [e for e in tap.events.values() if e["type"] == "import.completed"]
    assert len(completed) == 1 and completed[0]["data"]["counts"]["created"] == 10_000
