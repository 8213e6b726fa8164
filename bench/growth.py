"""The growth curve: end to end and latency with 10,000 / 100,000 / 1,000,000 invoices already there.

The invoices already there are what the worker leaves behind, not made through it: one template
invoice is made by the worker's own code (imported, then paid twice, in-process), and its rows in
every table (the invoice, its lines, payments, inbox records, history, outbox events, published)
are copied set-based inside PostgreSQL (INSERT … SELECT over generate_series) as many times as
wanted. Every key is made new for each copy: a uuid column becomes md5(old || copy number) (the
same value in every table, so the copies' foreign keys hold), an invoiceNumber, messageId or
causationId gets the copy number appended, identity and serial columns take their defaults.
"""

from __future__ import annotations

import time
from typing import Any

from bench import bulk_import, payments
from bench.harness import Environment

TEMPLATE = "GROW-T"
# The template's rows in each table, by the template invoice's id (%(id)s).
TABLES = {
    "invoices": "id = %(id)s",
    "line_items": "invoice_id = %(id)s",
    "payments": "invoice_id = %(id)s",
    "inbox": "invoice_id = %(id)s",
    "invoice_history": "invoice_id = %(id)s",
    "outbox": "invoice_id = %(id)s",
}
KEYED_TEXT = {"invoice_number", "message_id", "causation_id"}
CHUNK = 100_000


def template(env: Environment) -> Any:
    """The template invoice, made by the worker's code: imported (issued), then paid twice."""
    from messages.schemas import BulkImport, RecordPayment
    from tasks.payments import record_offline_payment
    from worker.delivery.handling import execute, parse
    from worker.storage.bulk_import import import_batch

    entry = {"invoiceNumber": TEMPLATE, "currency": "USD", "lineItems": [
        {"quantity": "1", "unitPrice": "60.00"}, {"quantity": "2", "unitPrice": "20.00"}]}
    execute("invoices.bulk_import", parse(BulkImport, {"messageId": "grow-template", "tenantId": "bench",
                                                       "batchId": "grow", "invoices": [entry]}), import_batch)
    for i in range(2):
        execute("invoices.record_payment", parse(RecordPayment, {
            "messageId": f"grow-pay-{i}", "tenantId": "bench", "invoiceNumber": TEMPLATE, "amount": "10.00",
            "currency": "USD", "paymentMethod": "EFT"}), record_offline_payment)
    env.sql("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
    return env.sql("SELECT id FROM invoices WHERE tenant_id = 'bench' AND invoice_number = %s", (TEMPLATE,))[0][0]


def _copy_statement(env: Environment, table: str) -> str:
    columns = env.sql("SELECT column_name, data_type, is_identity = 'YES' OR coalesce(column_default, '') LIKE 'nextval(%%' "
                      "FROM information_schema.columns "
                      "WHERE table_name = %s AND table_schema = current_schema() ORDER BY ordinal_position", (table,))
    names, values = [], []
    for name, kind, generated in columns:
        if generated:
            continue
        names.append(f'"{name}"')
        if kind == "uuid":
            values.append(f"md5(t.\"{name}\"::text || '-' || g)::uuid")
        elif name in KEYED_TEXT:
            values.append(f"t.\"{name}\" || '-' || g")
        else:
            values.append(f't."{name}"')
    return (f"INSERT INTO {table} ({', '.join(names)}) SELECT {', '.join(values)} FROM {table} AS t, "
            f"generate_series(%(first)s::int, %(last)s::int) AS g WHERE t.{TABLES[table]}")


def fill(env: Environment, template_id: Any, first: int, last: int) -> float:
    """Copies first..last of the template invoice (every table); seconds taken."""
    began = time.monotonic()
    statements = {table: _copy_statement(env, table) for table in TABLES}
    for start in range(first, last + 1, CHUNK):
        end = min(last, start + CHUNK - 1)
        for table, statement in statements.items():
            env.sql(statement, {"id": template_id, "first": start, "last": end})
    return time.monotonic() - began


def run(env: Environment, numbers: list[str], sizes: tuple[int, ...], n_pay: int, lat_seconds: float,
        concurrency: int, n_import: int) -> dict[str, Any]:
    """At each size: end to end (batching on) and latency at 200 msg/s; the bulk import into the
    empty database and into the largest."""
    empty_import = bulk_import.through_worker(env, n_import, concurrency, tenant="grow-import-empty")
    env.sql("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
    template_id = template(env)
    stages, present = [], 0
    for size in sizes:
        seconds = fill(env, template_id, present + 1, size)
        present = size
        e2e = payments.end_to_end(env, payments.payment_bodies(numbers, n_pay), concurrency)
        lat = payments.latency(env, numbers, 200, lat_seconds, concurrency)
        rows = {t: env.sql(f"SELECT count(*) FROM {t}")[0][0] for t in ("inbox", "invoice_history", "outbox")}
        stages.append({"size": size, "fill_seconds": seconds, "e2e": e2e, "lat": lat, "rows": rows})
        print(f"growth: {size:,} invoices (filled in {seconds:.0f} s): end to end {e2e['rate']:.0f} msg/s, "
              f"p99 at 200 msg/s {lat['p99']:.1f} ms; rows {rows}", flush=True)
    env.settle()
    full_import = bulk_import.through_worker(env, n_import, concurrency, tenant="grow-import-full")
    return {"stages": stages, "import_empty": empty_import, "import_full": full_import}
