"""Micro-batching (worker/delivery/batching.py) at its COMMIT, the faults injected from the database
side: a deferred constraint trigger on the inbox runs inside the batch's COMMIT (after every
statement, before the commit is durable), armed by a sequence, which no rollback resets, for the
first commit only. It either sleeps there, so that the test can freeze the worker while the COMMIT
completes and kill the pool process the instant the batch is visible from outside, or raises a
serialization failure, or sleeps while the test terminates the backend.

- killed after COMMIT, before the acknowledgement: the batch committed and every message is still
  unacknowledged (on Redis, read from the broker's `unacked` hash while the worker is frozen); the
  pool process dies; every message comes back and the inbox turns each redelivery into a
  duplicate: nothing applied twice.
- COMMIT fails (serialization failure): the batch runs again whole and commits once.
- backend terminated during COMMIT: nothing committed; every message is handed back and applied once.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import psycopg

from tests.conftest import wait_for
from tests.faults.checker import EventTap, Ledger, check, conninfo, held_by_redis, outcomes, wait_settled
from tests.faults.test_broker import invoices
from tests.faults.traffic import amounts, payment, send
from worker.brokers.topology import queue_for

BATCH = 30
SLEEP_AT_COMMIT = 4  # seconds the armed COMMIT sleeps: the test acts meanwhile

TRIGGER = """
CREATE SEQUENCE fault_commits;
CREATE TABLE fault_at_commit (mode text NOT NULL);
CREATE FUNCTION fault_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  armed text;
BEGIN
  IF current_setting('fault.seen', true) = 'yes' THEN RETURN NULL; END IF;
  PERFORM set_config('fault.seen', 'yes', true);
  SELECT mode INTO armed FROM fault_at_commit;
  IF armed IS NULL OR nextval('fault_commits') > 1 THEN RETURN NULL; END IF;
  IF armed = 'serialization' THEN
    RAISE EXCEPTION 'serialization failure at COMMIT (fault scenario)' USING ERRCODE = 'serialization_failure';
  END IF;
  PERFORM pg_sleep(%(sleep)s);
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER fault_at_commit AFTER INSERT ON inbox DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION fault_at_commit();
""" % {"sleep": SLEEP_AT_COMMIT}


def batch_in_waiting(scenario, ledger: Ledger, tenant: str, mode: str) -> tuple[list[dict], list[str]]:
    """Invoices made by a worker that then stops; BATCH payments queued for the next one; the
    COMMIT fault armed. The payments, and the invoice numbers."""
    first = scenario.processes.worker()
    numbers = invoices(scenario, ledger, tenant, 5)
    scenario.processes.stop(first)
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        db.execute(TRIGGER)
        db.execute("INSERT INTO fault_at_commit VALUES (%s)", (mode,))
    bodies = [payment(tenant, numbers[i % 5], a) for i, a in enumerate(amounts(BATCH, seed=23))]
    for body in bodies:
        send(scenario.publisher(), ledger, "invoices.record_payment", body)
    return bodies, numbers


def batch_worker(scenario):
    """One pool process that takes the queued payments as one batch."""
    return scenario.processes.worker(concurrency=1, extra_env={
        "APPLY_BATCH_SIZE": str(BATCH), "APPLY_BATCH_WAIT_MS": "1000", "BROKER_VISIBILITY_TIMEOUT": "3600"})


def commit_sleeping(database_url: str) -> int | None:
    """The backend whose COMMIT sleeps in the armed trigger."""
    with psycopg.connect(conninfo(database_url), autocommit=True) as db:
        row = db.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND datname = current_database()"
                         ).fetchone()
    return row[0] if row else None


def inbox_rows(database_url: str, tenant: str, ids: list[str]) -> dict[str, object]:
    with psycopg.connect(conninfo(database_url)) as db:
        return dict(db.execute("SELECT message_id, processed_at FROM inbox WHERE tenant_id = %s AND message_id = ANY(%s)",
                               (tenant, ids)).fetchall())


def redeliveries(database_url: str) -> int:
    """Starts counted for redelivered payments (worker/delivery/deliveries.py counts only those)."""
    with psycopg.connect(conninfo(database_url)) as db:
        return db.execute("SELECT count(*) FROM delivery_counts WHERE task = 'invoices.record_payment'").fetchone()[0]


def test_a_pool_process_killed_the_instant_its_batch_commit_is_visible(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    ledger, tenant = Ledger(), "t-batch-commit"
    row = reliability.row(f"batch of {BATCH}: pool process SIGKILLed the instant its COMMIT is visible, before the "
                          "acknowledgement", scenario.database_url, ledger, tap)
    scenario.processes.relay()
    bodies, _ = batch_in_waiting(scenario, ledger, tenant, "sleep")
    ids = [b["messageId"] for b in bodies]
    worker = batch_worker(scenario)
    main = psutil.Process(worker.pid)
    [pool] = main.children()
    wait_for(lambda: commit_sleeping(scenario.database_url), 60, what="the batch's COMMIT in the armed trigger")
    for process in (main, pool):  # frozen: the main process cannot acknowledge, the pool process cannot report
        os.kill(process.pid, signal.SIGSTOP)
    try:
        committed = wait_for(lambda: len(inbox_rows(scenario.database_url, tenant, ids)) == BATCH and
                             inbox_rows(scenario.database_url, tenant, ids), SLEEP_AT_COMMIT + 30,
                             what="the batch's commit to be visible")
        unacked = scenario.environment.broker.unacknowledged(queue_for("invoices.record_payment"))
        held = held_by_redis(scenario.broker_url, set(ids))  # {} on RabbitMQ
        os.kill(pool.pid, signal.SIGKILL)
    finally:
        os.kill(main.pid, signal.SIGCONT)
    row.faults = f"1 pool process SIGKILLed after its COMMIT, {unacked} of {BATCH} messages unacknowledged then"
    cleared = time.monotonic()
    wait_for(lambda: redeliveries(scenario.database_url) >= BATCH, 90, what="every message of the batch to come back")
    done = wait_settled(scenario.database_url, ledger, {}, timeout=30, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - cleared).assert_holds()
    assert unacked == BATCH, "the batch was acknowledged before the kill: nothing was shown"
    if scenario.broker_url.startswith("redis"):
        assert held == {m: "hash unacked" for m in ids}, held
    assert inbox_rows(scenario.database_url, tenant, ids) == committed  # each redelivery a duplicate, nothing rewritten
    assert all(outcomes(scenario.database_url)[(tenant, m)] == "applied" for m in ids)
    assert "lost with its pool process" in worker.log.read_text()


def test_a_batch_whose_commit_fails_with_a_serialization_failure_commits_once(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    ledger, tenant = Ledger(), "t-batch-40001"
    row = reliability.row(f"batch of {BATCH}: COMMIT fails with a serialization failure", scenario.database_url,
                          ledger, tap)
    row.faults = "1 COMMIT failed (SQLSTATE 40001)"
    scenario.processes.relay()
    batch_in_waiting(scenario, ledger, tenant, "serialization")
    worker = batch_worker(scenario)
    started = time.monotonic()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=60, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - started).assert_holds()
    assert "met conflict 40001" in worker.log.read_text()
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        assert db.execute("SELECT last_value FROM fault_commits").fetchone()[0] >= 2  # the fault fired, then a commit


def test_a_batch_whose_backend_is_terminated_during_commit_is_handed_back(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    ledger, tenant = Ledger(), "t-batch-terminated"
    row = reliability.row(f"batch of {BATCH}: its backend terminated during COMMIT", scenario.database_url, ledger, tap)
    scenario.processes.relay()
    bodies, _ = batch_in_waiting(scenario, ledger, tenant, "sleep")
    worker = batch_worker(scenario)
    pid = wait_for(lambda: commit_sleeping(scenario.database_url), 60, what="the batch's COMMIT in the armed trigger")
    with psycopg.connect(conninfo(scenario.database_url), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
        (terminated_at,) = admin.execute("SELECT clock_timestamp()").fetchone()
    row.faults = "1 backend terminated mid-COMMIT"
    cleared = time.monotonic()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=90, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - cleared).assert_holds()
    # nothing of the terminated batch committed: every payment's outcome is of a later transaction
    stamps = inbox_rows(scenario.database_url, tenant, [b["messageId"] for b in bodies])
    assert len(stamps) == BATCH and all(stamp > terminated_at for stamp in stamps.values())
    assert "could not be applied" in worker.log.read_text()
