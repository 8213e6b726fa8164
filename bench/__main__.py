"""`make bench` (python -m bench [--quick]): one run, every figure side by side, into BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone

import psutil

from bench import (batch_ceiling, bulk_import, console, growth, metrics_cost, payments, pruning, relay_cpu,
                   task_events_cost, tracing_cost, under_load)
from bench.harness import ROOT, Environment
from worker.config import settings


def versions(env: Environment) -> str:
    import celery
    import sqlalchemy

    pg = env.sql("SHOW server_version")[0][0]
    server = env.broker_version()
    return (f"Python {platform.python_version()}, PostgreSQL {pg}, {server}, Celery {celery.__version__}, "
            f"SQLAlchemy {sqlalchemy.__version__}")


def profile(numbers: list[str]) -> str:
    """Where the time of record_payment goes, in-process (pyinstrument): 10 batches of 100 messages,
    as a pool process applies them with batching on."""
    import json

    from pyinstrument import Profiler

    import tasks.payments  # noqa: F401 - registers the batchable tasks
    from worker.delivery.batching import Entry, apply_batch

    batches = [[Entry("invoices.record_payment", f"profile-{i}", json.dumps([[body], {}, {}]), "application/json",
                      "utf-8", {}) for i, body in enumerate(payments.payment_bodies(numbers, 100))] for _ in range(10)]
    profiler = Profiler(interval=0.0005)
    profiler.start()
    for batch in batches:
        apply_batch(batch)
    profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    return "\n".join(line for line in text.splitlines()[6:60] if line.strip())


def memory(part: dict) -> str:
    return f"PSS {part['pss_mb']:.0f} MB (RSS sum {part['rss_mb']:.0f})"


class Rows(list):
    """The table, printed row by row as the parts finish."""

    def append(self, row: tuple[str, str, str]) -> None:
        super().append(row)
        print(" | ".join(row), flush=True)



def means(side_by_side: dict) -> tuple[float, float]:
    """The mean rate off and on of a side-by-side measurement (rounds alternating off and on)."""
    return tuple(sum(side_by_side[k]) / len(side_by_side[k]) for k in ("off", "on"))


def rounds(side_by_side: dict) -> str:
    return (f"rounds off {', '.join(f'{r:.0f}' for r in side_by_side['off'])}, "
            f"on {', '.join(f'{r:.0f}' for r in side_by_side['on'])}")

def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for development")
    args = parser.parse_args()
    n_pay = 2000 if args.quick else 20_000
    n_inv = 200 if args.quick else 2_000
    n_import = 10_000 if args.quick else 100_000
    lat_seconds = 5 if args.quick else 30
    concurrency = settings().worker_concurrency
    began = time.monotonic()
    env = Environment()
    rows = Rows()
    try:
        numbers = payments.setup_invoices(env, n_inv)
        a = payments.ceiling_a(env, n_pay, concurrency)
        rows.append(("A: no-op Celery task", f"{a['rate']:.0f} msg/s", f"worker {memory(a)}"))
        b = payments.ceiling_b(env, numbers, 10 if not args.quick else 3)
        rows.append(("B: record_payment's SQL, tight psycopg loop", f"{b['rate']:.0f} tx/s",
                     f"{b['statements']} statements per transaction"))
        b100 = batch_ceiling.run(env, numbers, concurrency, 10 if not args.quick else 3)
        rows.append((f"B₁₀₀: one batch of 100 record_payment's SQL, tight psycopg loop, {concurrency} connections",
                     f"{b100['rate']:.0f} msg/s", f"{b100['batches']:.1f} batches/s, {b100['statements']} statements "
                     f"and COMMIT per batch (bench/batch_ceiling.py); PostgreSQL's CPU per message "
                     f"{b100['postgres_cpu_us']:.0f} µs"))
        costs = batch_ceiling.cost_by_size(numbers)
        rows.append(("a record_payment batch's CPU by size, in-process (apply_batch, as a pool process runs it)",
                     " / ".join(f"{ms:.1f}" for ms in costs.values()) + " ms",
                     "batches of " + " / ".join(str(size) for size in costs) + " messages; per message "
                     + " / ".join(f"{ms / size * 1000:.0f}" for size, ms in costs.items()) + " µs"))
        off, on = {"APPLY_BATCH_SIZE": "1"}, {}
        bodies = payments.payment_bodies(numbers, n_pay)
        e2e_off = payments.end_to_end(env, bodies, concurrency, off)
        rows.append((f"end to end, batching off (APPLY_BATCH_SIZE=1): {n_pay:,} record_payment on {n_inv:,} invoices",
                     f"{e2e_off['rate']:.0f} msg/s", f"{e2e_off['rate'] / a['rate']:.0%} of A, "
                     f"{e2e_off['rate'] / b['rate']:.0%} of B; worker {memory(e2e_off)}"))
        bodies = payments.payment_bodies(numbers, n_pay)
        e2e = payments.end_to_end(env, bodies, concurrency, on)
        rows.append((f"end to end, batching on (APPLY_BATCH_SIZE={settings().apply_batch_size}, "
                     f"APPLY_BATCH_WAIT_MS={settings().apply_batch_wait_ms:g})", f"{e2e['rate']:.0f} msg/s",
                     f"{e2e['rate'] / a['rate']:.0%} of A, {e2e['rate'] / b100['rate']:.0%} of B₁₀₀, "
                     f"{e2e['rate'] / e2e_off['rate']:.1f}× batching off; "
                     f"worker {memory(e2e)}; CPU per message, µs {payments.cpu_split(e2e)}"))
        n_scale = max(n_pay // 4, 2000)
        for processes in (1, 2, 3, 4):
            scaled = payments.end_to_end(env, payments.payment_bodies(numbers, n_scale), processes, on)
            rows.append((f"  scaling, batching on: {processes} pool process{'es' if processes > 1 else ''}, "
                         f"{n_scale:,} messages", f"{scaled['rate']:.0f} msg/s",
                         f"{scaled['rate'] / a['rate']:.0%} of A; worker {memory(scaled)}"))
        two = payments.end_to_end(env, payments.payment_bodies(numbers, n_scale), 2, on, nodes=2)
        rows.append((f"  scaling, batching on: two worker nodes of 2 pool processes, {n_scale:,} messages",
                     f"{two['rate']:.0f} msg/s", f"{two['rate'] / a['rate']:.0%} of A; workers {memory(two)}"))
        n_cost = min(n_pay, 10_000)
        cost = metrics_cost.side_by_side(env, lambda: payments.payment_bodies(numbers, n_cost), concurrency)
        m_off, m_on = means(cost)
        rows.append((f"end to end, metrics off / on (scraped every second): {n_cost:,} record_payment, "
                     f"{len(cost['off'])} rounds each", f"{m_off:.0f} / {m_on:.0f} msg/s",
                     f"{rounds(cost)}; counting one message: {cost['pool_us']:.1f} µs "
                     f"in its pool process (multiprocess files, what the worker does), {cost['main_us']:.1f} µs "
                     f"if the main process counted (parsing the result's repr)"))
        events = task_events_cost.side_by_side(env, lambda: payments.payment_bodies(numbers, n_cost), concurrency)
        e_off, e_on = means(events)
        rows.append((f"end to end, batching on, task events off / on (a Celery event receiver listening, as Flower): "
                     f"{n_cost:,} record_payment, {len(events['off'])} rounds each", f"{e_off:.0f} / {e_on:.0f} msg/s",
                     f"events on cost {1 - e_on / e_off:.0%}; {rounds(events)}; task-succeeded events received per message: "
                     f"{events['succeeded_per_message']:.2f}; the worker's CPU per message off / on "
                     f"{events['cpu_off_us']:.0f} / {events['cpu_on_us']:.0f} µs; in-process, a message's three events cost "
                     f"{events['events_us']:.0f} µs of CPU (its place in Celery's worker state, in both, "
                     f"{events['state_us']:.1f} µs)"))
        traced = tracing_cost.side_by_side(env, lambda: payments.payment_bodies(numbers, n_cost), concurrency)
        t_off, t_on = means(traced)
        rows.append((f"end to end, batching on, tracing off / on (OpenTelemetry, every span to the console exporter "
                     f"into the worker's log): {n_cost:,} record_payment, {len(traced['off'])} rounds each",
                     f"{t_off:.0f} / {t_on:.0f} msg/s",
                     f"tracing on costs {1 - t_on / t_off:.0%}; {rounds(traced)}; the worker's CPU per message off / on "
                     f"{traced['cpu_off_us']:.0f} / {traced['cpu_on_us']:.0f} µs; in-process, a batched message's "
                     f"tracing hooks cost {traced['hooks_off_us']:.1f} µs off, {traced['hooks_on_us']:.0f} µs on "
                     f"(in-memory exporter)"))
        for rate, worker_env, label in ((200, off, "batching off"), (200, on, "batching on"), (400, on, "batching on")):
            lat = payments.latency(env, numbers, rate, lat_seconds, concurrency, worker_env)
            rows.append((f"latency at {rate} msg/s for {lat_seconds} s, {label}", f"p50 {lat['p50']:.1f} ms",
                         f"p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms ({lat['count']} events"
                         f"{', ' + str(lat['missing']) + ' not within 60 s' if lat['missing'] else ''}); commit to "
                         f"publish p50 {lat['commit_to_publish_p50']:.1f} ms, p99 {lat['commit_to_publish_p99']:.1f} ms; "
                         f"{payments.slowest(lat)}; "
                         f"worker+relay {memory(lat)}"))
        for worker_env, label in ((off, "batching off"), (on, "batching on")):
            dup = payments.duplicates(env, bodies, concurrency, worker_env)
            rows.append((f"duplicates, {label}: the same {n_pay:,} again", f"{dup['rate']:.0f} msg/s",
                         f"{dup['rate'] / a['rate']:.0%} of A; worker {memory(dup)}"))
        n_hot = 1000 if args.quick else 5000
        hot = payments.hot_invoice(env, numbers, n_hot, concurrency)
        rows.append((f"hot invoice, batching on: {n_hot:,} payments to one invoice / the same over {n_inv:,} invoices",
                     f"{hot['hot']['rate']:.0f} / {hot['spread']['rate']:.0f} msg/s",
                     f"{hot['hot']['rate'] / hot['spread']['rate']:.0%} of spread; every payment applied once: "
                     f"{'yes' if hot['checks']['applied once'] else 'NO'}, event sequence gap-free: "
                     f"{'yes' if hot['checks']['gap-free'] else 'NO'}"))
        relayed = relay_cpu.run(env, 2000 if args.quick else 20_000)
        one, many = relayed["one publish per event"], relayed["pipelined batches"]
        rows.append((f"relay alone, {many['events']:,} events: one publish per event / pipelined batches",
                     f"{one['cpu_us']:.0f} / {many['cpu_us']:.0f} µs CPU per event",
                     f"{one['rate']:.0f} / {many['rate']:.0f} events/s; pipelined {one['cpu_us'] / many['cpu_us']:.1f}× "
                     f"less CPU per event (the relay's process, in the bench)"))
        imp = bulk_import.run(env, n_import, concurrency)
        rows.append((f"bulk import: {n_import:,} invoices × 3 lines, through the worker",
                     f"{imp['worker']['rate']:.0f} invoices/s",
                     f"{imp['ratio']:.0%} of raw COPY; worker {memory(imp['worker'])}"))
        rows.append(("bulk import: raw COPY of the same rows", f"{imp['copy']['rate']:.0f} invoices/s", ""))
        prune_rows = 100_000 if args.quick else 1_000_000
        for row in pruning.rows_of(pruning.run(env, numbers, prune_rows, 100, lat_seconds, concurrency), 100,
                                   lat_seconds):
            rows.append(row)
        for row in console.rows_of(console.run(env, 100_000, 50 if args.quick else 200, concurrency)):
            rows.append(row)
        load = under_load.run(env, numbers, 1000 if args.quick else 4000, concurrency)
        where = profile(numbers)
        sizes = (10_000, 50_000) if args.quick else (10_000, 100_000, 1_000_000)
        # Last: the rows it adds would weigh on every part after it.
        grown = growth.run(env, numbers, sizes, n_pay, lat_seconds, concurrency, n_import)
        first = grown["stages"][0]
        for stage in grown["stages"]:
            rows.append((f"growth: {stage['size']:,} invoices already there ({stage['rows']['inbox']:,} inbox, "
                         f"{stage['rows']['invoice_history']:,} history, {stage['rows']['outbox']:,} outbox rows), "
                         f"{n_pay:,} record_payment, batching on", f"{stage['e2e']['rate']:.0f} msg/s",
                         f"{stage['e2e']['rate'] / first['e2e']['rate']:.0%} of the rate at {first['size']:,}; at 200 "
                         f"msg/s p50 {stage['lat']['p50']:.1f} ms, p99 {stage['lat']['p99']:.1f} ms ({payments.slowest(stage['lat'])})"))
        empty, full = grown["import_empty"], grown["import_full"]
        rows.append((f"growth: bulk import of {n_import:,} invoices with {sizes[-1]:,} already there / before the "
                     f"copies (the bench's database as the earlier parts left it)",
                     f"{full['rate']:.0f} / {empty['rate']:.0f} invoices/s", f"{full['rate'] / empty['rate']:.0%} of "
                     f"the rate before; worker {memory(full)}"))
    finally:
        env.close()
    total = time.monotonic() - began
    write(rows, load, where, total, args.quick, concurrency)
    return 0


def write(rows: list[tuple[str, str, str]], load: list[tuple[str, str, str]], where: str, total: float, quick: bool,
          concurrency: int) -> None:
    ram = psutil.virtual_memory().total / 2**30
    header = (f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, {ram:.0f} GiB, "
              f"worker concurrency {concurrency}{' (quick run)' if quick else ''}; whole run {total:.0f} s.")
    table = ["| part | result | beside it |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    print(header)
    print("\n".join(table))
    text = ["# Benchmarks", "", "`make bench` writes this file. Targets (reported, never asserted; issue #14): end "
            "to end at least 100% of A; p99 at most 50 ms at 200 msg/s and at most 100 ms at 400 msg/s; duplicates at "
            "least 150% of A; bulk import at least 40% of raw COPY with worker memory under 300 MB. Issue #29: end to "
            "end at least 50% of B₁₀₀; a hot invoice at least 50% of the spread rate, every payment applied once, "
            "the sequence gap-free; with 1,000,000 invoices already there, end to end at least 80% of the rate at "
            "10,000 and p99 at most 50 ms, the bulk import at least 80% of its rate into an empty database; bulk "
            "import at least 65% of raw COPY. A is Celery's own "
            "ceiling on this machine: a no-op task through the same worker, broker and transport. Memory is the peak PSS summed over the worker's "
            "processes (a page the pool children share with the main process counts once); the RSS sum beside "
            "it counts shared pages in every process.", "", header, "", *table, "",
            "## Where the time goes under load (py-spy, record_payment through the worker, batching on, relay beside it)", "",
            "Shares of the pool processes' samples; a stop counts every sample taken inside it." if load else
            "py-spy is not installed (pip install '.[bench]').", "",
            *(["| stop | share | note |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in load] if load else []),
            "", "## record_payment in batches in detail (in-process, pyinstrument, 10 batches of 100)", "", "```", where, "```", ""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text) + kept_brokers_section())


def kept_brokers_section() -> str:
    """`python -m bench.brokers` writes its section at the end of BENCHMARKS.md; a full run keeps it."""
    from bench.brokers import MARKER

    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    return old[old.index(MARKER):] if MARKER in old else ""


if __name__ == "__main__":
    sys.exit(main())
