"""The operator's console against the running worker, with 100,000 open dead letters: the
dead-letter list's first page, a page deep in the list (keyset: below the 99,000th row), and the
overview, each requested over HTTP as a signed-in browser would (p50 / p95 of `requests` each)."""

from __future__ import annotations

import http.cookiejar
import os
import re
import socket
import statistics
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

from bench.harness import Environment, Process, relay, wait, worker

SECRET = "bench-console-secret"


def seed(env: Environment, rows: int) -> None:
    """`rows` open dead letters over an hour, of a few reasons, tasks and tenants."""
    env.sql("INSERT INTO dead_letters (fingerprint, delivery_id, task_name, message_id, tenant_id, body, headers, "
            "reason, error, attempts, status, first_seen, last_seen) "
            "SELECT md5('bench-dl-' || g), 'd-' || g, (ARRAY['invoices.record_payment','invoices.issue',"
            "'invoices.payment_callback'])[1 + g %% 3], 'm-' || g, 'tenant-' || (g %% 50), "
            "jsonb_build_object('messageId', 'm-' || g, 'tenantId', 'tenant-' || (g %% 50), 'amount', 'abc'), '{}', "
            "(ARRAY['malformed','retries-exhausted','bad-signature','worker-lost'])[1 + g %% 4], "
            "'ValidationError: amount: not a decimal', 1 + g %% 3, 'open', "
            "now() - (g || ' seconds')::interval / 30, now() - (g || ' seconds')::interval / 30 "
            "FROM generate_series(1, %s) g", (rows,))
    env.sql("VACUUM ANALYZE dead_letters")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signed_in(base: str) -> Any:
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    page = opener.open(base + "/login").read().decode()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    opener.open(base + "/login", urllib.parse.urlencode({"csrf": csrf, "token": SECRET, "next": "/"}).encode()).read()
    return opener


def timings(opener: Any, url: str, requests: int) -> dict[str, float]:
    spent = []
    for _ in range(requests):
        began = time.perf_counter()
        with opener.open(url) as response:
            response.read()
            assert response.status == 200
        spent.append((time.perf_counter() - began) * 1000)
    spent.sort()
    return {"p50": statistics.median(spent), "p95": spent[int(len(spent) * 0.95) - 1], "count": len(spent)}


def run(env: Environment, rows: int = 100_000, requests: int = 200, concurrency: int = 2) -> dict[str, Any]:
    seed(env, rows)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    nodes = [worker(concurrency), relay()]
    console = Process([sys.executable, "-m", "worker.cli", "--log-level", "WARNING", "console"],
                      {"CONSOLE_PORT": str(port), "CONSOLE_TOKEN": f"bench:{SECRET}"}, None)
    try:
        def answers() -> bool:
            try:
                urllib.request.urlopen(base + "/login", timeout=1).read()
                return True
            except OSError:
                return False

        wait(answers, 30)
        opener = signed_in(base)
        (deep,) = env.sql("SELECT id FROM dead_letters WHERE status = 'open' ORDER BY id LIMIT 1 OFFSET 950")[0]
        for url in (base + "/", base + "/dead-letters"):  # warm: templates compiled, pools filled
            timings(opener, url, 5)
        return {
            "rows": rows,
            "first page": timings(opener, base + "/dead-letters", requests),
            "deep page": timings(opener, base + f"/dead-letters?before={deep}", requests),
            "filtered page (reason and tenant)": timings(opener, base + "/dead-letters?reason=malformed&tenant=tenant-8",
                                                         requests),
            "overview": timings(opener, base + "/", requests),
        }
    finally:
        console.stop()
        for node in nodes:
            node.stop()
        env.sql("DELETE FROM dead_letters WHERE delivery_id LIKE 'd-%%'")


def rows_of(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for part in ("first page", "deep page", "filtered page (reason and tenant)", "overview"):
        t = result[part]
        where = "the dead-letter list, " + part if part != "overview" else "the overview"
        out.append((f"console: {where}, {result['rows']:,} open dead letters, worker and relay running",
                    f"p95 {t['p95']:.1f} ms", f"p50 {t['p50']:.1f} ms over {t['count']} requests (HTTP, signed in)"))
    return out


def screenshot(env: Environment, path: str, minutes: float = 3.0) -> None:
    """docs/console-overview.png: the overview after a few minutes of traffic (orders, payments,
    some rejected, some dead-lettered) with worker, relay, beat and console running."""
    import json as json_module
    import tempfile
    import uuid

    from playwright.sync_api import sync_playwright

    from bench.payments import setup_invoices
    from tests.console.conftest import CHROMIUM_ARGS, ensure_chromium
    from worker.brokers.topology import queue_for
    from worker.celery_app import app

    numbers = setup_invoices(env, 40)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    schedule = os.path.join(tempfile.mkdtemp(), "beat-schedule")
    nodes = [worker(2), relay(), Process([sys.executable, "-m", "celery", "-A", "worker", "beat", "-s", schedule], {}, None),
             Process([sys.executable, "-m", "worker.cli", "console"],
                     {"CONSOLE_PORT": str(port), "CONSOLE_TOKEN": f"alice:{SECRET}"}, None)]
    try:
        ends = time.monotonic() + minutes * 60
        i = 0
        while time.monotonic() < ends:
            i += 1
            number = numbers[i % len(numbers)]
            body = {"messageId": f"shot-{uuid.uuid4()}", "tenantId": "bench", "invoiceNumber": number,
                    "amount": "0.01" if i % 9 else "999999.00", "currency": "USD", "paymentMethod": "EFT"}
            if i % 23 == 0:
                body["amount"] = "abc"  # malformed: dead-lettered
            if i % 41 == 0:
                body = {"messageId": f"shot-{uuid.uuid4()}", "tenantId": "bench"}
            app.send_task("invoices.record_payment", args=[body], queue=queue_for("invoices.record_payment"))
            time.sleep(0.05 + 0.05 * (1 + (i // 200) % 3))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=ensure_chromium(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, base_url=base)
            page.goto("/login")
            page.fill("input[name=token]", SECRET)
            page.click("button[type=submit]")
            page.wait_for_url("**/")
            page.screenshot(path=path, full_page=True)
            browser.close()
        print(json_module.dumps({"screenshot": path}))
    finally:
        for node in nodes:
            node.stop()


if __name__ == "__main__":  # python -m bench.console [--screenshot PATH]: these rows alone
    os.environ.setdefault("METRICS_PORT", "0")
    environment = Environment()
    try:
        if sys.argv[1:2] == ["--screenshot"]:
            screenshot(environment, sys.argv[2])
        else:
            for row in rows_of(run(environment)):
                print(" | ".join(row))
    finally:
        environment.close()
