"""`invoice-worker events status|tail`: the events published on invoices.events."""

from __future__ import annotations

import json
import uuid
from typing import Any

import click


@click.group()
def events() -> None:
    """The events published on invoices.events."""


@events.command("status")
@click.option("--json", "as_json", is_flag=True)
def events_status(as_json: bool) -> None:
    """Outbox lag: unpublished events and the age of the oldest."""
    from worker.brokers.relay import status
    from worker.endpoints import database_url

    data = status(database_url())
    click.echo(json.dumps(data) if as_json else
               f"unpublished: {data['unpublished']}  oldest: {data['oldestUnpublishedAgeSeconds']}s  "
               f"published (kept): {data['publishedKept']}  parked: {data['parked']}")


@events.command("tail")
@click.option("--type", "types", multiple=True, help="Only events of this type (repeatable; default all).")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: run until Ctrl-C).")
def events_tail(types: tuple[str, ...], count: int) -> None:
    """Print events as they are published, read through a queue of its own bound to the exchange."""
    from kombu import Connection, Queue

    from worker.brokers.relay import EVENTS_EXCHANGE
    from worker.endpoints import broker_url

    seen = 0
    with Connection(broker_url()) as conn:
        name = f"invoices.events.tail.{uuid.uuid4().hex[:8]}"
        queues = [Queue(name, EVENTS_EXCHANGE, routing_key=t, durable=False, auto_delete=True) for t in (types or ("#",))]

        def show(body: Any, message: Any) -> None:
            nonlocal seen
            click.echo(json.dumps(body))
            message.ack()
            seen += 1

        with conn.Consumer(queues, callbacks=[show], accept=["json"]):
            # on stderr, so that stdout stays one JSON event per line; a script can wait for it
            click.echo(f"tailing {EVENTS_EXCHANGE.name} ({', '.join(types or ('#',))})", err=True)
            try:
                while not count or seen < count:
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        continue
            except KeyboardInterrupt:
                pass
            finally:
                for queue in queues:
                    queue(conn.default_channel).delete()
