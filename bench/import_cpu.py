"""Bulk import through the worker in wall time and in CPU seconds (the worker's processes and
PostgreSQL's, reaped backends included), for comparing two checkouts side by side on a busy
machine where wall time is mostly noise. Run it from each checkout in turn, in alternating order:

    cd CHECKOUT && PYTHONPATH=$PWD python -m bench.import_cpu 20000
"""

from __future__ import annotations

import sys
import time
import uuid

import psutil

from bench.bulk_import import BATCH, entries
from bench.harness import Environment, wait, worker
from bench.payments import publish


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def postmaster(env: Environment) -> psutil.Process:
    data = str(env.servers.data_dir)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and any(data in arg for arg in proc.info["cmdline"] or []):
            return proc
    raise RuntimeError("the embedded PostgreSQL was not found")


def main(count: int) -> str:
    env = Environment()
    try:
        version = env.sql("SELECT version_num FROM alembic_version")[0][0]
        data = entries("W", count)
        bodies = [{"messageId": f"bulk-{uuid.uuid4()}", "tenantId": "bench-import", "batchId": f"b-{start}",
                   "invoices": data[start:start + BATCH]} for start in range(0, count, BATCH)]
        proc, pg = worker(3), postmaster(env)
        try:
            before = cpu_seconds(tree(proc.proc.pid)), cpu_seconds(tree(pg.pid))
            started = publish("invoices.bulk_import", bodies, "invoices.imports").began
            done = wait(lambda: env.sql("SELECT count(*) FROM inbox WHERE tenant_id = 'bench-import'")[0][0]
                        >= len(bodies), 900, interval=0.2)
            after = cpu_seconds(tree(proc.proc.pid)), cpu_seconds(tree(pg.pid))
        finally:
            proc.stop()
        assert env.sql("SELECT count(*) FROM invoices WHERE tenant_id = 'bench-import'")[0][0] == count
        worker_cpu, pg_cpu = after[0] - before[0], after[1] - before[1]
        return (f"schema {version}: {count / (done - started):.0f} invoices/s wall ({done - started:.1f} s); CPU "
                f"{worker_cpu + pg_cpu:.1f} s = worker {worker_cpu:.1f} + PostgreSQL {pg_cpu:.1f}: "
                f"{count / (worker_cpu + pg_cpu):.0f} invoices per CPU second")
    finally:
        env.close()


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
