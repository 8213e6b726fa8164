"""The relay's CPU per event, publishing one event at a time (kombu's Producer.publish) and in
pipelined batches (one round trip per batch on Redis), side by side on the same outbox rows, each
checked to have reached a queue bound to every event."""

from __future__ import annotations

import time
import uuid

import psycopg
from kombu import Connection, Exchange, Producer, Queue

from bench.harness import Environment


def run(env: Environment, count: int) -> dict[str, dict[str, float]]:
    from worker.brokers.relay import EVENTS_EXCHANGE, Relay, broker_connection

    name = f"bench-relay-{uuid.uuid4().hex[:6]}"
    # One consumer queue bound to every event, as in production; declared and deleted on one
    # connection (on Redis, kombu's delete removes the binding only on the connection that made it).
    declared = Connection(env.broker_url)
    Queue(name, Exchange(EVENTS_EXCHANGE.name, type="topic", durable=True), routing_key="#",
          durable=False)(declared.default_channel).declare()
    results: dict[str, dict[str, float]] = {}
    try:
        for label, pipeline in (("one publish per event", False), ("pipelined batches", True)):
            env.sql("UPDATE outbox SET published_at = NULL WHERE id IN "
                    "(SELECT id FROM outbox WHERE parked_at IS NULL ORDER BY id DESC LIMIT %s)", (count,))
            relay = Relay(env.database_url, env.broker_url, pipeline=pipeline)
            with psycopg.connect(relay.conninfo) as db, broker_connection(env.broker_url) as broker:
                producer = Producer(broker.default_channel)
                cpu, began = time.process_time(), time.monotonic()
                while relay.publish_batch(db, producer):
                    pass
                cpu, seconds = time.process_time() - cpu, time.monotonic() - began
            with Connection(env.broker_url) as conn:  # every event reached the bound queue (none went nowhere)
                arrived = conn.default_channel.queue_purge(name)
            assert arrived == relay.published, f"{label}: {relay.published} events published, {arrived} arrived"
            results[label] = {"cpu_us": cpu / relay.published * 1e6, "rate": relay.published / seconds,
                              "events": relay.published}
    finally:
        with declared:
            declared.default_channel.queue_delete(name)
    return results
