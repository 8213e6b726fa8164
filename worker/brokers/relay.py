"""The event relay: publishes outbox rows to the durable topic exchange invoices.events.

Rows are taken with FOR UPDATE SKIP LOCKED (two relays never publish a row twice on purpose),
published as plain JSON (routing key = type), and marked published in the same transaction
only after the broker accepted them: a relay killed in between causes a duplicate, never a loss.
A LISTEN on invoice_outbox (notified by a trigger at commit) wakes it within milliseconds.

On Redis a batch goes in one round trip (publish_pipelined): kombu's publish costs an SMEMBERS of
the topic exchange's bindings and an LPUSH per event. kombu 5.7's Producer.batch() buffers the
LPUSHes in a pipeline too, but still routes each message as it comes (one SMEMBERS per event):
10,000 events side by side, twice, CPU per event one by one 254 / 262 µs, Producer.batch 187 / 180,
publish_pipelined 40 / 46.
On RabbitMQ a batch goes with its confirms pipelined (worker/brokers/amqp_transport.py
publish_confirmed_many): every event published, then every confirm awaited, where py-amqp's confirm
mode waits for each before the next. An event RabbitMQ refuses (basic.nack) is not marked published
and goes again after a back-off: RabbitMQ nacks when a queue cannot take a message for now (a quorum
queue without a leader while a node is lost, a full queue that rejects publishes), never for what
the message holds, so parking it left consumers a gap until an operator replayed it (two events
of a cluster scenario, mq1 cut off). A channel it closes fails the batch.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

import psycopg
from kombu import Connection, Exchange, Producer
from kombu.exceptions import ConnectionError as KombuConnectionError
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps as json_dumps

from worker.endpoints import CONNECT_OPTIONS, libpq_url
from worker.operations import metrics

log = logging.getLogger(__name__)

EVENTS_EXCHANGE = Exchange("invoices.events", type="topic", durable=True)
CHANNEL = "invoice_outbox"
BATCH = 500
# Payload bytes per batch (one transaction): 500 large invoices would otherwise be one huge batch.
BATCH_BYTES = 8 * 1024 * 1024
# An event larger than this is parked, not sent (RabbitMQ refuses far smaller messages by default
# than Redis; a 1,000-line invoice's invoice.created is about 300 KB).
MAX_EVENT_BYTES = 4 * 1024 * 1024
IDLE_POLL_SECONDS = 2.0
# RabbitMQ: how long a batch's confirms may take.
CONFIRM_TIMEOUT_SECONDS = 30.0
# A relay that published for this long before a failure starts its back-off again from the shortest.
HEALTHY_SECONDS = 30.0


class BrokerRefused(Exception):
    """RabbitMQ refused events of a batch (basic.nack): they stay unpublished and go again."""


def broker_connection(broker_url: str) -> Connection:
    return Connection(broker_url, transport_options={"confirm_publish": True},
                      connect_timeout=5)


def pipelined(producer: Producer) -> bool:
    """Whether the producer's channel is kombu's Redis channel, whose batch can go in one pipeline."""
    return isinstance(producer.channel, kombu_redis.Channel)


def trace_headers(traceparent: str | None) -> dict[str, str]:
    """An event's message headers: the traceparent of the message span that wrote it, when traced."""
    return {"traceparent": traceparent} if traceparent else {}


def publish_pipelined(producer: Producer, events: list[tuple[dict, str, str | None, str | None]]) -> None:
    """Redis: publish a batch of events with one round trip. Each message is built exactly as
    kombu's Producer.publish builds it (JSON, persistent, the event id as message_id), and routed
    as kombu's topic exchange routes it (the bindings read once per routing key and batch); the
    LPUSHes then go in one pipeline, where kombu sends one lookup and one LPUSH per event."""
    channel = producer.channel
    routes: dict[str, list[str]] = {}
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for payload, routing_key, message_id, traceparent in events:
            body, content_type, content_encoding = producer._prepare(payload, "json", None, None, None, {})
            message = channel.prepare_message(body, 0, content_type, content_encoding, trace_headers(traceparent),
                                              {"delivery_mode": 2, "message_id": message_id})
            channel._inplace_augment_message(message, EVENTS_EXCHANGE.name, routing_key)
            if routing_key not in routes:
                routes[routing_key] = channel._lookup(EVENTS_EXCHANGE.name, routing_key)
            for queue in routes[routing_key]:
                pipe.lpush(channel._q_for_pri(queue, 0), json_dumps(message))
        pipe.execute()


class Relay:
    def __init__(self, database_url: str, broker_url: str, *, batch: int = BATCH, pipeline: bool = True) -> None:
        self.conninfo = libpq_url(database_url)
        self.broker_url = broker_url
        self.batch = batch
        self.published = 0
        # Redis: a batch in one round trip (False: one publish per event, kombu's way; for `make bench`).
        self.pipeline = pipeline

    def publish_batch(self, db: psycopg.Connection, producer: Producer) -> int:
        """Publish up to one batch of unpublished rows in id order (at most `batch` rows and about
        BATCH_BYTES of payload); return how many rows it handled. A row larger than MAX_EVENT_BYTES,
        or one Redis refuses, is parked with its error instead of failing the batch: one event never
        holds up the others. Rows RabbitMQ refuses (basic.nack: a queue that cannot take messages
        for now) stay unpublished while the rest is marked, and then BrokerRefused sends the relay
        into its back-off; one event at a time (kombu's confirmed publish, which retries a refused
        one and then raises OperationalError) the refusal fails the batch, as losing the broker does."""
        # The exchange's type lives in the connection's state on kombu's virtual transports (Redis):
        # on a connection that never declared it, kombu routes as a direct exchange, no queue bound
        # with a pattern matches, and every event would be marked published having gone nowhere.
        producer.maybe_declare(EVENTS_EXCHANGE)
        # Losing the broker fails the batch (its rows go again), never parks an event. Read before
        # publishing: when the connection drops mid-publish, kombu's retry leaves
        # producer.connection None (an except clause reading it raised AttributeError). A publish
        # with retry=True reports a lost connection as kombu's OperationalError, not as the
        # transport's error: without it here, two events were parked (never published) when a
        # cluster node was SIGKILLed mid-publish.
        broker_errors = (producer.connection.connection_errors + producer.connection.channel_errors
                         + (OperationalError, KombuConnectionError))
        refused = 0
        with db.transaction():
            rows = db.execute(
                "SELECT id, type, payload, octet_length(payload::text), traceparent FROM outbox "
                "WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                (self.batch,),
            ).fetchall()
            published, types, parked, size = [], [], [], 0
            sendable = []
            for id_, type_, payload, length, traceparent in rows:
                if sendable and size + length > BATCH_BYTES:
                    break  # the rest waits for the next batch (still locked until this commit)
                size += length
                if length > MAX_EVENT_BYTES:
                    parked.append((id_, f"the event is {length} bytes; at most {MAX_EVENT_BYTES} are sent"))
                    continue
                sendable.append((id_, type_, payload, traceparent))
            if sendable and self.pipeline and pipelined(producer):
                try:
                    publish_pipelined(producer, [(p, t, p.get("eventId"), tp) for _, t, p, tp in sendable])
                except kombu_redis.redis.ResponseError as exc:  # the server refused something: one by one,
                    log.warning("relay: a pipelined batch was refused (%s); publishing it event by event", exc)
                else:  # (where a refused event is parked alone; the ones already pushed go again)
                    published = [id_ for id_, _, _, _ in sendable]
                    types = [type_ for _, type_, _, _ in sendable]
                    sendable = []
            if sendable and self.pipeline and hasattr(producer.channel, "publish_confirmed_many"):
                confirmed = producer.channel.publish_confirmed_many(
                    [(self._amqp_message(producer, payload, traceparent), EVENTS_EXCHANGE.name, type_)
                     for _, type_, payload, traceparent in sendable],
                    timeout=CONFIRM_TIMEOUT_SECONDS)
                for (id_, type_, _, _), ok in zip(sendable, confirmed):
                    if ok:
                        published.append(id_)
                        types.append(type_)
                    else:
                        refused += 1  # not marked: it goes again
                sendable = []
            for id_, type_, payload, traceparent in sendable:
                try:
                    producer.publish(
                        payload, exchange=EVENTS_EXCHANGE, routing_key=type_, serializer="json", delivery_mode=2,
                        message_id=payload.get("eventId"), headers=trace_headers(traceparent),
                        retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                    )
                except broker_errors:
                    raise
                except Exception as exc:  # noqa: BLE001 - the broker refused this one message
                    parked.append((id_, f"{type(exc).__name__}: {exc}"[:2000]))
                    continue
                published.append(id_)
                types.append(type_)
            if published:
                db.execute("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY(%s)", (published,))
            for id_, reason in parked:
                log.error("relay: event %s parked: %s", id_, reason)
                db.execute("UPDATE outbox SET parked_at = clock_timestamp(), park_reason = %s WHERE id = %s",
                           (reason, id_))
        self.published += len(published)
        metrics.count_events(types)
        if refused:  # the rest of the batch is marked; the refused go again after the relay's back-off
            raise BrokerRefused(f"RabbitMQ refused {refused} events (basic.nack); they stay unpublished and go again")
        return len(published) + len(parked)

    @staticmethod
    def _amqp_message(producer: Producer, payload: dict, traceparent: str | None) -> Any:
        """The message kombu's Producer.publish would send for this event (JSON, persistent, the event id,
        the trace headers)."""
        body, content_type, content_encoding = producer._prepare(payload, "json", None, None, None, {})
        return producer.channel.prepare_message(body, None, content_type, content_encoding, trace_headers(traceparent),
                                                {"delivery_mode": 2, "message_id": payload.get("eventId")})

    def run(self, stop: threading.Event | None = None) -> None:
        """Publish until stopped; reconnect with back-off when PostgreSQL or the broker is away."""
        stop = stop or threading.Event()
        delay = 0.5
        while not stop.is_set():
            began = time.monotonic()
            try:
                self._serve(stop)
                delay = 0.5
            except Exception as exc:  # PostgreSQL or the broker away (kombu's errors vary by transport), a refusal
                if time.monotonic() - began > HEALTHY_SECONDS:
                    delay = 0.5
                known = isinstance(exc, (psycopg.Error, OSError, ConnectionError, BrokerRefused))
                log.warning("relay: %s; reconnecting in %.1fs", exc if known else f"{type(exc).__name__}: {exc}", delay)
            stop.wait(delay)
            delay = min(delay * 2, 10.0)

    def _serve(self, stop: threading.Event) -> None:
        with psycopg.connect(self.conninfo, autocommit=True, **CONNECT_OPTIONS) as listener, \
                psycopg.connect(self.conninfo, **CONNECT_OPTIONS) as db, broker_connection(self.broker_url) as broker:
            listener.execute(f"LISTEN {CHANNEL}")
            broker.ensure_connection(max_retries=3)
            producer = Producer(broker.default_channel)
            EVENTS_EXCHANGE(broker.default_channel).declare()
            log.info("relay: publishing to %s", EVENTS_EXCHANGE.name)
            while not stop.is_set():
                if self.publish_batch(db, producer) == self.batch:
                    continue
                # Wait for a commit's notification; poll now and then in case one was missed.
                for _ in listener.notifies(timeout=IDLE_POLL_SECONDS, stop_after=1):
                    break


def status(database_url: str) -> dict[str, Any]:
    """Outbox lag: unpublished events and the age of the oldest."""
    with psycopg.connect(libpq_url(database_url)) as db:
        count, oldest, published, parked = db.execute(
            "SELECT count(*) FILTER (WHERE published_at IS NULL AND parked_at IS NULL), "
            "min(created_at) FILTER (WHERE published_at IS NULL AND parked_at IS NULL), "
            "count(*) FILTER (WHERE published_at IS NOT NULL), count(*) FILTER (WHERE parked_at IS NOT NULL) FROM outbox"
        ).fetchone()
    age = (datetime.now(timezone.utc) - oldest).total_seconds() if oldest else 0.0
    return {"unpublished": count, "oldestUnpublishedAgeSeconds": round(age, 3),
            "oldestUnpublishedAt": oldest.isoformat() if oldest else None, "publishedKept": published, "parked": parked}


def parked(database_url: str, limit: int = 200) -> list[dict[str, Any]]:
    """Events the relay set aside, oldest first, with the reason."""
    with psycopg.connect(libpq_url(database_url)) as db:
        rows = db.execute("SELECT id, event_id, type, tenant_id, invoice_id, sequence, causation_id, created_at, "
                          "parked_at, park_reason FROM outbox WHERE parked_at IS NOT NULL AND published_at IS NULL "
                          "ORDER BY id LIMIT %s", (limit,)).fetchall()
    keys = ("id", "eventId", "type", "tenantId", "invoiceId", "sequence", "causationId", "createdAt", "parkedAt",
            "parkReason")
    return [{k: (v.isoformat() if isinstance(v, datetime) else str(v) if k in ("eventId", "invoiceId") and v else v)
             for k, v in zip(keys, row)} for row in rows]


def publish_again(database_url: str, outbox_id: int) -> bool:
    """Hand a parked event back to the relay (after the cause was fixed: a broker limit raised, a
    permission granted): it is published in order with the next batch, under its own eventId, so a
    consumer that somehow saw it already de-duplicates it. False when no such parked event waits."""
    with psycopg.connect(libpq_url(database_url)) as db:
        updated = db.execute("UPDATE outbox SET parked_at = NULL, park_reason = NULL "
                             "WHERE id = %s AND parked_at IS NOT NULL AND published_at IS NULL", (outbox_id,)).rowcount
        db.execute(f"NOTIFY {CHANNEL}")
    return updated == 1


def wait_until_drained(database_url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status(database_url)["unpublished"] == 0:
            return True
        time.sleep(0.05)
    return False
