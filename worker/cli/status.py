"""`invoice-worker status [--json]`: one screen for an operator (CONTRACT.md section 9)."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.cli.output import console
from worker.operations.heartbeats import age_text

LAST_HOUR = """
SELECT count(*) FILTER (WHERE outcome = 'applied'), count(*) FILTER (WHERE outcome = 'rejected'),
       count(*) FILTER (WHERE outcome = 'duplicate')
FROM inbox WHERE processed_at > now() - interval '1 hour'
"""
DEAD_LETTERED_LAST_HOUR = "SELECT count(*) FROM dead_letters WHERE last_seen > now() - interval '1 hour'"
# Seconds as a JSON number, rounded to the millisecond in the query (a duration, not money).
LAST_APPLIED = ("SELECT round(extract(epoch FROM now() - max(processed_at)), 3)::float8 "
                "FROM inbox WHERE outcome = 'applied'")


def gather(database_url: str, broker_url: str, ping_timeout: float = 1.0) -> dict[str, Any]:
    """Everything the screen shows, as its JSON; a part that cannot be read is null, and
    `problems` says why."""
    import psycopg

    from worker.celery_app import app
    from worker.endpoints import libpq_url
    from worker.operations import heartbeats
    from worker.operations.health import Snapshot, read_database, read_queues

    snapshot = Snapshot(taken=0.0)
    read_database(database_url, snapshot)
    read_queues(broker_url, app.conf.task_queues, snapshot)
    report: dict[str, Any] = {
        "queues": snapshot.queue_depth,
        "workers": None,
        "outbox": None if snapshot.outbox_unpublished is None else {
            "unpublished": snapshot.outbox_unpublished,
            "oldestUnpublishedAgeSeconds": round(snapshot.outbox_oldest_age_seconds or 0.0, 3)},
        "deadLettersOpen": snapshot.dead_letters_open,
        "lastHour": None,
        "lastAppliedAgeSeconds": None,
        "heartbeats": None,
        "problems": dict(snapshot.problems),
    }
    if "database" not in snapshot.problems:
        with psycopg.connect(libpq_url(database_url)) as db:
            applied, rejected, duplicate = db.execute(LAST_HOUR).fetchone()
            (dead_lettered,) = db.execute(DEAD_LETTERED_LAST_HOUR).fetchone()
            (age,) = db.execute(LAST_APPLIED).fetchone()
            report["heartbeats"] = {component: {"alive": seen["alive"], "lastSeenAgeSeconds": seen["lastSeenAgeSeconds"]}
                                    for component, seen in heartbeats.read(db).items()}
        report["lastHour"] = {"applied": applied, "rejected": rejected, "duplicate": duplicate,
                              "deadLettered": dead_lettered}
        report["lastAppliedAgeSeconds"] = age
    if "broker" not in snapshot.problems:
        try:
            replies = app.control.ping(timeout=ping_timeout)
            report["workers"] = sorted(name for reply in replies for name in reply)
        except Exception as exc:  # kombu's connection errors vary by transport
            report["problems"]["workers"] = f"cannot ping the workers: {exc}"
    return report


def show(report: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
    queues = Table("queue", "waiting", title="queues")
    for name, depth in (report["queues"] or {}).items():
        queues.add_row(name, str(depth))
    out.print(queues)
    workers = report["workers"]
    out.print(f"workers answering ping: {len(workers)} ({', '.join(workers)})" if workers is not None else
              "workers answering ping: unknown")
    for component, seen in (report.get("heartbeats") or {}).items():
        out.print(f"{component}: {'alive' if seen['alive'] else 'NOT SEEN'}, heartbeat {age_text(seen['lastSeenAgeSeconds'])}")
    outbox = report["outbox"]
    if outbox is not None:
        out.print(f"outbox: {outbox['unpublished']} unpublished, oldest "
                  f"{outbox['oldestUnpublishedAgeSeconds']:.1f}s")
        out.print(f"open dead letters: {report['deadLettersOpen']}")
    hour = report["lastHour"]
    if hour is not None:
        out.print(f"last hour: {hour['applied']} applied, {hour['rejected']} rejected, {hour['duplicate']} duplicate, "
                  f"{hour['deadLettered']} dead-lettered")
        out.print(f"last applied message: {age_text(report['lastAppliedAgeSeconds'])}")
    for part, problem in report["problems"].items():
        out.print(f"[red]{part}: {problem}[/red]")


@click.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """One screen: queue depths, workers answering, worker/relay/beat heartbeats, outbox lag, open dead letters, the last hour."""
    from worker.celery_app import publishing_app
    from worker.endpoints import broker_url, database_url

    publishing_app()
    report = gather(database_url(), broker_url())
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        show(report)
    if report["problems"]:
        raise SystemExit(1)
