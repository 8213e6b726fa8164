"""`invoice-worker run` on the embedded default: starts both servers under DATA_DIR, runs
worker, beat and relay, serves the CLI of another shell, stops everything on Ctrl-C within
10 seconds leaving no stray process, and a second run finds the first run's invoices."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, EventCollector, wait_for

# These run the embedded default (embedded PostgreSQL and Valkey, no URLs), whatever the session's
# broker: `make test` runs them; the RabbitMQ session would only run them a second time.
pytestmark = pytest.mark.skipif(os.environ.get("BROKER_URL", "").startswith("amqp"),
                                reason="the embedded default is Valkey by design; make test runs these")


def strays(data_dir: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(data_dir) in line or ("valkey" in line and str(data_dir) in str(proc.info.get("cwd"))):
            found.append(f"{proc.info['pid']}: {line}")
    return found


def start(data_dir: Path, log: Path, console_port: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "CONSOLE_TOKEN")}
    env["DATA_DIR"] = str(data_dir)
    env["CONSOLE_PORT"] = str(console_port)
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: b"worker, beat and relay running" in log.read_bytes() or proc.poll() is not None, 90,
             what="`invoice-worker run` to start")
    assert proc.poll() is None, log.read_text()[-3000:]
    wait_for(lambda: b" ready." in log.read_bytes(), 60, what="the worker to be ready")
    return proc


def _get(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return None


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env["DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def stop(proc: subprocess.Popen) -> float:
    began = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process group
    proc.wait(30)
    return time.monotonic() - began


def test_run_on_the_embedded_default_end_to_end(tmp_path):
    data_dir = tmp_path / "data"
    log = tmp_path / "run.log"
    from tests.console.conftest import free_port

    port = free_port()
    proc = start(data_dir, log, port)
    collector = None
    try:
        printed = log.read_text()
        # The console beside the others, its URL printed; without CONSOLE_TOKEN it is read-only.
        assert f"console: http://127.0.0.1:{port}/ (read-only: no CONSOLE_TOKEN)" in printed
        page = wait_for(lambda: _get(f"http://127.0.0.1:{port}/"), 30, interval=0.5, what="the console")
        assert "Read-only: no CONSOLE_TOKEN" in page and "Dead letters" in page
        assert "embedded PostgreSQL: postgresql+psycopg://" in printed
        broker = re.search(r"embedded Redis-compatible broker: (redis://\S+)", printed)
        assert broker, printed[-3000:]
        collector = EventCollector(broker.group(1))  # a consumer of the run's own broker, bound before the message
        sent = cli(data_dir, "publish", "invoices.order_shipped", str(ROOT / "examples" / "order_shipped.json"))
        assert sent.returncode == 0, sent.stderr
        shown = wait_for(lambda: (r := cli(data_dir, "invoices", "get", "INV-00001", "--tenant", "acme", "--json"))
                         .returncode == 0 and r, 30, interval=0.5, what="the invoice")
        invoice = json.loads(shown.stdout)
        assert invoice["invoiceTotal"] == "142.60"
        # the relay inside `run` published the invoice's event on the run's broker
        received = collector.wait(lambda e: any(x["type"] == "invoice.created" for x in e), 30,
                                  what="invoice.created from the run's relay")
        created = next(e for e in received if e["type"] == "invoice.created")
        assert (created["tenantId"], created["invoiceId"]) == ("acme", invoice["id"])
        wait_for(lambda: json.loads(cli(data_dir, "events", "status", "--json").stdout)["unpublished"] == 0, 30,
                 interval=0.5, what="the outbox to be empty")
    finally:
        if collector is not None:
            collector.close()
        took = stop(proc)
    assert took < 10, f"stopping took {took:.1f}s"
    assert proc.returncode == 0
    assert "stopped" in log.read_text()
    time.sleep(0.5)
    assert strays(data_dir) == []
    assert not (data_dir / "endpoints.json").exists()

    # A second run finds the first run's invoice.
    proc = start(data_dir, tmp_path / "run2.log")
    try:
        again = cli(data_dir, "invoices", "get", "INV-00001", "--tenant", "acme", "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["orderId"] == "ORD-1001"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert strays(data_dir) == []


def test_cli_without_urls_or_a_running_worker_says_what_to_do(tmp_path):
    result = cli(tmp_path / "nothing-here", "invoices", "list")
    assert result.returncode == 2
    assert "DATABASE_URL: not set, and no running `invoice-worker run`" in result.stderr
