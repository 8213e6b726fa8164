"""The broker goes away mid-stream: SIGKILLed and restarted on the same port, or its connections
cut by a proxy while it keeps running. Nothing may wait for the visibility timeout (an hour here)."""

from __future__ import annotations

import time

from tests.faults.checker import EventTap, Ledger, check, wait_settled
from tests.faults.conftest import TcpCut
from tests.faults.traffic import InvoiceHold, Stream, amounts, order, payment, send

# The visibility timeout cannot hand anything back within a scenario: what comes back, the worker brought back.
HOUR = {"BROKER_VISIBILITY_TIMEOUT": "3600"}


def invoices(scenario, ledger: Ledger, tenant: str, count: int) -> list[str]:
    """`count` issued invoices of 1000.00 (F-00000, …), and one more, F-HELD, for InvoiceHold."""
    publisher = scenario.publisher()
    numbers = [f"F-{i:05d}" for i in range(count)]
    for number in [*numbers, "F-HELD"]:
        send(publisher, ledger, "invoices.order_shipped", order(tenant, number))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    return numbers


def test_broker_killed_and_restarted_mid_stream(scenario, reliability):
    tap = EventTap(scenario.broker_url)
    scenario.processes.worker(extra_env=HOUR)
    scenario.processes.relay(extra_env=HOUR)
    ledger, tenant = Ledger(), "t-broker-kill"
    row = reliability.row("broker SIGKILLed, restarted 3 s later on the same port", scenario.database_url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, 20)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(400))]
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies, per_second=60).start()
    stream.wait_sent(150)
    hold = InvoiceHold(scenario.database_url, tenant, "F-HELD")
    send(scenario.publisher(), ledger, "invoices.record_payment", payment(tenant, "F-HELD", "1.00"))
    hold.wait_blocked()
    scenario.environment.broker.kill()
    row.faults = "1 broker kill mid-stream, 1 payment held mid-transaction"
    time.sleep(3)  # the fault itself: the broker stays away 3 s
    scenario.environment.broker.start()
    hold.release()
    cleared = time.monotonic()
    stream.join()
    done = wait_settled(scenario.database_url, ledger, {}, timeout=90, strict=False)
    row.checked(check(scenario.database_url, ledger, tap), done and done - cleared).assert_holds()


def test_broker_connections_cut_for_ten_seconds(scenario, reliability):
    """The broker keeps running; the worker's connections through a proxy are cut and new ones refused
    for 10 s. The worker must resume consuming by itself (Celery #8030, #8384, #10205)."""
    tap = EventTap(scenario.broker_url)
    proxy = TcpCut(scenario.environment.broker.port)
    proxy.up()
    behind = {**HOUR, "BROKER_URL": scenario.environment.broker.url_via(proxy.port)}
    worker = scenario.processes.worker(extra_env=behind)
    scenario.processes.relay(extra_env=HOUR)
    ledger, tenant = Ledger(), "t-broker-cut"
    row = reliability.row("broker connections cut 10 s by a proxy (broker running)", scenario.database_url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, 20)
    bodies = [payment(tenant, numbers[i % 20], a) for i, a in enumerate(amounts(300, seed=11))]
    Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies[:100], per_second=40).start().join()
    wait_settled(scenario.database_url, ledger, {}, timeout=60)  # nothing in flight but the held one (docs/brokers.md)
    hold = InvoiceHold(scenario.database_url, tenant, "F-HELD")
    send(scenario.publisher(), ledger, "invoices.record_payment", payment(tenant, "F-HELD", "1.00"))
    hold.wait_blocked()
    proxy.cut()
    # Published while the worker is cut off, from the moment of the cut (straight to the broker, as
    # upstream services do). With kombu's BRPOP a read answered in that instant lost its message;
    # a read here registers what it takes before it answers (tests/faults/test_lost_read.py).
    row.faults = "1 cut of every worker connection, 1 payment held mid-transaction"
    stream = Stream(scenario.publisher(), ledger, "invoices.record_payment", bodies[100:], per_second=40).start()
    time.sleep(10)  # the fault itself: the worker is cut off 10 s
    proxy.up()
    hold.release()
    cleared = time.monotonic()
    stream.join()
    try:
        done = wait_settled(scenario.database_url, ledger, {}, timeout=30, strict=False)
        verdict = row.checked(check(scenario.database_url, ledger, tap), done and done - cleared)
    finally:
        proxy.cut()
    assert worker.poll() is None
    verdict.assert_holds()
