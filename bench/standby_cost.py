"""What the synchronous standby costs (`python -m bench.standby_cost`, SCALING.md): record_payment
end to end (batching on) and latency at a steady rate, on one Patroni cluster on loopback
(worker/local/pg_cluster.py), first with its synchronous standby streaming (every commit waits
for the standby's flush), then with the standby stopped (the primary commits alone), in one run.
The same server, the same TCP connections and settings; only the standby differs."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Environment
from bench.payments import end_to_end, latency, payment_bodies, setup_invoices


def measure(label: str, count: int, rate: int, seconds: float, concurrency: int) -> dict:
    env = Environment()
    try:
        numbers = setup_invoices(env, 2000)
        e2e = end_to_end(env, payment_bodies(numbers, count), concurrency)
        lat = latency(env, numbers, rate, seconds, concurrency)
        return {"label": label, "rate": e2e["rate"], "p50": lat["p50"], "p99": lat["p99"], "missing": lat["missing"]}
    finally:
        env.close()


def synchronous_names(cluster) -> str:  # noqa: ANN001 - a PgCluster
    import psycopg

    with psycopg.connect(cluster.conninfo("postgres"), autocommit=True) as conn:
        return conn.execute("SHOW synchronous_standby_names").fetchone()[0]


def commits(cluster, count: int = 2000) -> dict:  # noqa: ANN001 - a PgCluster
    """One-row INSERT + COMMIT `count` times over TCP: what each commit waits (the standby's flush,
    when there is one), less sensitive to the shared cores than the end-to-end figures."""
    import statistics

    import psycopg

    with psycopg.connect(cluster.conninfo("postgres")) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        conn.commit()
        took = []
        for _ in range(count):
            began = time.perf_counter()
            conn.execute("INSERT INTO bench_commit DEFAULT VALUES")
            conn.commit()
            took.append((time.perf_counter() - began) * 1000)
    q = statistics.quantiles(took, n=100)
    return {"p50": statistics.median(took), "p99": q[98], "per_second": count / (sum(took) / 1000)}


def standby_stop(cluster, standby: str) -> None:  # noqa: ANN001 - a PgCluster
    """Stop the standby; wait until the primary commits alone (Patroni empties synchronous_standby_names)."""
    cluster.members[standby].process.stop()
    deadline = time.monotonic() + 60
    while synchronous_names(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)


def in_child(label: str, count: int, rate: int, seconds: float, concurrency: int) -> dict:
    """One measurement in a fresh process (a second Environment in the same process left its
    worker unanswered to the ping: the Celery app's state of the first part)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "bench.standby_cost", "--measure",
                           json.dumps([label, count, rate, seconds, concurrency])],
                          capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if argv[:1] == ["--measure"]:
        print(json.dumps(measure(*json.loads(argv[1]))))
        return
    from worker.local.embedded import EmbeddedServers
    from worker.local.pg_cluster import Loopback, PgCluster

    quick, commits_only = "--quick" in argv, "--commits" in argv
    commit_rows: list = []
    count, rate, seconds, concurrency = (3000, 200, 10, 3) if quick else (10_000, 200, 30, 3)
    root = Path(tempfile.mkdtemp(prefix="invoice-standby-cost-"))
    root.chmod(0o755)
    servers = EmbeddedServers(root / "broker", ephemeral=True)
    broker = servers.start_broker()
    cluster = PgCluster(root / "patroni", [Loopback("db1"), Loopback("db2")], [Loopback("etc3")])
    rows = []
    try:
        cluster.start()
        primary, standby = cluster.leader(), cluster.synchronous()
        os.environ.update({"DATABASE_URL": cluster.url("postgres"), "BROKER_URL": broker})
        commit_rows = [("with standby", commits(cluster)), ("with standby", commits(cluster))]
        if commits_only:
            standby_stop(cluster, standby)
            os.environ.update({"DATABASE_URL": cluster.url("postgres")})
            commit_rows += [("alone", commits(cluster)), ("alone", commits(cluster))]
            return
        rows.append(in_child(f"primary {primary} + synchronous standby {standby} (names: {synchronous_names(cluster)})",
                             count, rate, seconds, concurrency))
        standby_stop(cluster, standby)
        os.environ.update({"DATABASE_URL": cluster.url("postgres")})
        commit_rows += [("alone", commits(cluster)), ("alone", commits(cluster))]
        rows.append(in_child(f"primary {primary} alone (standby stopped; names: '{synchronous_names(cluster)}')",
                             count, rate, seconds, concurrency))
    finally:
        cluster.stop()
        servers.stop()
        shutil.rmtree(root, ignore_errors=True)
        print("one-row commits over TCP, 2,000 a round:")
        for label, row in commit_rows:
            print(f"| {label} | p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms | {row['per_second']:.0f} commits/s |")
    print(f"record_payment end to end: {count} messages, batching on, concurrency {concurrency}; "
          f"latency at {rate} msg/s for {seconds} s")
    for row in rows:
        print(f"| {row['label']} | {row['rate']:.0f} msg/s | p50 {row['p50']:.1f} ms, p99 {row['p99']:.1f} ms"
              f" ({row['missing']} events missing) |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
