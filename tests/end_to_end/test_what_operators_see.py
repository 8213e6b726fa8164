"""What operators see (CONTRACT.md section 10) from a real worker with three pool processes,
LOG_FORMAT=json and its own METRICS_PORT, fed real messages once for the whole module: the
counters add up across the pool processes, a rejection is counted under its reason, the relay's
counter reaches the worker's scrape through the shared folder (as under `invoice-worker run`),
every log line is JSON, and every metric the dashboard and the alert rules query is scraped."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import ROOT, Processes, order_body, wait_for
from tests.end_to_end.operator_endpoint import (
    OwnBroker,
    free_port,
    get,
    metric_values,
    own_database,
    query,
    scraped,
    send_to,
)

MESSAGES = 30
TENANT = "t-ops"


def outcome(database_url: str, message_id: str) -> dict[str, Any] | None:
    rows = query(database_url, "SELECT outcome, reason, invoice_number FROM inbox WHERE tenant_id = %s AND "
                 "message_id = %s", TENANT, message_id)
    return {"outcome": rows[0][0], "reason": rows[0][1], "invoiceNumber": rows[0][2]} if rows else None


@pytest.fixture(scope="module")
def observed(urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One worker (3 pool processes), fed MESSAGES orders, one rejected payment and one malformed
    message; its scrape before and after a relay published the outbox. On a broker and a database
    of its own: the session's shared worker and relay would take some of the messages and events."""
    with own_database(urls) as database_url:
        yield from _observe(urls, database_url, tmp_path_factory)


def _observe(urls: dict[str, str], database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    def count(sql: str) -> int:
        return query(database_url, sql)[0][0]

    tmp = tmp_path_factory.mktemp("operators")
    folder = tmp / "metrics"
    folder.mkdir()
    port = free_port()
    broker = OwnBroker(tmp / "valkey")
    shared = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "LOG_FORMAT": "json", "BROKER_URL": broker.url,
              "DATABASE_URL": database_url}
    procs = Processes({**urls, "DATABASE_URL": database_url}, tmp)
    try:
        worker = procs.worker(concurrency=3, extra_env={**shared, "METRICS_PORT": str(port)})
        wait_for(lambda: get(port, "/healthz")[0] == 200, 30, what="the endpoint")
        orders = [order_body(tenant=TENANT, autoIssue=True) for _ in range(MESSAGES)]
        for body in orders:
            send_to(broker.url, "invoices.order_shipped", body)
        outcomes = [wait_for(lambda b=b: outcome(database_url, b["messageId"]), 60, what="an order's outcome")
                    for b in orders]
        too_much = {"messageId": f"pay-{uuid.uuid4()}", "tenantId": TENANT, "invoiceNumber": outcomes[0]["invoiceNumber"],
                    "amount": "1000000.00", "currency": "USD", "paymentMethod": "EFT"}
        send_to(broker.url, "invoices.record_payment", too_much)
        rejection = wait_for(lambda: outcome(database_url, too_much["messageId"]), 30, what="the rejection")
        send_to(broker.url, "invoices.record_payment", {"messageId": f"bad-{uuid.uuid4()}", "tenantId": TENANT})
        wait_for(lambda: count("SELECT count(*) FROM dead_letters") == 1, 30, what="the dead letter")
        wait_for(lambda: metric_values(scraped(port), "invoice_worker_messages_total",
                                       task="invoices.record_payment", outcome="dead_lettered") == [1.0],
                 30, what="the last message counted")
        before = scraped(port)
        database = {"outbox": count("SELECT count(*) FROM outbox WHERE published_at IS NULL"),
                    "created": count("SELECT count(*) FROM outbox WHERE type = 'invoice.created'")}
        procs.relay(extra_env={**shared, "METRICS_PORT": "0"})
        wait_for(lambda: count("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0, 30,
                 what="the relay to publish")
        # The outbox gauge is cached for two seconds: wait until a scrape shows the outbox empty.
        wait_for(lambda: metric_values(scraped(port), "invoice_worker_outbox_unpublished") == [0.0], 30,
                 what="the outbox gauge to follow")
        yield {"port": port, "before": before, "after": scraped(port), "database": database, "outcomes": outcomes,
               "messageIds": {b["messageId"] for b in orders},
               "rejection": rejection, "log": worker.log, "folder": folder}
    finally:
        procs.stop_all()
        broker.stop()


def test_the_applied_counter_equals_the_messages_applied_across_three_pool_processes(observed):
    assert {o["outcome"] for o in observed["outcomes"]} == {"applied"}
    applied = metric_values(observed["before"], "invoice_worker_messages_total", task="invoices.order_shipped",
                            outcome="applied")
    assert applied == [float(MESSAGES)]
    timed = metric_values(observed["before"], "invoice_worker_task_seconds_count", task="invoices.order_shipped")
    assert timed == [float(MESSAGES)]
    # More than one pool process did the work, each counting into its own file.
    lines = [json.loads(line) for line in observed["log"].read_text().splitlines() if line.strip()]
    processes = {line["process"] for line in lines if line.get("task") == "invoices.order_shipped"}
    assert len(processes) >= 2, processes
    assert len(list(observed["folder"].glob("counter_*.db"))) >= 2


def test_a_rejection_is_counted_under_its_reason_and_a_malformed_message_as_dead_lettered(observed):
    reason = observed["rejection"]["reason"]
    assert observed["rejection"]["outcome"] == "rejected" and reason
    scrape = observed["before"]
    assert metric_values(scrape, "invoice_worker_rejections_total", task="invoices.record_payment",
                         reason=reason) == [1.0]
    assert metric_values(scrape, "invoice_worker_messages_total", task="invoices.record_payment",
                         outcome="rejected") == [1.0]
    assert metric_values(scrape, "invoice_worker_messages_total", task="invoices.record_payment",
                         outcome="dead_lettered") == [1.0]
    assert metric_values(scrape, "invoice_worker_dead_letters_open") == [1.0]


def test_scrape_time_gauges_agree_with_the_database_and_the_broker(observed):
    from worker.brokers.topology import QUEUES

    before, after = observed["before"], observed["after"]
    assert metric_values(before, "invoice_worker_outbox_unpublished") == [float(observed["database"]["outbox"])]
    assert metric_values(before, "invoice_worker_outbox_oldest_age_seconds")[0] > 0
    assert metric_values(after, "invoice_worker_outbox_oldest_age_seconds") == [0.0]
    depths = {labels["queue"]: value for labels, value in metric_values(after, "invoice_worker_queue_depth",
                                                                          with_labels=True)}
    assert depths == {queue: 0.0 for queue in QUEUES}
    assert metric_values(after, "invoice_worker_ready") == [1.0]


def test_the_relays_counter_reaches_the_workers_scrape(observed):
    assert metric_values(observed["before"], "invoice_worker_events_published_total", type="invoice.created") == []
    created = metric_values(observed["after"], "invoice_worker_events_published_total", type="invoice.created")
    assert created == [float(observed["database"]["created"])] == [float(MESSAGES)]


def test_healthz_and_readyz_answer_while_all_is_well(observed):
    status, body = get(observed["port"], "/healthz")
    assert status == 200 and json.loads(body) == {"alive": True}
    status, body = get(observed["port"], "/readyz")
    assert status == 200, body
    assert json.loads(body) == {"ready": True, "problems": {}}


def test_every_log_line_is_json_and_a_tasks_line_carries_its_fields(observed):
    text = observed["log"].read_text()
    assert "test-secret" not in text  # CALLBACK_SIGNING_SECRET of the test session
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line parses
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    tasks = [line for line in lines if line["logger"] == "worker.task"]
    fields = {"task", "messageId", "tenantId", "invoiceNumber", "outcome", "reason", "durationMs"}
    assert tasks and all(fields <= set(line) for line in tasks)
    rejected = next(line for line in tasks if line["outcome"] == "rejected")
    assert rejected["reason"] == observed["rejection"]["reason"]
    assert rejected["invoiceNumber"] == observed["outcomes"][0]["invoiceNumber"]
    applied = [line for line in tasks if line["task"] == "invoices.order_shipped"]
    assert {line["messageId"] for line in applied} == observed["messageIds"]
    assert all(line["tenantId"] == TENANT and line["durationMs"] > 0 for line in applied)


def queried_metrics() -> set[str]:
    """The metric names in the Grafana dashboard's and the alert rules' queries."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "invoice-worker.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert expressions
    return {name for expr in expressions for name in re.findall(r"\b(invoice_worker_[a-z_]+)\b", expr)}


def test_every_metric_the_dashboard_and_the_alert_rules_query_is_in_a_real_scrape(observed):
    names = queried_metrics()
    assert len(names) >= 8
    scraped_names = {line.split("{")[0].split(" ")[0] for line in observed["after"].splitlines()
                     if line and not line.startswith("#")}
    assert names <= scraped_names, names - scraped_names


def test_the_compose_file_scrapes_the_worker_and_mounts_the_dashboard():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {"worker:9808", "relay:9808"} <= targets
    assert {"prometheus", "grafana"} <= set(compose["services"])
    assert any("alerts.yml" in volume for volume in compose["services"]["prometheus"]["volumes"])
    assert Path(ROOT / "deploy" / "grafana" / "provisioning").is_dir()
