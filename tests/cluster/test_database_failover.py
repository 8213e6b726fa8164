"""Scenario 3: the PostgreSQL primary lost with its machine mid-stream. Patroni, PostgreSQL and the
etcd member of the primary's host are SIGKILLed at once, with one payment certainly mid-transaction
(its invoice's row held from outside). Patroni promotes the synchronous standby once the dead
primary's leader key expires (ttl 20 s); the workers and relays on w1 and w2, whose DATABASE_URL
lists both members with target_session_attrs=read-write, meet connection errors meanwhile (a
passing fault: Celery's back-off) and then find the new primary by themselves. A minute after the
kill the old primary's machine comes back and Patroni rejoins it as the synchronous standby
(pg_rewind). Nothing lost, nothing applied twice (a commit whose answer was lost in the failover is
on the standby, synchronous_mode, and its redelivery is a duplicate), no event missing, all applied
within 60 s of the kill."""

from __future__ import annotations

import time

from tests.cluster.pg import failover_database  # noqa: F401 - the fixture
from tests.cluster.traffic import GOAL_SECONDS, W1, W2, QuorumEventTap, invoices
from tests.faults.checker import Ledger, check, outcomes, wait_settled
from tests.faults.traffic import InvoiceHold, Stream, amounts, payment, send

# Retries with a short back-off that outlast a failover (about 20 s to the promote, plus the
# workers' reconnects): 40 retries at most 2 s apart.
PATIENT = {"TASK_MAX_RETRIES": "40", "TASK_RETRY_BACKOFF_MAX": "2"}


def test_database_primary_killed_standby_promoted_old_primary_rejoins(scenario, reliability,
                                                                       failover_database):  # noqa: F811
    cluster = failover_database.cluster
    url = failover_database.fresh()
    scenario.database_url = url
    scenario.env["DATABASE_URL"] = url  # the processes' environment (shared with scenario.processes)
    tap = QuorumEventTap(scenario.broker_url)
    for n, host in enumerate((W1, W2), 1):
        scenario.processes.on(host).worker(name=f"node-{n}@{host.name}", extra_env=PATIENT)
        scenario.processes.on(host).relay(extra_env=PATIENT)
    ledger, tenant = Ledger(), "t-db-failover"
    row = reliability.row("cluster: PostgreSQL primary SIGKILLed mid-stream (Patroni + postgres + etcd of its host), "
                          "standby promoted, old primary rejoins", url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, 20, held=True)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(600, seed=23))]
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies, per_second=30).start()
    stream.wait_sent(150)
    # A payment certainly in flight when the primary goes: running, its transaction open.
    held = payment(tenant, "F-HELD", "1.00")
    hold = InvoiceHold(url, tenant, "F-HELD")
    send(scenario.publisher(), ledger, "invoices.record_payment", held)
    hold.wait_blocked()
    old = cluster.leader()
    assert old is not None and cluster.synchronous() not in (None, old), "a primary with a synchronous standby"
    sent_before = stream.sent
    cluster.kill(old)
    fault = time.monotonic()
    hold.release()  # its connection went with the primary
    new = cluster.wait_leader(90, other_than=old)
    promoted = time.monotonic() - fault
    down_sent = stream.sent - sent_before
    row.faults = (f"SIGKILL of {old} (primary; Patroni, postgres, etcd) with 1 payment mid-transaction; "
                  f"{new} accepting writes {promoted:.1f} s after the kill ({down_sent} sent meanwhile)")
    stream.join(120)
    done = wait_settled(url, ledger, {}, timeout=max(5.0, fault + 90 - time.monotonic()), strict=False)
    time.sleep(max(0.0, fault + 60 - time.monotonic()))  # the machine stays away a minute
    back = time.monotonic()
    cluster.start_member(old)
    rejoined = _wait_standby(cluster, old, 180)
    row.faults += (f"; {old} back after 60 s, synchronous standby again {rejoined - back:.1f} s later"
                   if rejoined else f"; {old} not a synchronous standby within 180 s of its return")
    verdict = row.checked(check(url, ledger, tap), done and done - fault)
    verdict.assert_holds()
    assert outcomes(url)[(tenant, held["messageId"])] == "applied"
    assert down_sent >= 100, "the stream went on during the failover: those messages met it"
    assert done is not None and done - fault <= GOAL_SECONDS, f"all applied {done and done - fault} s after the kill"
    assert rejoined is not None, f"{old} did not rejoin as the synchronous standby"
    assert cluster.leader() == new, "the promoted standby stays the primary"


def _wait_standby(cluster, name: str, timeout: float) -> float | None:  # noqa: ANN001 - a PgCluster
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cluster.roles().get(name, {})
        if status.get("role") == "replica" and status.get("state") == "running" and cluster.synchronous() == name:
            return time.monotonic()
        time.sleep(0.5)
    return None
