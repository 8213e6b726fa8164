"""A worker host cut off (scenarios 4 and 5): its link down for 60 s while it works. The broker
notices by the AMQP heartbeat (BROKER_HEARTBEAT=10: two missed, ~20 s) and hands what the host held
to the other host; PostgreSQL's keepalives and idle-in-transaction timeout end its sessions and
free its locks; when the link comes back nothing it held may be applied twice, and the relay on
the other host must have kept the events flowing, none missing, every invoice's sequences gap-free."""

from __future__ import annotations

import time

import psycopg

from tests.cluster.traffic import GOAL_SECONDS, W1, W2, QuorumEventTap, held_by, invoices, wait_until
from tests.faults.checker import Ledger, check, conninfo, wait_settled
from tests.faults.traffic import InvoiceHold, Stream, amounts, payment, send
from worker.local import hosts

PARTITION_SECONDS = 60


def blocked_host(database_url: str, waited: float) -> hosts.Host | None:
    """The host whose session has waited on the held invoice's lock for over `waited` seconds
    (PostgreSQL sees the client's address)."""
    with psycopg.connect(conninfo(database_url), autocommit=True) as db:
        addresses = [str(a) for (a,) in db.execute(
            "SELECT client_addr FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND client_addr IS NOT NULL "
            "AND now() - query_start > make_interval(secs => %s)", (waited,))]
    for host in (W1, W2):
        if host.address in addresses:
            return host
    return None


def waiting_in_outbox(database_url: str) -> int:
    with psycopg.connect(conninfo(database_url), autocommit=True) as db:
        return db.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL AND parked_at IS NULL").fetchone()[0]


def test_worker_host_partitioned_for_60_seconds_while_its_pool_holds_a_batch(scenario, reliability):
    environment = scenario.environment
    tap = QuorumEventTap(scenario.broker_url)
    for n, host in enumerate((W1, W2), 1):
        scenario.processes.on(host).worker(name=f"node-{n}@{host.name}")
        scenario.processes.on(host).relay()
    ledger, tenant = Ledger(), "t-worker-partition"
    row = reliability.row("cluster: worker host partitioned 60 s while its pool holds a batch",
                          scenario.database_url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, 20, held=True)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(900, seed=24))]
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies, per_second=30).start()
    stream.wait_sent(150)
    # A payment of an invoice held from outside stops a pool process mid-transaction: that host
    # certainly holds a delivery when its link goes down (and its prefetched batch with it).
    hold = InvoiceHold(scenario.database_url, tenant, "F-HELD")
    send(scenario.publisher(), ledger, "invoices.record_payment", payment(tenant, "F-HELD", "1.00"))
    hold.wait_blocked()
    # A batch waits HELD_WAIT_MS (500 ms) for a held invoice, then sends its message round again
    # (acknowledged); the copy that comes back takes the ordinary path and waits LOCK_TIMEOUT_MS
    # (10 s) with its delivery unacknowledged. A session seen waiting over a second is that one:
    # the host is cut at once, well inside the wait, and what it held is counted after the cut
    # (frozen at the broker until the heartbeat ends its connection, ~20 s).
    victim, deadline = None, time.monotonic() + 30
    while victim is None and time.monotonic() < deadline:
        victim = blocked_host(scenario.database_url, 1.0)
        time.sleep(0 if victim else 0.2)
    assert victim is not None, "no worker host's session waits on the held invoice"
    victim.cut()
    fault = time.monotonic()
    held = held_by(environment, victim)
    hold.release()
    row.faults = (f"{victim.name} link down {PARTITION_SECONDS} s mid-stream, holding {held} unacknowledged "
                  "deliveries (1 mid-transaction); seconds counted from the cut")
    handed_back = wait_until(lambda: held_by(environment, victim) == 0, PARTITION_SECONDS - 5, interval=1)
    done = wait_settled(scenario.database_url, ledger, {}, timeout=max(1.0, fault + PARTITION_SECONDS - 2 - time.monotonic()),
                        strict=False)
    time.sleep(max(0.0, fault + PARTITION_SECONDS - time.monotonic()))
    victim.heal()
    stream.join(120)
    if done is None:  # not within the partition: still counted, from the cut
        done = wait_settled(scenario.database_url, ledger, {}, timeout=60, strict=False)
    time.sleep(10)  # the returning host's held batch: anything it would apply again, it does now
    verdict = row.checked(check(scenario.database_url, ledger, tap), done and done - fault)
    if handed_back:
        row.faults += f"; its deliveries handed back {handed_back - fault:.1f} s after the cut"
    verdict.assert_holds()
    assert held > 0
    assert handed_back is not None, "the broker did not hand back what the cut host held"
    assert done is not None and done - fault <= GOAL_SECONDS, f"all applied {done and done - fault} s after the cut"


def test_one_of_two_relays_partitioned_events_keep_flowing(scenario, reliability):
    """Relays on w1 and w2, the workers on w2; w1 is cut off for 60 s mid-stream. The rows its
    relay had locked are freed when PostgreSQL ends its session; the relay on w2 publishes them
    and everything after (FOR UPDATE SKIP LOCKED)."""
    tap = QuorumEventTap(scenario.broker_url)
    scenario.processes.on(W2).worker(name="node-1@w2", concurrency=2)
    scenario.processes.on(W2).worker(name="node-2@w2", concurrency=2)
    for host in (W1, W2):
        scenario.processes.on(host).relay()
    ledger, tenant = Ledger(), "t-relay-partition"
    row = reliability.row("cluster: one of two relays' hosts partitioned 60 s mid-stream",
                          scenario.database_url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, 20)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(900, seed=25))]
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies, per_second=30).start()
    stream.wait_sent(150)
    tap.drain(lambda: False, 1)
    W1.cut()
    fault = time.monotonic()
    before = tap.received
    row.faults = f"w1 (a relay's host) link down {PARTITION_SECONDS} s mid-stream; seconds counted from the cut"
    stream.join(120)
    done = wait_settled(scenario.database_url, ledger, {}, timeout=max(1.0, fault + PARTITION_SECONDS - 5 - time.monotonic()),
                        strict=False)
    # Events keep flowing while w1 is away: received by the tap during the partition, and nothing
    # committed left unpublished in the outbox when it ends (the rows w1's relay had locked too).
    tap.drain(lambda: False, max(0.0, fault + PARTITION_SECONDS - 3 - time.monotonic()))
    flowing = tap.received - before
    unpublished = waiting_in_outbox(scenario.database_url)
    time.sleep(max(0.0, fault + PARTITION_SECONDS - time.monotonic()))
    W1.heal()
    if done is None:
        done = wait_settled(scenario.database_url, ledger, {}, timeout=60, strict=False)
    verdict = row.checked(check(scenario.database_url, ledger, tap), done and done - fault)
    row.faults += f"; {flowing} events received during the partition, {unpublished} left unpublished at its end"
    verdict.assert_holds()
    assert flowing > 0, "no event was published while w1 was cut off"
    assert unpublished == 0, f"{unpublished} committed events still unpublished when w1 came back"
    assert done is not None and done - fault <= GOAL_SECONDS, f"all applied {done and done - fault} s after the cut"
