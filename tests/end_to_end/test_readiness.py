"""/healthz and /readyz of a real worker on a broker of the test's own (the session's shared one
is never stopped): readiness is 503 naming the broker while it is away, and 200 again once it
is back and the worker consumes; a port already taken is an ERROR, and the worker still consumes."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import order_body, outcome_of, wait_for
from tests.end_to_end.operator_endpoint import OwnBroker, free_port, get, send_to

TENANT = "t-ready"


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path / "valkey")
    try:
        yield broker
    finally:
        broker.stop()


def applied_through(broker_url: str) -> dict[str, Any]:
    body = order_body(tenant=TENANT)
    send_to(broker_url, "invoices.order_shipped", body)
    return wait_for(lambda: outcome_of(TENANT, body["messageId"]), 30, what="the order to be applied")


def test_readiness_is_503_naming_the_broker_while_it_is_away_and_200_once_it_is_back(processes, database, own_broker):
    port = free_port()
    processes.worker(extra_env={"BROKER_URL": own_broker.url, "METRICS_PORT": str(port)})
    wait_for(lambda: get(port, "/readyz")[0] == 200, 30, what="the worker to be ready")

    own_broker.stop()
    status, body = wait_for(lambda: (answer := get(port, "/readyz"))[0] == 503 and answer, 30,
                            what="readiness to fail")
    report = json.loads(body)
    assert report["ready"] is False
    assert list(report["problems"]) == ["broker"], report
    assert get(port, "/healthz")[0] == 200  # alive all the same

    own_broker.start()
    wait_for(lambda: get(port, "/readyz")[0] == 200, 30, what="readiness to come back")
    assert applied_through(own_broker.url)["outcome"] == "applied"  # and it consumes again


def test_a_port_already_taken_is_an_error_and_the_worker_still_consumes(processes, database, own_broker):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = processes.worker(extra_env={"BROKER_URL": own_broker.url, "METRICS_PORT": str(port)})
        assert applied_through(own_broker.url)["outcome"] == "applied"
    log = worker.log.read_text()
    assert f"ERROR/MainProcess] cannot serve /metrics, /healthz and /readyz on port {port}" in log
