"""Two worker nodes (as on two hosts), two relays and two beats; pool processes SIGKILLed at
random while 6,000 payments arrive, 30% of them sent twice. A kill counts only when its victim was
mid-task (a transaction open: conftest.kill_pool_process). The kills are spread over the stream by
its progress, one each time another ninth of the way to nine tenths of the outcomes is reached,
not by the clock: a worker that got faster went through the whole stream between four kills.
They stop at nine tenths, so that the final wait is for the worker to finish, not for a kill."""

from __future__ import annotations

import random
import threading
import time

from tests.faults.checker import EventTap, Ledger, check, outcomes, wait_settled
from tests.faults.conftest import kill_pool_process
from tests.faults.test_broker import invoices
from tests.faults.traffic import Stream, amounts, payment

PAYMENTS = 6_000
INVOICES = 100
KILLS = 8


def test_two_nodes_random_kills_and_duplicates(scenario, reliability, tmp_path):
    tap = EventTap(scenario.broker_url)
    beats = {"PAYMENT_RETRY_SCAN_SECONDS": "1"}
    nodes = [scenario.processes.worker(name=f"node-{n}@host-{n}") for n in (1, 2)]
    for n in (1, 2):
        scenario.processes.relay()
        scenario.processes.beat(tmp_path / f"beat-{n}", extra_env=beats)
    ledger, tenant = Ledger(), "t-nodes"
    row = reliability.row("two worker nodes, two relays, two beats; 6,000 payments, 30% sent twice",
                          scenario.database_url, ledger, tap)
    numbers = invoices(scenario, ledger, tenant, INVOICES)
    rng = random.Random(13)
    bodies = [payment(tenant, numbers[i % INVOICES], a) for i, a in enumerate(amounts(PAYMENTS, seed=13))]
    # 30% sent again, somewhere later in the stream, as a publisher that retried would.
    positioned = [(float(i), body) for i, body in enumerate(bodies)]
    positioned += [(rng.uniform(i + 1, PAYMENTS + 1), bodies[i]) for i in rng.sample(range(PAYMENTS), PAYMENTS * 3 // 10)]
    stream = [body for _, body in sorted(positioned, key=lambda pair: pair[0])]
    kills, stop = [], threading.Event()
    done = len(ledger.messages) + PAYMENTS  # the invoices' outcomes, then one per payment's messageId

    def kill_at_random() -> None:
        for milestone in range(1, KILLS + 1):
            while len(outcomes(scenario.database_url)) < 0.9 * done * milestone / (KILLS + 1):
                if stop.wait(0.1):
                    return
            while not stop.wait(rng.uniform(0.01, 0.05)):  # until a victim is caught mid-task
                pid = kill_pool_process(rng.choice(nodes).pid, lambda children: rng.choice(children),
                                        scenario.database_url)
                if pid:
                    kills.append(pid)
                    break

    killer = threading.Thread(target=kill_at_random, daemon=True)
    killer.start()
    try:
        Stream(scenario.publisher(), ledger, "invoices.record_payment", stream, per_second=2000).start().join(300)
        # the kills go on while the nodes work through the stream, and stop before its last tenth
        deadline = time.monotonic() + 300
        while len(outcomes(scenario.database_url)) < 0.9 * done and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        killer.join(10)
        row.faults = f"{len(kills)} pool processes SIGKILLed mid-task at random"
    wait_settled(scenario.database_url, ledger, {}, timeout=400, strict=False)
    row.checked(check(scenario.database_url, ledger, tap, event_timeout=120)).assert_holds()
    assert len(kills) >= 5 and all(node.poll() is None for node in nodes)
