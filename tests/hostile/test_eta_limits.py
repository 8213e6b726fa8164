"""How far ahead an `eta` may be follows the broker (worker/delivery/consumer.py eta_horizon). On
RabbitMQ a message held for its eta longer than the broker's consumer_timeout (30 minutes by
default) makes RabbitMQ close the channel and redeliver every message in flight on it, whatever
their tenant: such an eta is dead-lettered `eta-too-far` at once. On Redis it waits, parked in
Redis, up to the visibility timeout. Real worker, both brokers (make test, make test-rabbitmq)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from tests.conftest import wait_for
from tests.faults.checker import Ledger, dead_letters, outcomes, wait_settled
from tests.faults.conftest import fault_environment, reliability, scenario  # noqa: F401 - shared fixtures
from tests.faults.traffic import order, payment, send


def test_an_eta_beyond_the_brokers_limit_is_dead_lettered_and_costs_nobody_else(scenario) -> None:
    # An hour of visibility timeout: before, the horizon was that on both brokers, and a countdown
    # of 40 minutes was held on RabbitMQ past its consumer_timeout.
    worker = scenario.processes.worker(extra_env={"BROKER_VISIBILITY_TIMEOUT": "3600"})
    publisher, ledger, tenant = scenario.publisher(), Ledger(), f"t-{uuid.uuid4().hex[:6]}"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "T-1", total="100.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    late = payment(tenant, "T-1", "5.00")
    publisher.send_task("invoices.record_payment", args=[late], queue="invoices.payments",
                        eta=datetime.now(timezone.utc) + timedelta(minutes=40))
    for _ in range(3):
        send(publisher, ledger, "invoices.record_payment", payment(tenant, "T-1", "1.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    if scenario.broker_url.startswith("amqp"):
        wait_for(lambda: [d for d in dead_letters(scenario.database_url) if d[0] == late["messageId"]], 30,
                 what="the far eta's dead letter")
        assert [d[1] for d in dead_letters(scenario.database_url) if d[0] == late["messageId"]] == ["eta-too-far"]
    else:
        import redis

        wait_for(lambda: redis.Redis.from_url(scenario.broker_url).zcard("invoices.parked") == 1, 30,
                 what="the far eta parked in Redis")
        assert not [d for d in dead_letters(scenario.database_url) if d[0] == late["messageId"]]
    assert (tenant, late["messageId"]) not in outcomes(scenario.database_url)
    assert worker.poll() is None
