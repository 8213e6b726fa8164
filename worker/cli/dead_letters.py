"""`invoice-worker dead-letters list|show|replay|discard`: the messages the worker could not apply."""

from __future__ import annotations

import json
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
    from worker.celery_app import publishing_app

    app = publishing_app()
    try:
        result = dead_letters.replay(dead_letter_id, app, json.load(body_file) if body_file else None)
    except dead_letters.NotReplayable as exc:
        raise click.ClickException(f"{exc}" + ("; give a corrected body with --body" if "not JSON" in str(exc) else
                                               "")) from None
    click.echo(json.dumps(result) if as_json else
               f"replayed dead letter {dead_letter_id} as {result['task']} ({result['replayedAs']})")


@dead_letters_group.command("discard")
@click.argument("dead_letter_id", type=int)
def dl_discard(dead_letter_id: int) -> None:
    """Mark a dead letter discarded: kept for the record, never replayed."""
    try:
        dead_letters.discard(dead_letter_id)
    except dead_letters.NotReplayable as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"discarded dead letter {dead_letter_id}")


def _filter_options(command: Any) -> Any:
    for option in reversed([
        click.option("--reason", help="Only this reason (malformed, retries-exhausted, ...)."),
        click.option("--task", help="Only this task name (invoices.record_payment, ...)."),
        click.option("--tenant", help="Only this tenant's."),
        click.option("--older-than", type=click.IntRange(min=0), help="Last seen at least this many minutes ago."),
        click.option("--newer-than", type=click.IntRange(min=0), help="Last seen at most this many minutes ago."),
        click.option("--yes", is_flag=True, help="Do not ask for confirmation."),
        click.option("--json", "as_json", is_flag=True),
    ]):
        command = option(command)
    return command


def _bulk(action: str, reason: str | None, task: str | None, tenant: str | None, older_than: int | None,
          newer_than: int | None, yes: bool, as_json: bool) -> None:
    selection = dead_letters.Filter("open", reason, task, tenant, older_than, newer_than)
    number, highest = dead_letters.count(selection)
    if number == 0:
        click.echo(json.dumps({"action": action, "done": [], "failed": {}}) if as_json else "no open dead letter matches")
        return
    if not yes:
        click.confirm(f"{action} {number} open dead letter{'s' if number != 1 else ''}?", abort=True, err=True)
    app = None
    if action == "replay":
        from worker.celery_app import publishing_app

        app = publishing_app()
    # Pinned to the rows counted: one dead-lettered meanwhile is not swept along unseen.
    result = dead_letters.bulk(dead_letters.Filter(**{**selection.__dict__, "up_to_id": highest}), action, app)
    if as_json:
        click.echo(json.dumps({"action": action, "done": result.done, "failed": result.failed}))
        return
    click.echo(f"{action}ed {len(result.done)} dead letter{'s' if len(result.done) != 1 else ''}")
    for dead_letter_id, problem in result.failed.items():
        click.echo(f"  {dead_letter_id}: {problem}", err=True)


@dead_letters_group.command("replay-all")
@_filter_options
def dl_replay_all(**options: Any) -> None:
    """Replay every open dead letter the filter selects (asks first, stating how many)."""
    _bulk("replay", **options)


@dead_letters_group.command("discard-all")
@_filter_options
def dl_discard_all(**options: Any) -> None:
    """Discard every open dead letter the filter selects (asks first, stating how many)."""
    _bulk("discard", **options)
