"""One bad event or one bad payment costs itself alone: the relay parks an event it cannot send
and publishes the rest; the retry scan goes on past a payment it cannot retry."""

from __future__ import annotations

import json
import uuid

import psycopg
from kombu import Connection, Producer

from tests.conftest import EventCollector
from tests.faults.conftest import fault_environment, scenario  # noqa: F401 - shared fixtures
from worker.brokers import relay
from worker.brokers.relay import MAX_EVENT_BYTES, Relay
from worker.endpoints import libpq_url
from worker.storage import db


def outbox_row(conn: psycopg.Connection, payload_size: int = 10) -> str:
    event_id = str(uuid.uuid4())
    payload = {"eventId": event_id, "type": "invoice.updated", "tenantId": "t-iso", "sequence": None,
               "data": {"pad": "x" * payload_size}}
    conn.execute("INSERT INTO outbox (event_id, type, tenant_id, payload) VALUES (%s, %s, %s, %s)",
                 (event_id, "invoice.updated", "t-iso", json.dumps(payload)))
    return event_id


def test_an_event_too_large_to_send_is_parked_and_the_others_flow(scenario):
    """On the fault suite's own servers: no other relay takes the rows."""
    url, broker = scenario.database_url, scenario.broker_url
    collector = EventCollector(broker)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        before = outbox_row(conn)
        huge = outbox_row(conn, MAX_EVENT_BYTES + 1)
        after = outbox_row(conn)
    sender = Relay(url, broker)
    with psycopg.connect(libpq_url(url)) as conn, Connection(broker) as connection:
        relay.EVENTS_EXCHANGE(connection.default_channel).declare()
        handled = sender.publish_batch(conn, Producer(connection.default_channel))
    assert handled == 3
    received = {e["eventId"] for e in collector.drain(lambda e: len(e) >= 2, timeout=10)}
    assert received == {before, after}
    state = relay.status(url)
    assert (state["unpublished"], state["parked"]) == (0, 1)
    with psycopg.connect(libpq_url(url)) as conn:
        reason = conn.execute("SELECT park_reason FROM outbox WHERE event_id = %s", (huge,)).fetchone()[0]
    assert str(MAX_EVENT_BYTES) in reason
    collector.close()


def test_the_retry_scan_goes_past_a_payment_it_cannot_retry(running):
    """Two failed saved-card payments are due; the retry id of the first is already taken on its
    invoice (a crafted message could once take it; now the id derives from a key no publisher
    knows, so only a direct insert can). The second is still retried."""
    from tests.conftest import new_tenant
    from tests.end_to_end.test_payments import failed_saved_card_payment
    from worker.delivery.scheduler import retry_failed_payments
    from worker.storage.unit_of_work import derived_id

    tenant = new_tenant("t-scan")
    (first_invoice, first), (second_invoice, second) = (failed_saved_card_payment(tenant) for _ in range(2))
    with db.engine().begin() as conn:
        keys = {public: conn.exec_driver_sql(
                    "SELECT id FROM payments WHERE invoice_id = %(invoice)s AND payment_id = %(public)s",
                    {"invoice": uuid.UUID(invoice["id"]), "public": uuid.UUID(public)}).scalar_one()
                for invoice, public in ((first_invoice, first), (second_invoice, second))}
        conn.exec_driver_sql(
            "INSERT INTO payments (id, payment_id, invoice_id, status, amount, currency, attempt, created_at) "
            "SELECT %(id)s, %(taken)s, invoice_id, 'Pending', 1, 'USD', 0, now() FROM payments WHERE id = %(first)s",
            {"id": uuid.uuid4(), "taken": derived_id("retry", tenant, keys[first]), "first": keys[first]})
    result = retry_failed_payments(f"scan-{uuid.uuid4()}")
    assert result["requested"] == 1
    with db.engine().connect() as conn:
        retried = conn.exec_driver_sql("SELECT count(*) FROM payments WHERE retry_of = %(key)s",
                                       {"key": keys[second]}).scalar()
    assert retried == 1


def test_a_broker_lost_mid_publish_fails_the_batch_and_parks_nothing(scenario):
    """A publish with retry whose connection is gone raises kombu's OperationalError (not the
    transport's error): the batch must fail and its rows go again, never be parked as refused.
    Seen in the cluster scenario that SIGKILLs a RabbitMQ node: two events parked, never sent."""
    from kombu.exceptions import OperationalError

    class BrokerGone(Producer):
        def publish(self, *args, **kwargs):
            raise OperationalError("[Errno 104] Connection reset by peer")

    url, broker = scenario.database_url, scenario.broker_url
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        outbox_row(conn)
    sender = Relay(url, broker, pipeline=False)
    with psycopg.connect(libpq_url(url)) as conn, Connection(broker) as connection:
        relay.EVENTS_EXCHANGE(connection.default_channel).declare()
        try:
            sender.publish_batch(conn, BrokerGone(connection.default_channel))
        except OperationalError:
            pass
        else:
            raise AssertionError("the batch did not fail")
    state = relay.status(url)
    assert (state["unpublished"], state["parked"]) == (1, 0)
