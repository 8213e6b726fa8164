"""`invoice-worker import FILE`: send a file of invoices as bulk_import batches, with a progress
bar, wait for their outcomes and report the totals and every rejected entry."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker.cli.import_file import read
from worker.cli.output import console

COUNTS = ("created", "updated", "unchanged", "deactivated", "rejected")


@dataclass
class SentBatch:
    tenant_id: str
    message_id: str
    batch_id: str
    lines: list[int]  # the file line of each entry, by index


@dataclass
class Report:
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    problems: list[str] = field(default_factory=list)


def batches(lines: Any, default_tenant: str | None, size: int, report: Report) -> Any:
    """Group entries into batches of one tenant. Unreadable lines, and an invoice number that the
    file already had, go to the report (a repeated number is rejected, not silently merged)."""
    tenant, entries, numbers = None, [], []
    first_line: dict[tuple[str, str], int] = {}

    def reject(line: int, problem: str) -> None:
        report.problems.append(f"line {line}: {problem}")
        report.totals["rejected"] += 1

    for item in lines:
        if item.error:
            reject(item.line, item.error)
            continue
        entry = dict(item.entry)
        row_tenant = entry.pop("tenantId", None)
        if default_tenant and row_tenant and row_tenant != default_tenant:
            reject(item.line, f"the row names tenant {row_tenant!r}; this import is for --tenant {default_tenant!r}")
            continue
        entry_tenant = row_tenant or default_tenant
        if not entry_tenant:
            reject(item.line, "no tenantId (give --tenant or a tenantId column)")
            continue
        key = (entry_tenant, str(entry.get("invoiceNumber")))
        if entry.get("invoiceNumber") is not None and key in first_line:
            report.problems.append(f"line {item.line} ({key[1]}): duplicate-in-file: the invoice number is already "
                                   f"on line {first_line[key]}")
            report.totals["rejected"] += 1
            continue
        first_line.setdefault(key, item.line)
        if entries and (entry_tenant != tenant or len(entries) >= size):
            yield tenant, entries, numbers
            entries, numbers = [], []
        tenant = entry_tenant
        entries.append(entry)
        numbers.append(item.line)
    if entries:
        yield tenant, entries, numbers


def message_id_for(tenant: str, entries: list[dict[str, Any]]) -> str:
    """The same batch of the same file is the same message: re-running an import is harmless."""
    digest = hashlib.sha256(json.dumps([tenant, entries], sort_keys=True).encode()).hexdigest()
    return f"import-{digest[:40]}"


def validate_only(tenant: str, entries: list[dict[str, Any]], lines: list[int], report: Report) -> None:
    from datetime import datetime, timezone

    from worker.storage.bulk_import import Batch, validate

    batch = Batch(tenant, "dry-run", "dry-run", datetime.now(timezone.utc))
    validate(tenant, entries, batch.now, batch)
    report.totals["created"] += len(batch.entries)  # valid: would be created or compared with what exists
    report.totals["rejected"] += len(batch.rejected)
    _report_rejected(batch.rejected, lines, report)


def _report_rejected(rejected: list[dict[str, Any]], lines: list[int], report: Report) -> None:
    for r in rejected:
        report.problems.append(f"line {lines[r['index']]} ({r['invoiceNumber'] or 'no invoiceNumber'}): "
                               f"{r['reason']}: {r['message']}")


def recorded_outcome(batch: SentBatch) -> dict[str, Any] | None:
    """The batch's outcome as the worker recorded it in the inbox (counts and rejected entries)."""
    from worker.storage import db
    from worker.storage.records import InboxMessage

    with db.sessions()() as session:
        row = session.get(InboxMessage, (batch.tenant_id, batch.message_id))
        return row.result if row is not None and row.result else None


def add_outcome(result: dict[str, Any], batch: SentBatch, report: Report, *, earlier: bool = False) -> None:
    """Count a batch's outcome. A batch imported by an earlier run changed nothing now: its entries
    count as unchanged, and its rejected entries are rejected still."""
    counts = result.get("counts", {})
    for name in COUNTS:
        target = "unchanged" if earlier and name != "rejected" else name
        report.totals[target] += counts.get(name, 0)
    _report_rejected(result.get("rejected", []), batch.lines, report)


def wait_for_outcomes(sent: list[SentBatch], report: Report, timeout: float) -> list[SentBatch]:
    """Wait until the worker has recorded every batch's outcome; return those still missing."""
    pending = list(sent)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        still = []
        for batch in pending:
            result = recorded_outcome(batch)
            if result is None:
                still.append(batch)
            else:
                add_outcome(result, batch, report)
        pending = still
        if pending:
            time.sleep(0.2)
    return pending


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tenant", help="The tenant of every invoice (else a tenantId column or field per invoice).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), help="Invoices per message (default IMPORT_BATCH_SIZE).")
@click.option("--dry-run", is_flag=True, help="Validate the file without sending anything.")
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for the outcomes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_command(path: Path, tenant: str | None, batch_size: int | None, dry_run: bool, timeout: float,
                   as_json: bool) -> None:
    """Send FILE (JSON lines, or CSV with one row per line item) as bulk_import batches."""
    from worker.brokers.topology import queue_for
    from worker.celery_app import publishing_app
    from worker.config import settings

    dry = dry_run
    size = batch_size or settings().import_batch_size
    app = None if dry else publishing_app()
    report, sent, invoices = Report(), [], 0
    started = time.monotonic()
    out = console()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} invoices/s"), TimeElapsedColumn(), console=out,
                  disable=as_json, transient=False) as progress:
        task = progress.add_task("validating" if dry else "sending", total=None, rate="0")
        for tenant_id, entries, lines in batches(read(path), tenant, size, report):
            if dry:
                validate_only(tenant_id, entries, lines, report)
            else:
                batch = SentBatch(tenant_id, message_id_for(tenant_id, entries), f"{path.name}:{lines[0]}-{lines[-1]}",
                                  lines)
                earlier = recorded_outcome(batch)
                if earlier is not None:  # the same batch was imported before: nothing to send
                    add_outcome(earlier, batch, report, earlier=True)
                else:
                    body = {"messageId": batch.message_id, "tenantId": tenant_id, "batchId": batch.batch_id,
                            "invoices": entries}
                    app.send_task("invoices.bulk_import", args=[body], queue=queue_for("invoices.bulk_import"))
                    sent.append(batch)
            invoices += len(entries)
            progress.update(task, completed=invoices, rate=f"{invoices / max(time.monotonic() - started, 1e-6):.0f}")
        if not dry:
            progress.update(task, description="waiting for the worker")
            missing = wait_for_outcomes(sent, report, timeout)
            if missing:
                report.problems.append(f"{len(missing)} batches had no outcome within {timeout:.0f}s; "
                                       "run the same command again later: finished batches count as duplicates")
    elapsed = time.monotonic() - started
    _print(report, invoices, elapsed, dry, as_json)
    if report.problems:
        raise SystemExit(1)


def _print(report: Report, invoices: int, elapsed: float, dry: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"invoices": invoices, "seconds": round(elapsed, 3), "dryRun": dry,
                               "totals": report.totals, "problems": report.problems}))
        return
    verb = "validated" if dry else "imported"
    click.echo(f"{verb} {invoices} invoices in {elapsed:.1f}s ({invoices / max(elapsed, 1e-6):.0f}/s)")
    if dry:
        click.echo(f"valid: {report.totals['created']}  rejected: {report.totals['rejected']}")
    else:
        click.echo("  ".join(f"{name}: {count}" for name, count in report.totals.items()))
    for problem in report.problems:
        click.echo(problem)
