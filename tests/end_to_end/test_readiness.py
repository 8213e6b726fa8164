"""/healthz and /readyz of a real worker on a broker of the test's own (the session's shared one
is never stopped): readiness is 503 naming the broker while it is away, and 200 again once it
is back and the worker consumes; a port already taken is an ERROR, and the worker still consumes."""

from __future__ import annotations

import json
import socket
import uuid
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


def control(broker_url: str, command: str, node: str) -> None:
    """Tell the worker to stop (cancel_consumer) or start (add_consumer) consuming every queue,
    through an app of its own on that broker (Celery's control publishes through the app's own
    producer pool, whatever connection is given); asked again until it answers."""
    from celery import Celery

    from worker.brokers.topology import QUEUES

    app = Celery("control", broker=broker_url, set_as_current=False)
    try:
        for queue in QUEUES:
            wait_for(lambda q=queue: getattr(app.control, command)(q, destination=[node], reply=True, timeout=1,
                                                                     limit=1),
                     20, what=f"{node} to answer {command} {queue}")
    finally:
        app.close()


def test_readiness_is_503_naming_the_consumer_while_messages_wait_unreceived_and_200_once_it_receives(
        processes, database, own_broker):
    """A worker alive but no longer receiving (after a reconnect, Celery #8030 / #8384 / #10205) is
    played by cancelling its consumers: its messages wait, none arrives."""
    port, node = free_port(), f"stall-{uuid.uuid4().hex[:6]}@localhost"
    worker = processes.worker(name=node, extra_env={"BROKER_URL": own_broker.url, "METRICS_PORT": str(port),
                                                    "CONSUMER_STALL_SECONDS": "2"})
    wait_for(lambda: get(port, "/readyz")[0] == 200, 30, what="the worker to be ready")
    control(own_broker.url, "cancel_consumer", node)
    body = order_body(tenant=TENANT)
    send_to(own_broker.url, "invoices.order_shipped", body)

    status, answer = wait_for(lambda: (reply := get(port, "/readyz"))[0] == 503 and reply, 30,
                              what="readiness to fail")
    problems = json.loads(answer)["problems"]
    assert list(problems) == ["consumer"] and "messages waiting on its queues: 1;" in problems["consumer"], problems
    assert outcome_of(TENANT, body["messageId"]) is None  # nothing was consumed meanwhile

    control(own_broker.url, "add_consumer", node)
    assert wait_for(lambda: outcome_of(TENANT, body["messageId"]), 30, what="the order")["outcome"] == "applied"
    wait_for(lambda: get(port, "/readyz")[0] == 200, 30, what="readiness to come back")
    assert worker.log.read_text().count("ERROR/MainProcess] not consuming") == 1
