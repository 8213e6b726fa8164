"""`invoice-worker dead-letters list|show|replay|discard`: the messages the worker could not apply."""

from __future__ import annotations

import json
import uuid
from typing import Any

import click
from rich.table import Table

from worker.cli.output import console
from worker.delivery import dead_letters


@click.group("dead-letters")
def dead_letters_group() -> None:
    """The dead-letter store: messages the worker could not apply."""


@dead_letters_group.command("list")
@click.option("--status", type=click.Choice(["open", "replayed", "discarded", "all"]), default="open", show_default=True)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dl_list(status: str, limit: int, as_json: bool) -> None:
    rows = dead_letters.listing(None if status == "all" else status, limit)
    if as_json:
        click.echo(json.dumps([dead_letters.to_json(r) for r in rows], indent=2))
        return
    table = Table("id", "task", "messageId", "reason", "attempts", "last seen", "status", "error")
    for r in rows:
        table.add_row(str(r.id), r.task_name, r.message_id or "", r.reason, str(r.attempts),
                      r.last_seen.isoformat(timespec="seconds"), r.status, r.error[:80])
    console().print(table)


def _row(dead_letter_id: int) -> Any:
    row = dead_letters.get(dead_letter_id)
    if row is None:
        raise click.ClickException(f"no dead letter {dead_letter_id}")
    return row


@dead_letters_group.command("show")
@click.argument("dead_letter_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def dl_show(dead_letter_id: int, as_json: bool) -> None:
    data = dead_letters.to_json(_row(dead_letter_id))
    click.echo(json.dumps(data, indent=2) if as_json else "\n".join(
        f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in data.items()))


@dead_letters_group.command("replay")
@click.argument("dead_letter_id", type=int)
@click.option("--body", "body_file", type=click.File("r"), help="Send this corrected body instead of the stored one.")
@click.option("--json", "as_json", is_flag=True)
def dl_replay(dead_letter_id: int, body_file: Any, as_json: bool) -> None:
    """Send the stored body again as its task (or a corrected body with --body)."""
    from worker.brokers.topology import queue_for
    from worker.celery_app import publishing_app

    app = publishing_app()
    row = _row(dead_letter_id)
    if row.status == "discarded":
        raise click.ClickException(f"dead letter {dead_letter_id} was discarded")
    body = json.load(body_file) if body_file else dead_letters.original_body(row.body)
    if isinstance(body, bytes):
        raise click.ClickException(f"dead letter {dead_letter_id} was not JSON; give a corrected body with --body")
    task_id = str(uuid.uuid4())
    app.send_task(row.task_name, args=[body], queue=queue_for(row.task_name), task_id=task_id)
    dead_letters.set_status(dead_letter_id, "replayed")
    result = {"id": dead_letter_id, "task": row.task_name, "replayedAs": task_id}
    click.echo(json.dumps(result) if as_json else f"replayed dead letter {dead_letter_id} as {row.task_name} ({task_id})")


@dead_letters_group.command("discard")
@click.argument("dead_letter_id", type=int)
def dl_discard(dead_letter_id: int) -> None:
    """Mark a dead letter discarded: kept for the record, never replayed."""
    _row(dead_letter_id)
    dead_letters.set_status(dead_letter_id, "discarded")
    click.echo(f"discarded dead letter {dead_letter_id}")
