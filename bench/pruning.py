"""Pruning a million inbox rows (housekeeping.prune, as invoices.prune_records runs it) while
record_payment messages arrive at a steady rate: latency beside the pruning against latency
without it, in the same run."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from bench.harness import Environment
from bench.payments import latency


def seed(env: Environment, rows: int) -> float:
    """`rows` inbox rows 40 days old, of a task whose rows may go; returns the seconds it took."""
    began = time.monotonic()
    env.sql("INSERT INTO inbox (tenant_id, message_id, task, outcome, processed_at) "
            "SELECT 'bench-prune', 'm-' || g, 'invoices.record_payment', 'applied', now() - interval '40 days' "
            "FROM generate_series(1, %s) g", (rows,))
    env.sql("VACUUM ANALYZE inbox")
    return time.monotonic() - began


def run(env: Environment, numbers: list[str], rows: int, rate: int, seconds: float, concurrency: int) -> dict[str, Any]:
    from worker.storage import housekeeping

    seed(env, rows)
    without = latency(env, numbers, rate, seconds, concurrency)
    timings: list[float] = []
    result: dict[str, Any] = {}

    def prune() -> None:
        began = time.monotonic()
        cutoff = datetime.now(timezone.utc) - timedelta(days=30)
        result["pruned"] = housekeeping.prune("inbox", cutoff, timings=timings)
        result["seconds"] = time.monotonic() - began

    pruner = threading.Thread(target=prune)
    pruner.start()
    during = latency(env, numbers, rate, seconds, concurrency)
    pruner.join()
    timings.sort()
    return {"without": without, "during": during, "pruned": result["pruned"], "seconds": result["seconds"],
            "batches": len(timings), "batch_p50_ms": timings[len(timings) // 2] * 1000,
            "batch_max_ms": timings[-1] * 1000, "left": env.sql(
                "SELECT count(*) FROM inbox WHERE tenant_id = 'bench-prune'")[0][0]}


def rows_of(part: dict[str, Any], rate: int, seconds: float) -> list[tuple[str, str, str]]:
    w, d = part["without"], part["during"]
    return [
        (f"latency at {rate} msg/s for {seconds:.0f} s, no pruning", f"p50 {w['p50']:.1f} ms",
         f"p95 {w['p95']:.1f} ms, p99 {w['p99']:.1f} ms ({w['count']} events)"),
        (f"the same while {part['pruned']:,} inbox rows are pruned", f"p50 {d['p50']:.1f} ms",
         f"p95 {d['p95']:.1f} ms, p99 {d['p99']:.1f} ms ({d['count']} events); pruning took {part['seconds']:.1f} s in "
         f"{part['batches']:,} batches (p50 {part['batch_p50_ms']:.1f} ms, max {part['batch_max_ms']:.1f} ms)"),
    ]
