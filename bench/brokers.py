"""`python -m bench.brokers [--quick]`: end to end and latency on both brokers, one after the other
in one run, each with its own embedded PostgreSQL: the embedded Valkey, then a throwaway RabbitMQ
node (worker/local/rabbitmq_node.py). Writes its section at the end of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import payments
from bench.harness import ROOT, Environment

MARKER = "## Brokers side by side"


def measure(label: str, n_pay: int, n_inv: int, seconds: float, concurrency: int, database: str | None) -> list[str]:
    # Environment() writes the URLs it made into os.environ; each broker gets the given database
    # server, or an embedded one of its own.
    if database is None:
        os.environ.pop("DATABASE_URL", None)
    else:
        os.environ["DATABASE_URL"] = database
    env = Environment()
    try:
        server = env.broker_version()
        numbers = payments.setup_invoices(env, n_inv)
        e2e = payments.end_to_end(env, payments.payment_bodies(numbers, n_pay), concurrency)
        fast = payments.latency(env, numbers, 200, seconds, concurrency)
        half = payments.latency(env, numbers, 100, seconds, concurrency)
    finally:
        env.close()

    def lat(r: dict) -> str:
        missing = f", {r['missing']} late" if r["missing"] else ""
        return f"{r['p50']:.1f} / {r['p95']:.1f} / {r['p99']:.1f} ms{missing}"

    return [label, server, f"{e2e['rate']:.0f} msg/s", lat(fast), lat(half), f"{e2e['pss_mb']:.0f} MB"]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.brokers")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for development")
    args = parser.parse_args()
    n_pay, n_inv, seconds = (2000, 200, 5) if args.quick else (20_000, 2_000, 30)
    from worker.config import settings
    from worker.local.rabbitmq_node import RabbitNode, install

    concurrency = settings().worker_concurrency
    began = time.monotonic()
    saved = os.environ.pop("BROKER_URL", None)
    database = os.environ.get("DATABASE_URL")
    rows = [measure("Redis (embedded Valkey)", n_pay, n_inv, seconds, concurrency, database)]
    install()
    node = RabbitNode(Path(tempfile.mkdtemp(prefix="bench-rabbitmq-")))
    try:
        os.environ["BROKER_URL"] = node.start()
        rows.append(measure("RabbitMQ", n_pay, n_inv, seconds, concurrency, database))
    finally:
        node.stop()
        if saved is None:
            os.environ.pop("BROKER_URL", None)
        else:
            os.environ["BROKER_URL"] = saved
    header = (f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, worker concurrency "
              f"{concurrency}{' (quick run)' if args.quick else ''}; {n_pay:,} record_payment on {n_inv:,} invoices; "
              f"latency for {seconds} s at each rate (p50 / p95 / p99, publish to event received); "
              f"whole run {time.monotonic() - began:.0f} s.")
    table = ["| broker | server | end to end | latency at 200 msg/s | latency at 100 msg/s | worker PSS (end to end) |",
             "|---|---|---|---|---|---|", *(f"| {' | '.join(r)} |" for r in rows)]
    section = "\n".join([MARKER, "", "`python -m bench.brokers` (also `make bench-brokers`).", "", header, "", *table, ""])
    print(section)
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    kept = old[:old.index(MARKER)] if MARKER in old else old.rstrip("\n") + "\n\n"
    path.write_text(kept + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
