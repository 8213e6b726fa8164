"""The relay's CPU per event, publishing one event at a time (kombu's Producer.publish) and in
pipelined batches (one round trip per batch on Redis), side by side on the same outbox rows, each
checked to have reached a queue bound to every event."""

from __future__ import annotations

import time

import psycopg
from kombu import Connection, Producer

from bench.harness import Environment, EventsQueue


def run(env: Environment, count: int) -> dict[str, dict[str, float]]:
    from worker.brokers.relay import Relay, broker_connection

    queue = EventsQueue(env, "bench-relay", "#")  # one consumer queue bound to every event, as in production
    name = queue.name
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
        queue.delete()
    return results
