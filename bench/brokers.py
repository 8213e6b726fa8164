"""`python -m bench.brokers [--quick]`: end to end and latency on both brokers, one after the other
in one run, each with its own embedded PostgreSQL: the embedded Valkey, then a throwaway RabbitMQ
node (worker/local/rabbitmq_node.py), with classic queues and then with quorum queues
(RABBITMQ_QUEUE_TYPE). Beside each, the bench's publisher alone (no worker running; RabbitMQ with
pipelined confirms), which must stay well above end to end. Writes its section at the end of BENCHMARKS.md."""

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


def measure(label: str, n_pay: int, n_inv: int, seconds: float, concurrency: int, database: str | None) -> dict:
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
        alone = payments.publish_alone(env, payments.payment_bodies(numbers, n_pay))
        e2e = payments.end_to_end(env, payments.payment_bodies(numbers, n_pay), concurrency)
        fast = payments.latency(env, numbers, 200, seconds, concurrency)
        half = payments.latency(env, numbers, 100, seconds, concurrency)
    finally:
        env.close()
    print(f"{label}: end to end {e2e['rate']:.0f} msg/s, publisher alone {alone:.0f} msg/s, p99 at 200 msg/s "
          f"{fast['p99']:.1f} ms", flush=True)
    return {"label": label, "server": server, "alone": alone, "e2e": e2e, "fast": fast, "half": half}


def row(result: dict, valkey: dict) -> list[str]:
    def lat(r: dict) -> str:
        missing = f", {r['missing']} late" if r["missing"] else ""
        return f"{r['p50']:.1f} / {r['p95']:.1f} / {r['p99']:.1f} ms{missing} ({payments.slowest(r)})"

    e2e = result["e2e"]
    share = "" if result is valkey else f" ({e2e['rate'] / valkey['e2e']['rate']:.0%} of Valkey's)"
    return [result["label"], result["server"], f"{e2e['rate']:.0f} msg/s{share}",
            f"{result['alone']:.0f} msg/s ({result['alone'] / e2e['rate']:.1f}× end to end)",
            lat(result["fast"]), lat(result["half"]), payments.cpu_split(e2e), f"{e2e['pss_mb']:.0f} MB"]



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
    results = [measure("Redis (embedded Valkey)", n_pay, n_inv, seconds, concurrency, database)]
    install()
    queue_type = os.environ.get("RABBITMQ_QUEUE_TYPE")
    try:
        for kind in ("classic", "quorum"):  # a node each: queues of one name cannot change their type
            os.environ["RABBITMQ_QUEUE_TYPE"] = kind
            node = RabbitNode(Path(tempfile.mkdtemp(prefix="bench-rabbitmq-")))
            try:
                os.environ["BROKER_URL"] = node.start()
                results.append(measure(f"RabbitMQ, {kind} queues", n_pay, n_inv, seconds, concurrency, database))
            finally:
                node.stop()
    finally:
        for name, value in (("BROKER_URL", saved), ("RABBITMQ_QUEUE_TYPE", queue_type)):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    rows = [row(result, results[0]) for result in results]
    header = (f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, worker concurrency "
              f"{concurrency}{' (quick run)' if args.quick else ''}; {n_pay:,} record_payment on {n_inv:,} invoices; "
              f"latency for {seconds} s at each rate (p50 / p95 / p99, publish to event received); "
              f"whole run {time.monotonic() - began:.0f} s.")
    table = ["| broker | server | end to end | the bench's publisher alone | latency at 200 msg/s | latency at 100 msg/s "
             "| CPU per message, µs (end to end) | worker PSS (end to end) |", "|---|---|---|---|---|---|---|---|", *(f"| {' | '.join(r)} |" for r in rows)]
    goals = ("Targets (issue #29, reported, never asserted): RabbitMQ end to end at least 90% of Valkey's on classic "
             "and on quorum queues; p99 at 200 msg/s at most 50 ms on both brokers; the bench's publisher alone at "
             "least 3× end to end.")
    section = "\n".join([MARKER, "", "`python -m bench.brokers` (also `make bench-brokers`).", "", goals, "", header, "",
                         *table, ""])
    print(section)
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    kept = old[:old.index(MARKER)] if MARKER in old else old.rstrip("\n") + "\n\n"
    path.write_text(kept + section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
