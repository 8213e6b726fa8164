"""`invoice-worker events status|tail`: the events published on invoices.events."""

from __future__ import annotations

import json
import signal
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


@events.command("parked")
@click.option("--json", "as_json", is_flag=True)
def events_parked(as_json: bool) -> None:
    """Events the relay set aside (the broker refused them), with the reason."""
    from worker.brokers.relay import parked
    from worker.endpoints import database_url

    rows = parked(database_url())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['type']}  tenant {r['tenantId']}  parked {r['parkedAt']}: {r['parkReason']}")
    if not rows:
        click.echo("no parked event")


@events.command("publish-again")
@click.argument("outbox_id", type=int)
def events_publish_again(outbox_id: int) -> None:
    """Hand a parked event back to the relay, to be published with the next batch."""
    from worker.brokers.relay import publish_again
    from worker.endpoints import database_url

    if not publish_again(database_url(), outbox_id):
        raise click.ClickException(f"no parked event {outbox_id}")
    click.echo(f"event {outbox_id} handed back to the relay")


@events.command("tail")
@click.option("--type", "types", multiple=True, help="Only events of this type (repeatable; default all).")
@click.option("--count", type=int, default=0, help="Stop after this many events (0: run until a signal).")
def events_tail(types: tuple[str, ...], count: int) -> None:
    """Print events as they are published, read through a queue of its own bound to the exchange.
    SIGINT, SIGTERM and SIGHUP end it cleanly, its queue deleted; a queue left by a tail that
    could not clean up (SIGKILL) expires (RabbitMQ) or is pruned by beat (Redis):
    worker/brokers/event_tails.py."""
    from kombu import Connection

    from worker.brokers.event_tails import Tail
    from worker.brokers.relay import EVENTS_EXCHANGE
    from worker.endpoints import broker_url

    stopped: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _frame: stopped.append(number))
    seen = 0
    with Connection(broker_url()) as conn:
        tail = Tail(conn, types or ("#",))

        def show(body: Any, message: Any) -> None:
            nonlocal seen
            click.echo(json.dumps(body))
            seen += 1

        tail.open()
        try:
            # no_ack: a tail killed mid-message leaves nothing to hand back into a queue that is gone
            with conn.Consumer(tail.queues, callbacks=[show], accept=["json"], no_ack=True):
                # on stderr, so that stdout stays one JSON event per line; a script can wait for it
                click.echo(f"tailing {EVENTS_EXCHANGE.name} ({', '.join(types or ('#',))}) through {tail.name}",
                           err=True)
                while not stopped and (not count or seen < count):
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        pass
                    tail.beat()
        finally:
            tail.close()
