"""The batch rules of micro-batching (worker/delivery/batching.py), through a real broker and real worker
processes. Each test queues its messages before its worker starts, so that they reach the worker
together and form one batch; that they did is read from PostgreSQL: the inbox records of one
transaction share its start time (`now()`)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from decimal import Decimal
from typing import Any, Iterator

import psutil
import psycopg
import pytest
from sqlalchemy import delete, select

from tests.conftest import (
    Processes,
    _flush_broker_database,
    dead_letters_of,
    invoice_json,
    new_tenant,
    outcome_of,
    own_broker_url,
    publisher_app,
    send,
    wait_for,
    wait_outcome,
)
from tests.end_to_end.test_delivery import (
    database_conninfo,
    events_of,
    issued_invoice,
    payment,
    waiting_on_locks,
)
from worker.config import settings
from worker.storage import db
from worker.storage.records import DeliveryCount, InboxMessage


class BatchWorker:
    """Messages queued first, then one worker (one pool process) that takes them as one batch."""

    def __init__(self, processes: Processes, broker: str) -> None:
        self.processes = processes
        self.url = own_broker_url(broker)
        _flush_broker_database(self.url)
        self.publisher = publisher_app(self.url)
        self.proc: Any = None
        self.sent: list[dict[str, Any]] = []
        self.delivery_ids: dict[str, str] = {}

    def send(self, task: str, body: dict[str, Any]) -> dict[str, Any]:
        from worker.brokers.topology import queue_for

        self.delivery_ids[body["messageId"]] = self.publisher.send_task(task, args=[body], queue=queue_for(task)).id
        self.sent.append(body)
        return body

    def key(self, body: dict[str, Any]) -> str:
        """The key the worker counts this message's starts under (task id and body)."""
        from worker.delivery.deliveries import delivery_key

        return delivery_key(self.delivery_ids[body["messageId"]], body)

    def start(self, **env: str) -> None:
        """The batch is as large as what was sent (and waits long enough to gather all of it)."""
        self.name = f"batch-{uuid.uuid4().hex[:6]}@localhost"
        self.proc = self.processes.worker(concurrency=1, name=self.name, extra_env={
            "BROKER_URL": self.url, "APPLY_BATCH_SIZE": str(len(self.sent)), "APPLY_BATCH_WAIT_MS": "1000", **env})

    @property
    def log(self) -> str:
        return self.proc.log.read_text()

    def close(self) -> None:
        self.publisher.close()
        if self.proc is not None:
            self.processes.stop(self.proc)
        _flush_broker_database(self.url)


@pytest.fixture
def batch_worker(processes: Processes, database: str, broker: str) -> Iterator[BatchWorker]:
    worker = BatchWorker(processes, broker)
    try:
        yield worker
    finally:
        worker.close()


def transactions_of(tenant: str, message_ids: list[str]) -> int:
    """How many transactions recorded these messages' outcomes (their inbox rows' now())."""
    with db.sessions()() as s:
        stamps = s.scalars(select(InboxMessage.processed_at).where(
            InboxMessage.tenant_id == tenant, InboxMessage.message_id.in_(message_ids))).all()
    assert len(stamps) == len(set(message_ids))
    return len(set(stamps))


def hold_claim(blocker: Any, tenant: str, message_id: str) -> None:
    """Claim a messageId in a transaction left open, as a copy of the message in flight elsewhere:
    a batch that claims it waits there, mid-transaction, with every message it holds. (A held
    invoice no longer makes a batch wait: it skips the invoice, see the held-invoice test.)"""
    blocker.execute("INSERT INTO inbox (tenant_id, message_id, task, outcome) VALUES (%s, %s, %s, 'applied')",
                    (tenant, message_id, "invoices.record_payment"))


def command(task_tenant: str, number: str, **fields: Any) -> dict[str, Any]:
    return {"messageId": f"cmd-{uuid.uuid4()}", "tenantId": task_tenant, "invoiceNumber": number,
            "occurredAt": "2026-11-24T10:15:02Z", **fields}


def test_a_batch_is_one_transaction_and_a_bad_message_costs_only_itself(running, batch_worker):
    tenant = new_tenant("t-batch")
    invoice = issued_invoice(tenant)
    number = invoice["invoiceNumber"]
    first = batch_worker.send("invoices.record_payment", payment(tenant, number, "10.00"))
    malformed = batch_worker.send("invoices.record_payment", payment(tenant, number, "ten dollars"))
    refund = batch_worker.send("invoices.refund_payment", command(
        tenant, number, paymentId=str(uuid.uuid4()), amount="1.00", referenceNumber="R-1", reason="test"))
    batch_worker.send("invoices.record_payment", dict(first))  # a copy: the same messageId, in the same batch
    second = batch_worker.send("invoices.record_payment", payment(tenant, number, "5.00"))
    batch_worker.start()

    assert wait_outcome(tenant, second["messageId"])["outcome"] == "applied"
    assert outcome_of(tenant, first["messageId"])["outcome"] == "applied"
    rejected = outcome_of(tenant, refund["messageId"])
    assert (rejected["outcome"], rejected["reason"]) == ("rejected", "payment-not-found")
    [letter] = wait_for(lambda: dead_letters_of(malformed["messageId"]), 10, what="the dead letter")
    assert letter["reason"] == "malformed" and letter["body"] == malformed
    # One transaction held the two payments and the rejection.
    assert transactions_of(tenant, [first["messageId"], second["messageId"], refund["messageId"]]) == 1
    after = invoice_json(tenant, number)
    assert after["amountPaid"] == "15.00" and len(after["payments"]) == 2  # the copy applied nothing
    events = events_of(invoice["id"])
    sequences = [e["sequence"] for e in events if e["type"] != "command.rejected"]  # a rejection changes nothing
    assert sequences == list(range(1, len(sequences) + 1))
    assert [e["data"]["reason"] for e in events if e["type"] == "command.rejected"] == ["payment-not-found"]
    recorded = [e for e in events if e["type"] == "payment.recorded"]
    assert [e["causationId"] for e in recorded] == [first["messageId"], second["messageId"]]  # arrival order
    assert batch_worker.log.count("'outcome': 'duplicate'") == 1  # the copy, a duplicate of its batch-mate
    assert "(batched)" in batch_worker.log


def test_messages_for_one_invoice_apply_in_arrival_order_and_an_early_one_waits_alone(running, batch_worker):
    tenant = new_tenant("t-order")
    a, b = issued_invoice(tenant), issued_invoice(tenant)
    in_order, reversed_ = str(uuid.uuid4()), str(uuid.uuid4())
    hosted = {"amount": "20.00", "currency": "USD", "paymentProfileId": "card-1"}
    start_a = batch_worker.send("invoices.start_hosted_payment",
                                command(tenant, a["invoiceNumber"], paymentId=in_order, **hosted))
    complete_a = batch_worker.send("invoices.complete_hosted_payment",
                                   command(tenant, a["invoiceNumber"], paymentId=in_order))
    # On b the completion comes first: its payment is not known yet, so it leaves the batch and is
    # retried alone until the start (later in the same batch) has been applied.
    complete_b = batch_worker.send("invoices.complete_hosted_payment",
                                   command(tenant, b["invoiceNumber"], paymentId=reversed_))
    start_b = batch_worker.send("invoices.start_hosted_payment",
                                command(tenant, b["invoiceNumber"], paymentId=reversed_, **hosted))
    batch_worker.start()

    assert wait_outcome(tenant, complete_b["messageId"], timeout=60)["outcome"] == "applied"
    for body in (start_a, complete_a, start_b):
        assert outcome_of(tenant, body["messageId"])["outcome"] == "applied"
    assert transactions_of(tenant, [start_a["messageId"], complete_a["messageId"], start_b["messageId"]]) == 1
    for invoice in (a, b):
        after = invoice_json(tenant, invoice["invoiceNumber"])
        assert after["amountPaid"] == "20.00"
        assert [p["status"] for p in after["payments"]] == ["Completed"]
    types_a = [e["type"] for e in events_of(a["id"])]
    assert types_a.index("payment.recorded") > 0 and types_a.count("payment.recorded") == 1


def test_a_pool_process_killed_mid_batch_hands_every_message_back_and_each_applies_once(running, batch_worker):
    tenant = new_tenant("t-bkill")
    held, free = issued_invoice(tenant), issued_invoice(tenant)
    bodies = [batch_worker.send("invoices.record_payment",
                                payment(tenant, (held if i % 2 else free)["invoiceNumber"], f"{i + 1}.00"))
              for i in range(20)]
    with psycopg.connect(database_conninfo()) as blocker:
        # The batch claims its messages first: it stops there, mid-transaction, with all 20 messages.
        hold_claim(blocker, tenant, bodies[1]["messageId"])
        batch_worker.start()
        wait_for(lambda: waiting_on_locks() >= 1, 20, what="the batch to block on the claim")
        [pool] = psutil.Process(batch_worker.proc.pid).children(recursive=True)
        pool.kill()
        pool.wait(10)
        blocker.rollback()
    for body in bodies:
        assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
    for invoice, parity in ((free, 0), (held, 1)):
        after = invoice_json(tenant, invoice["invoiceNumber"])
        expected = sum(Decimal(i + 1) for i in range(20) if i % 2 == parity)
        assert Decimal(after["amountPaid"]) == expected and len(after["payments"]) == 10
        events = events_of(invoice["id"])
        assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert "lost with its pool process" in batch_worker.log


def test_a_batch_whose_database_connection_is_cut_is_retried_whole_and_loses_nothing(running, batch_worker):
    tenant = new_tenant("t-bcut")
    invoice = issued_invoice(tenant)
    bodies = [batch_worker.send("invoices.record_payment", payment(tenant, invoice["invoiceNumber"], "1.25"))
              for _ in range(12)]
    with psycopg.connect(database_conninfo(), autocommit=True) as admin:
        with psycopg.connect(database_conninfo()) as blocker:
            hold_claim(blocker, tenant, bodies[0]["messageId"])
            batch_worker.start()
            wait_for(lambda: waiting_on_locks() >= 1, 20, what="the batch to block on the claim")
            # Cut the batch's connection from the server side, as a restart or a proxy would.
            cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()").fetchall()
            assert cut == [(True,)]
            blocker.rollback()
    for body in bodies:
        assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
    after = invoice_json(tenant, invoice["invoiceNumber"])
    assert after["amountPaid"] == "15.00" and len(after["payments"]) == 12
    assert "could not be applied" in batch_worker.log


def test_the_poison_count_stays_per_message_when_a_batch_dies(running, batch_worker):
    """A message whose process dies each time it runs kills its first batch once; its batch-mates
    come back, run alone and apply at their first redelivery; it alone reaches MAX_DELIVERIES."""
    tenant = new_tenant("t-bpoison")
    doomed, healthy = issued_invoice(tenant), issued_invoice(tenant)
    poison = batch_worker.send("invoices.record_payment", payment(tenant, doomed["invoiceNumber"], "9.00"))
    mates = [batch_worker.send("invoices.record_payment", payment(tenant, healthy["invoiceNumber"], "1.00"))
             for _ in range(9)]
    stop = threading.Event()
    kills: list[int] = []

    def killer() -> None:
        """Whenever a process waits on the poison message's claim: kill it, and end its backend (which
        would otherwise go on waiting, and be taken for the next run's)."""
        with psycopg.connect(database_conninfo(), autocommit=True) as admin:
            while not stop.is_set():
                waiting = [row[0] for row in admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()")]
                if waiting and batch_worker.proc is not None:
                    for child in psutil.Process(batch_worker.proc.pid).children(recursive=True):
                        child.kill()
                        kills.append(child.pid)
                    for pid in waiting:
                        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                stop.wait(0.05)

    with psycopg.connect(database_conninfo()) as blocker:
        hold_claim(blocker, tenant, poison["messageId"])
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            # The default MAX_DELIVERIES: on RabbitMQ the ingress queue's delivery limit is declared
            # from it, and a vhost's queue cannot be declared again with another.
            batch_worker.start()
            for body in mates:
                assert wait_outcome(tenant, body["messageId"], timeout=90)["outcome"] == "applied"
            [letter] = wait_for(lambda: dead_letters_of(poison["messageId"]), 90, what="the poison dead letter")
        finally:
            stop.set()
            thread.join(5)
            blocker.rollback()
    assert letter["reason"] == "worker-lost"
    assert invoice_json(tenant, healthy["invoiceNumber"])["amountPaid"] == "9.00"
    assert invoice_json(tenant, doomed["invoiceNumber"])["payments"] == []
    # One kill of the batch, then the poison message's own starts up to the limit.
    limit = settings().max_deliveries
    assert len(kills) == 1 + (limit - 1)
    with db.sessions()() as s:
        counts = dict(s.execute(select(DeliveryCount.delivery_id, DeliveryCount.starts)).all())
    assert counts[batch_worker.key(poison)] == limit + 1  # the start that dead-lettered it
    # Its batch-mates started twice: in the batch, then alone (a redelivery, counted: a missing count
    # would be a redelivery the poison count did not see).
    assert [counts.get(batch_worker.key(m)) for m in mates] == [2] * len(mates)


def test_a_batch_that_creates_and_then_uses_an_invoice_and_meets_a_natural_key_twice(running, batch_worker):
    """The batch first runs without savepoints (one flush at its end); what only a flush would show
    (an invoice created earlier in the batch, an order invoiced twice) sends it round again with a
    savepoint per message, where each message sees the ones before it."""
    from tests.conftest import order_body

    tenant = new_tenant("t-bcreate")
    create = batch_worker.send("invoices.create", {
        "messageId": f"c-{uuid.uuid4()}", "tenantId": tenant, "invoiceNumber": "B-1", "currency": "USD",
        "customer": {"name": "Ada"}, "lineItems": [{"description": "x", "quantity": "2", "unitPrice": "10.00"}]})
    issue = batch_worker.send("invoices.issue", command(tenant, "B-1"))
    pay = batch_worker.send("invoices.record_payment", payment(tenant, "B-1", "5.00"))
    order = order_body(tenant=tenant)
    shipped = batch_worker.send("invoices.order_shipped", order)
    again = batch_worker.send("invoices.order_shipped", {**order, "messageId": f"m-{uuid.uuid4()}"})
    batch_worker.start()

    assert wait_outcome(tenant, again["messageId"])["reason"] == "order-already-invoiced"
    assert wait_outcome(tenant, pay["messageId"])["outcome"] == "applied"
    for body in (create, issue, shipped):
        assert outcome_of(tenant, body["messageId"])["outcome"] == "applied", body
    # (The payment came from another queue: it may arrive before the invoice exists, leave the batch
    # and wait alone; the others are one transaction.)
    assert transactions_of(tenant, [b["messageId"] for b in (create, issue, shipped, again)]) == 1
    invoice = invoice_json(tenant, "B-1")
    assert (invoice["status"], invoice["amountPaid"], invoice["balance"]) == ("PartiallyPaid", "5.00", "15.00")


@pytest.mark.skipif(os.environ.get("BROKER_URL", "").startswith("amqp"),
                    reason="the byte bound is the Redis transport's (RabbitMQ bounds prefetch by count only)")
def test_what_the_consumer_holds_is_bounded_in_bytes_not_only_by_the_prefetch_count(running, batch_worker):
    """Batching raises the prefetch count to 2 × APPLY_BATCH_SIZE per pool process; with bodies near
    MAX_MESSAGE_BYTES, the consumer still holds at most 2 × MAX_MESSAGE_BYTES of them."""
    import redis

    tenant = new_tenant("t-bytes")
    held = issued_invoice(tenant)
    blocked = batch_worker.send("invoices.record_payment", payment(tenant, held["invoiceNumber"], "1.00"))
    padded = [batch_worker.send("invoices.record_payment", payment(tenant, held["invoiceNumber"], "1.00",
                                                                   notes="x" * 900_000)) for _ in range(40)]
    broker = redis.Redis.from_url(batch_worker.url)
    with psycopg.connect(database_conninfo()) as blocker:
        hold_claim(blocker, tenant, blocked["messageId"])
        batch_worker.start(APPLY_BATCH_SIZE="100", MAX_MESSAGE_BYTES=str(1024 * 1024))
        wait_for(lambda: waiting_on_locks() >= 1, 20, what="the first batch to block on the claim")
        time.sleep(1)  # time to take more, if nothing bounded it
        holding = broker.hlen("unacked")
        queued = broker.llen("invoices.payments")
        blocker.rollback()
    # 2 MiB of ~0.9 MB bodies, plus at most two read past the bound (the BRPOP answer and the last of
    # its read); without the bound all 41 are taken at once (prefetch 200).
    assert 1 <= holding <= 5, holding
    assert queued >= 41 - holding
    assert wait_outcome(tenant, blocked["messageId"], timeout=60)["outcome"] == "applied"
    for body in padded:  # notes beyond the schema's limit: each dead-lettered, none lost
        assert wait_for(lambda b=body: dead_letters_of(b["messageId"]), 60, what="the dead letter")[0]["reason"] in (
            "malformed", "too-large")


def test_a_held_invoice_defers_its_own_messages_and_the_batch_applies_the_rest_now(running, batch_worker):
    """Before: the batch locked all its invoices in one statement, so a row held elsewhere (a long
    import, an operator's transaction) made every message of the batch wait LOCK_TIMEOUT_MS, eight
    times, and then go back whole, each counted as a start. Now the batch skips the held invoice:
    the other tenant's payments apply at once (while the row is still held), the held invoice's
    own go round with a back-off and apply once it is free, and none of it counts as a start."""
    tenant, other = new_tenant("t-held"), new_tenant("t-free")
    held, free = issued_invoice(tenant), issued_invoice(other)
    waiting = [batch_worker.send("invoices.record_payment", payment(tenant, held["invoiceNumber"], "2.00"))
               for _ in range(3)]
    now = [batch_worker.send("invoices.record_payment", payment(other, free["invoiceNumber"], "1.00"))
           for _ in range(7)]
    with psycopg.connect(database_conninfo()) as blocker:
        blocker.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (held["id"],))
        batch_worker.start(LOCK_TIMEOUT_MS="60000")  # a wait would outlast the test
        for body in now:
            assert wait_outcome(other, body["messageId"], timeout=60)["outcome"] == "applied"
        assert all(outcome_of(tenant, body["messageId"]) is None for body in waiting)  # still held
        blocker.rollback()
    for body in waiting:
        assert wait_outcome(tenant, body["messageId"], timeout=90)["outcome"] == "applied"
    assert invoice_json(tenant, held["invoiceNumber"])["amountPaid"] == "6.00"
    assert invoice_json(other, free["invoiceNumber"])["amountPaid"] == "7.00"
    with db.sessions()() as s:
        assert s.scalars(select(DeliveryCount.delivery_id)).all() == []  # nothing counted as a start
    assert "its invoice is held elsewhere" in batch_worker.log


def test_an_invoice_held_for_a_moment_is_waited_for_and_its_messages_stay_in_the_batch(running, batch_worker):
    """Another batch holds its invoices for the tens of milliseconds it takes to apply; a hot
    invoice is in every batch. So a batch that finds one of its invoices held waits for it, up to
    HELD_WAIT_MS, before its messages leave: released within that, the whole batch applies in one
    transaction and nothing goes round (without the wait the held invoice's messages would be sent
    again behind a back-off of a second or more, every time two batches met on a hot invoice)."""
    tenant = new_tenant("t-moment")
    held, free = issued_invoice(tenant), issued_invoice(tenant)
    bodies = [batch_worker.send("invoices.record_payment", payment(tenant, invoice["invoiceNumber"], "1.00"))
              for invoice in (held, free, held, free, held)]
    with psycopg.connect(database_conninfo()) as blocker:
        blocker.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (held["id"],))
        batch_worker.start()
        assert wait_for(lambda: waiting_on_locks() > 0, timeout=60, interval=0.01), "the batch never waited"
        blocker.rollback()  # seen waiting within ~10 ms of a poll: released well within HELD_WAIT_MS
    for body in bodies:
        assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
    assert transactions_of(tenant, [body["messageId"] for body in bodies]) == 1
    assert invoice_json(tenant, held["invoiceNumber"])["amountPaid"] == "3.00"
    assert "leaves its batch" not in batch_worker.log


def test_a_copy_whose_inbox_row_was_pruned_is_a_duplicate_found_inside_its_batch(running, batch_worker):
    """A record_payment copy arriving after its inbox row was pruned is caught by its payment: the
    batch probes the (invoice, payment id) index for the payments its messages would make, records
    the copy as a duplicate and applies the others, all in one transaction. (Without that check the
    copy's payment would meet the unique index at flush, and the whole batch would go round.)"""
    tenant = new_tenant("t-pruned-copy")
    invoice = issued_invoice(tenant)
    first = payment(tenant, invoice["invoiceNumber"], "4.00")
    send("invoices.record_payment", first)
    assert wait_outcome(tenant, first["messageId"])["outcome"] == "applied"
    with db.engine().begin() as conn:  # as invoices.prune_records leaves it, past INBOX_RETENTION_DAYS
        conn.execute(delete(InboxMessage).where(InboxMessage.tenant_id == tenant,
                                                InboxMessage.message_id == first["messageId"]))
    others = [batch_worker.send("invoices.record_payment", payment(tenant, invoice["invoiceNumber"], "1.00"))
              for _ in range(2)]
    batch_worker.send("invoices.record_payment", first)
    others.append(batch_worker.send("invoices.record_payment", payment(tenant, invoice["invoiceNumber"], "1.00")))
    batch_worker.start()
    assert wait_outcome(tenant, first["messageId"], timeout=60)["outcome"] == "duplicate"
    for body in others:
        assert wait_outcome(tenant, body["messageId"], timeout=60)["outcome"] == "applied"
    assert transactions_of(tenant, [body["messageId"] for body in [first, *others]]) == 1
    assert invoice_json(tenant, invoice["invoiceNumber"])["amountPaid"] == "7.00"
    assert "leaves its batch" not in batch_worker.log


def test_forged_copies_of_another_tenants_task_id_do_not_make_its_message_worker_lost(running, batch_worker):
    """Before: starts were counted by the publisher-chosen task id alone, so copies carrying B's
    task id and `redelivered` (on Redis any publisher can write both) counted against B's message,
    which was dead-lettered `worker-lost` at its first real redelivery. Now a message's starts are
    counted under its task id and body: the forgeries count against themselves."""
    if not batch_worker.url.startswith("redis"):
        pytest.skip("on RabbitMQ only the broker sets `redelivered`")
    import json

    import redis

    from tests.hostile.test_transport_input import celery_message

    victim_tenant = new_tenant("t-victim")
    invoice = issued_invoice(victim_tenant)
    body = payment(victim_tenant, invoice["invoiceNumber"], "3.00")
    task_id = str(uuid.uuid4())

    def redelivered(message_body: dict[str, Any]) -> bytes:
        message = json.loads(celery_message("invoices.record_payment", message_body, "invoices.payments"))
        message["headers"]["id"] = message["headers"]["root_id"] = task_id
        message["properties"]["delivery_info"]["redelivered"] = True
        return json.dumps(message).encode()

    client = redis.Redis.from_url(batch_worker.url)
    forged = [{"messageId": f"forged-{i}", "tenantId": new_tenant("t-forger"), "amount": "oops"}
              for i in range(settings().max_deliveries)]
    client.lpush("invoices.payments", *[redelivered(f) for f in forged])
    batch_worker.start(APPLY_BATCH_SIZE="10")
    for copy in forged:  # each started (a counted start, as a redelivery), then dead-lettered malformed
        wait_for(lambda: dead_letters_of(copy["messageId"]), 60, what="the forged copy's dead letter")
    client.lpush("invoices.payments", redelivered(body))  # the victim's own, redelivered once
    assert wait_outcome(victim_tenant, body["messageId"], timeout=60)["outcome"] == "applied"
    assert dead_letters_of(body["messageId"]) == []


@pytest.mark.skipif(not os.environ.get("BROKER_URL", "").startswith("amqp"),
                    reason="AMQP's multiple acknowledgement (the Redis transport acknowledges a batch in one round trip)")
def test_one_acknowledgement_per_batch_never_acknowledges_an_earlier_delivery_of_another(broker):
    """worker/brokers/amqp_transport.py: a batch's deliveries go in one multiple acknowledgement when
    no earlier delivery of the channel is unsettled; one held by something else (another batch, a
    message still running) stays unacknowledged, and comes back when the channel closes."""
    from kombu import Connection, Consumer, Exchange, Queue

    from worker.brokers.amqp_transport import TRANSPORT

    name = f"test-acks-{uuid.uuid4().hex[:6]}"
    with Connection(broker, transport=TRANSPORT) as conn:
        queue = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
        with conn.Producer() as producer:
            for i in range(6):
                producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue])
        channel = conn.channel()
        got: list[Any] = []
        with Consumer(channel, [queue], callbacks=[lambda body, message: got.append(message)], prefetch_count=6):
            wait_for(lambda: conn.drain_events(timeout=1) or len(got) == 6, 20, what="six deliveries")
            tags = [m.delivery_tag for m in got]
            frames: list[tuple[int, bool]] = []
            plain = type(channel).basic_ack  # the transport's own, which forgets what it settles
            channel.basic_ack = lambda tag, multiple=False, *a, **k: (frames.append((tag, multiple)),
                                                                      plain(channel, tag, multiple, *a, **k))[1]
            assert list(channel.unsettled) == tags, (channel.unsettled, tags)
            # The second and third while the first is unsettled: two single acknowledgements.
            type(channel).basic_ack_many(channel, tags[1:3])
            assert frames == [(tags[1], False), (tags[2], False)]
            got[0].ack()  # the first now settled: the rest but the last in one frame
            frames.clear()
            type(channel).basic_ack_many(channel, tags[3:5])
            assert frames == [(tags[4], True)]
            assert list(channel.unsettled) == [tags[5]]
        channel.close()  # the last was never acknowledged: it goes back to the queue, alone
        with conn.channel() as check:
            assert check.queue_declare(name, passive=True).message_count == 1
            check.queue_delete(name)
