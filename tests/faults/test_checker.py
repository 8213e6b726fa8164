"""The checker itself (tests/faults/checker.py): each of its columns can count. One scenario, one
fault per column, each on an invoice of its own, done from outside the worker:

- lost: a payment deleted from the broker before any worker took it;
- applied twice: a payment applied a second time behind the worker's back (a second payment row,
  the amount added again, a second payment.recorded event with its causationId, as a worker without
  its inbox would have written them);
- events missing: the outbox row of a payment's payment.recorded deleted before the relay took it;
- wrong outcome: a payment for an invoice that never exists, sent expecting it applied.

Each column counts exactly 1, and the checker names the message behind it.
"""

from __future__ import annotations

import uuid

import psycopg

from tests.conftest import wait_for
from tests.faults.checker import EventTap, Ledger, check, conninfo, outcomes
from tests.faults.traffic import order, payment, send


def take_off_the_broker(broker_url: str, task: str) -> dict:
    """Take the one message waiting on `task`'s queue off the broker (acknowledged: gone); its body."""
    from kombu import Connection, Queue

    from worker.brokers.topology import is_amqp, queue_for

    transport = None
    if not is_amqp(broker_url):
        from worker.brokers.redis_transport import TRANSPORT as transport
    with Connection(broker_url, transport=transport) as conn:
        queue = Queue(queue_for(task), no_declare=True)(conn.default_channel)
        message = wait_for(lambda: queue.get(accept=["json"]), 30, what=f"the message on {queue_for(task)}")
        message.ack()
        args, _kwargs, _embed = message.decode()
        return args[0]


def apply_again_behind_the_worker(database_url: str, tenant: str, message_id: str) -> None:
    """What applying a payment a second time writes, copied from its first application: a payment
    row, the amount, and its payment.recorded event under the invoice's next sequence."""
    with psycopg.connect(conninfo(database_url)) as db:
        columns = [c for (c,) in db.execute("SELECT column_name FROM information_schema.columns "
                                            "WHERE table_name = 'payments' AND column_name NOT IN ('id', 'payment_id')")]
        invoice_id, sequence, event_id, amount = db.execute(
            "SELECT o.invoice_id, o.sequence, o.event_id, p.amount FROM outbox o "
            "JOIN payments p ON p.invoice_id = o.invoice_id AND p.payment_id::text = o.payload->'data'->>'paymentId' "
            "WHERE o.tenant_id = %s AND o.causation_id = %s AND o.type = 'payment.recorded'",
            (tenant, message_id)).fetchone()
        names = ", ".join(columns)
        db.execute(f"INSERT INTO payments (id, payment_id, {names}) SELECT gen_random_uuid(), gen_random_uuid(), "
                   f"{names} FROM payments WHERE invoice_id = %s AND payment_id::text = "
                   "(SELECT payload->'data'->>'paymentId' FROM outbox WHERE event_id = %s)", (invoice_id, event_id))
        (next_sequence,) = db.execute("UPDATE invoices SET amount_paid = amount_paid + %s, "
                                      "event_sequence = event_sequence + 1 WHERE id = %s RETURNING event_sequence",
                                      (amount, invoice_id)).fetchone()
        outbox = [c for (c,) in db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                           "'outbox' AND column_name NOT IN ('id', 'event_id', 'sequence', 'payload', "
                                           "'published_at', 'created_at')")]
        names = ", ".join(outbox)
        new_event = str(uuid.uuid4())
        db.execute(f"INSERT INTO outbox (event_id, sequence, payload, {names}) SELECT %s, %s, "
                   "jsonb_set(jsonb_set(payload::jsonb, '{eventId}', to_jsonb(%s::text)), '{sequence}', to_jsonb(%s::int))"
                   f", {names} FROM outbox WHERE event_id = %s",
                   (new_event, next_sequence, new_event, next_sequence, event_id))


def test_each_column_of_the_checker_counts_one(scenario):
    tap = EventTap(scenario.broker_url)
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-checker"
    try:
        # lost: sent while no worker runs, and taken off the broker.
        lost = payment(tenant, "K-LOST", "1.00")
        send(publisher, ledger, "invoices.record_payment", lost)
        assert take_off_the_broker(scenario.broker_url, "invoices.record_payment")["messageId"] == lost["messageId"]

        scenario.processes.worker(extra_env={"INVOICE_WAIT_SECONDS": "1"})  # no relay yet
        for number in ("K-LOST", "K-TWICE", "K-MISSING"):
            send(publisher, ledger, "invoices.order_shipped", order(tenant, number))
        wait_for(lambda: len(outcomes(scenario.database_url)) == 3, 60, what="the three invoices")
        twice = payment(tenant, "K-TWICE", "2.00")
        unannounced = payment(tenant, "K-MISSING", "3.00")
        wrong = payment(tenant, "K-NEVER", "4.00")  # expected applied: the invoice never comes
        others = [payment(tenant, number, "5.00") for number in ("K-LOST", "K-TWICE", "K-MISSING")]
        for body in (twice, unannounced, wrong, *others):
            send(publisher, ledger, "invoices.record_payment", body)
        wait_for(lambda: len(outcomes(scenario.database_url)) == 9, 60, what="every payment but the lost one")

        apply_again_behind_the_worker(scenario.database_url, tenant, twice["messageId"])
        with psycopg.connect(conninfo(scenario.database_url)) as db:
            deleted = db.execute("DELETE FROM outbox WHERE causation_id = %s AND type = 'payment.recorded' "
                                 "AND published_at IS NULL", (unannounced["messageId"],)).rowcount
        assert deleted == 1
        scenario.processes.relay()

        verdict = check(scenario.database_url, ledger, tap, event_timeout=30)
    finally:
        tap.close()
    assert (verdict.lost, verdict.wrong_outcome, verdict.applied_twice, verdict.events_missing) == (1, 1, 1, 1), \
        "\n".join(verdict.problems)
    text = "\n".join(verdict.problems)
    assert f"lost: invoices.record_payment {lost['messageId']}" in text
    assert f"wrong outcome: invoices.record_payment {wrong['messageId']} is rejected invoice-not-found" in text
    assert f"applied twice: invoices.record_payment {twice['messageId']} caused payment.recorded x2" in text
    assert f"events missing: invoices.record_payment {unannounced['messageId']} applied without its payment.recorded" \
        in text
    assert verdict.effects == ["payments", "amounts", "invoices", "events", "sequences"]


def test_a_run_without_faults_counts_nothing(scenario):
    """The same traffic, nothing done behind the worker's back: every column 0, no problem."""
    tap = EventTap(scenario.broker_url)
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-checker-clean"
    try:
        scenario.processes.worker()
        scenario.processes.relay()
        for number in ("K-1", "K-2"):
            send(publisher, ledger, "invoices.order_shipped", order(tenant, number))
        wait_for(lambda: len(outcomes(scenario.database_url)) == 2, 60, what="the invoices")
        for number, amount in (("K-1", "1.00"), ("K-1", "2.50"), ("K-2", "3.00")):
            send(publisher, ledger, "invoices.record_payment", payment(tenant, number, amount))
        wait_for(lambda: len(outcomes(scenario.database_url)) == 5, 60, what="the payments")
        verdict = check(scenario.database_url, ledger, tap, event_timeout=30)
    finally:
        tap.close()
    assert verdict.counts() == (0, 0, 0, 0) and not verdict.problems, verdict.problems


def test_a_scenario_that_fails_still_writes_its_row_with_what_it_counted(scenario, tmp_path):
    """A payment no worker ever takes: the scenario times out. Its row is written FAILED with the
    loss counted, and the rows of scenarios not run this time stay in the section."""
    from tests.faults.reliability import HEADER, RULE, Reliability, write_reliability

    recorder, ledger, tenant = Reliability(), Ledger(), "t-checker-failed"
    row = recorder.row("a payment no worker takes", scenario.database_url, ledger, EventTap(scenario.broker_url))
    row.faults = "no worker"
    send(scenario.publisher(), ledger, "invoices.record_payment", payment(tenant, "K-1", "1.00"))
    (finished,) = recorder.finish("AssertionError: 1 of 1 messages have no outcome after 5s")
    assert finished.verdict is not None and finished.verdict.counts() == (1, 0, 0, 0)
    assert finished.result == "FAILED: AssertionError: 1 of 1 messages have no outcome after 5s"

    path = tmp_path / "RELIABILITY.md"
    earlier = "| a scenario not run this time | passed | 3 (3) | 1 kill | 0 | 0 | 0 | 0 | payments | 1.0 s |"
    path.write_text(f"# Reliability\n\n## Redis (Valkey)\n\nRun on then.\n\n{HEADER}\n{RULE}\n{earlier}\n\n"
                    "## RabbitMQ 3.10\n\nkept whole\n")
    write_reliability(path, [finished], "Redis (Valkey)")
    text = path.read_text()
    assert ("| a payment no worker takes | FAILED: AssertionError: 1 of 1 messages have no outcome after 5s | 1 (1) "
            "| no worker | 1 | 0 | 0 | 0 | payments, amounts | n/a |") in text
    assert earlier.replace("| passed |", "| passed (earlier run) |") in text and "1 rows kept from an earlier run" in text
    assert "## RabbitMQ 3.10\n\nkept whole" in text
