"""What metrics cost per message: end to end through the worker with metrics off and on (scraped
every second), side by side, and the two ways to count across pool processes, measured alone.

Counting in the pool processes (prometheus_client's multiprocess mode, what the worker does): a
counter and a histogram sample written to memory-mapped files by the process that ran the message.
Counting in the main process instead: the same samples in memory, but the outcome reaches the main
process only as the repr of the task's return value, which it must parse, and all of it happens in
the one thread that also feeds every pool process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import urllib.request
from typing import Any

from bench.harness import Environment
from bench.payments import end_to_end

MICRO = r"""
import ast, json, os, sys, time
samples = int(sys.argv[1])
from worker.operations import metrics
metrics.enable(multiprocess=sys.argv[2] == "pool")
from worker.operations.telemetry import _task_ended, _task_started
result = {"outcome": "applied", "messageId": "pay-0f6f2b4e-1c0e-4f8e-9a7e-3d2b1c0a9f8e",
          "invoiceId": "6f1c2d3e-0000-4000-8000-000000000001", "invoiceNumber": "B-00042",
          "paymentId": "6f1c2d3e-0000-4000-8000-000000000002"}
class Task:
    name = "invoices.record_payment"
began = time.perf_counter()
if sys.argv[2] == "pool":
    for i in range(samples):
        _task_started(task_id="t")
        _task_ended(task_id="t", task=Task, args=({},), retval=result, state="SUCCESS")
else:  # what the main process would do with the repr it receives
    text = repr(result)
    for i in range(samples):
        outcome = ast.literal_eval(text)["outcome"]
        metrics.count_message(Task.name, outcome, None, 0.004)
print(json.dumps({"us": (time.perf_counter() - began) / samples * 1e6}))
"""


def micro(where: str, samples: int = 20_000) -> float:
    """Microseconds per message of counting `where` ("pool" or "main"), in a fresh process."""
    with tempfile.TemporaryDirectory() as folder:
        env = {"PROMETHEUS_MULTIPROC_DIR": folder} if where == "pool" else {}
        out = subprocess.run([sys.executable, "-c", MICRO, str(samples), where], capture_output=True, text=True,
                             check=True, env={**_environ(), **env})
    return json.loads(out.stdout)["us"]


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}


class Scraper:
    """GET /metrics and /readyz once a second, as Prometheus and a load balancer would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for path in ("/metrics", "/readyz"):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5).read()
                    self.scrapes += 1
                except OSError:
                    pass

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def side_by_side(env: Environment, make_bodies: Any, concurrency: int, rounds: int = 2) -> dict[str, Any]:
    """End to end with metrics off and on, alternating, `rounds` times each (fresh messages each)."""
    import socket

    off, on = [], []
    for _ in range(rounds):
        off.append(end_to_end(env, make_bodies(), concurrency, {"METRICS_PORT": "0"})["rate"])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with Scraper(port) as scraper:
            on.append(end_to_end(env, make_bodies(), concurrency, {"METRICS_PORT": str(port)})["rate"])
        assert scraper.scrapes > 0, "the worker's endpoint was never scraped"
    return {"off": off, "on": on, "pool_us": micro("pool"), "main_us": micro("main")}
