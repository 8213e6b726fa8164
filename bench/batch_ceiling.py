"""Ceiling B₁₀₀: the database's own limit for record_payment in batches of 100.

The statements one batch of 100 record_payment runs, as a pool process runs them (captured from
SQLAlchemy at the cursor: claim, load and lock, the payments' ids, the payments, the invoices,
the outcomes, the outbox, the history, COMMIT), replayed in a tight psycopg loop with no Celery and
no ORM, on as many connections (processes) as the worker has pool processes, each on invoices of
its own (as the worker's batches mostly are). Each round gets fresh messageIds, event ids and
payment ids, and the invoices' version checks follow the versions it wrote. End to end as a share
of B₁₀₀ says how much of the database's limit the worker reaches.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import uuid
from typing import Any

import psycopg

from bench.harness import Environment, ServerCpu
from bench.payments import fresh_value, payment_bodies

Statement = tuple[str, Any, bool]  # statement, parameters, executemany


def capture(numbers: list[str], size: int) -> list[Statement]:
    """The statements of one batch of `size` record_payment on these invoices, as apply_batch runs them."""
    from sqlalchemy import event

    import tasks.payments  # noqa: F401 - registers the batchable tasks
    from worker.delivery.batching import ACK, Entry, apply_batch
    from worker.storage import db

    captured: list[Statement] = []

    def keep(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        captured.append((statement, params, executemany))

    entries = [Entry("invoices.record_payment", f"b100-{i}", json.dumps([[body], {}, {}]), "application/json", "utf-8", {})
               for i, body in enumerate(payment_bodies(numbers, size))]
    engine = db.engine()
    event.listen(engine, "before_cursor_execute", keep)
    try:
        actions = apply_batch(entries)
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    assert actions == [ACK] * size, "the captured batch did not apply whole"
    return captured


def _replay(libpq: str, statements: list[Statement], invoices: dict[Any, int], seconds: float, start: Any,
            done: Any) -> None:
    versions = dict(invoices)
    keep = set(invoices)
    rounds = 0
    with psycopg.connect(libpq) as conn:
        start.wait()
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            mapping: dict[Any, Any] = {}
            for statement, params, many in statements:
                if many and isinstance(params, (list, tuple)):  # executemany (the multi-row INSERTs are one execute)
                    rows = [{k: fresh_value(v, mapping, keep) for k, v in p.items()} for p in params]
                    for row in rows:
                        if "invoices_version" in row:  # the version check of the invoice's UPDATE
                            current = versions[row["invoices_id"]]
                            row["invoices_version"], row["version"] = current, current + 1
                            versions[row["invoices_id"]] = current + 1
                    with conn.cursor() as cursor:
                        cursor.executemany(statement, rows)
                elif statement.strip().upper() == "COMMIT":
                    continue
                else:
                    if isinstance(params, dict):
                        params = {k: fresh_value(v, mapping, keep) for k, v in params.items()}
                        if "invoices_version" in params:
                            current = versions[params["invoices_id"]]
                            params["invoices_version"], params["version"] = current, current + 1
                            versions[params["invoices_id"]] = current + 1
                    conn.execute(statement, params or None, prepare=True)
            conn.commit()
            rounds += 1
        done.put((rounds, time.monotonic() - began))


def run(env: Environment, numbers: list[str], connections: int, seconds: float, size: int = 100) -> dict[str, float]:
    """Batches of `size` per second over `connections` connections, and messages per second."""
    plans = []
    for k in range(connections):
        own = numbers[k::connections][:size]
        statements = capture(own, size)
        ids = env.sql("SELECT id, version FROM invoices WHERE tenant_id = 'bench' AND invoice_number = ANY(%s)", (own,))
        plans.append((statements, dict(ids)))
    context = multiprocessing.get_context("fork")
    start, done = context.Event(), context.Queue()
    procs = [context.Process(target=_replay, args=(env.libpq, statements, invoices, seconds, start, done))
             for statements, invoices in plans]
    for proc in procs:
        proc.start()
    with ServerCpu(env) as servers:
        start.set()
        results = [done.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join(30)
    rate = sum(rounds / elapsed for rounds, elapsed in results)
    messages = sum(rounds for rounds, _ in results) * size
    return {"batches": rate, "rate": rate * size, "statements": len(plans[0][0]),
            "postgres_cpu_us": servers.seconds["postgres"] / messages * 1e6}


def cost_by_size(numbers: list[str], sizes: tuple[int, ...] = (1, 2, 10, 100), messages: int = 600) -> dict[int, float]:
    """CPU per batch of record_payment (ms), in-process as a pool process applies it (apply_batch),
    for each batch size: what a batch costs whatever it holds (its statements, its transaction)
    against what each message adds. At a low rate the batches hold a message or two, and each pays
    the whole fixed part."""
    import tasks.payments  # noqa: F401 - registers the batchable tasks
    from worker.delivery.batching import Entry, apply_batch

    costs = {}
    bodies = payment_bodies(numbers, messages * len(sizes) + max(sizes))
    for size in sizes:
        batches = [[Entry("invoices.record_payment", f"cost-{uuid.uuid4()}", json.dumps([[body], {}, {}]),
                          "application/json", "utf-8", {}) for body in bodies[start:start + size]]
                   for start in range(0, messages + size, size)]
        del bodies[:messages + size]
        apply_batch(batches[0])  # warm: statements compiled, the connection made
        began = time.process_time()
        for batch in batches[1:]:
            apply_batch(batch)
        costs[size] = (time.process_time() - began) / (len(batches) - 1) * 1000
    return costs
