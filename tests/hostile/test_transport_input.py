"""What a damaged or non-Celery client can put on a Redis list, through our transport
(worker/brokers/redis_transport.py): every item a read takes ends as a delivery or a dead letter,
and every item handed back (a reject, a lost channel, the visibility sweep) goes back whole. Real
Valkey; the fault environment's own (skipped on RabbitMQ, which has no lists)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import psycopg
import pytest
import redis
from kombu import Connection, Consumer

from tests.conftest import wait_for
from tests.faults.checker import Ledger, conninfo, dead_letters, outcomes, wait_settled
from tests.faults.conftest import fault_environment, reliability, scenario  # noqa: F401 - shared fixtures
from tests.faults.test_lost_read import publish, redis_queue
from tests.faults.traffic import order, payment, send

ENVELOPE = {"body": "e30=", "content-encoding": "utf-8", "content-type": "application/json", "headers": {},
            "properties": {"body_encoding": "base64", "delivery_info": {"exchange": "", "routing_key": "q"},
                           "delivery_mode": 2, "priority": 0}}


def take(url: str, transport: str, queue: Any, expected: int) -> tuple[Connection, list[Any]]:
    """Read what the queue holds through the transport, without acknowledging it."""
    conn = Connection(url, transport=transport)
    received: list[Any] = []
    consumer = Consumer(conn.default_channel, queues=[queue], on_message=received.append)
    consumer.consume()
    deadline = time.monotonic() + 10
    while len(received) < expected and time.monotonic() < deadline:
        try:
            conn.drain_events(timeout=0.2)
        except TimeoutError:
            pass
    assert len(received) == expected, received
    return conn, received


def on_list(url: str, name: str) -> list[bytes]:
    return redis.Redis.from_url(url).lrange(name, 0, -1)


@pytest.mark.parametrize("item", [
    json.dumps(ENVELOPE).encode() + b"\n",  # a valid message with a trailing newline (redis-cli -x)
    b"  " + json.dumps(ENVELOPE).encode(),
    b"{this is not json}",  # looks like an object: registered as it is, and its entry is no JSON
    b"\xff\xfe not text at all",
    json.dumps({**ENVELOPE, "headers": "x"}).encode(),
    json.dumps({**ENVELOPE, "body": "!!x"}).encode(),
], ids=["trailing newline", "leading blanks", "braces but no JSON", "not UTF-8", "headers a string", "bad base64"])
def test_an_item_handed_back_goes_back_whole(fault_environment, item: bytes) -> None:
    """Before: kombu's restore read the entry TAKE had registered, failed on anything but a message
    with no blanks around it (CRITICAL 'Could not restore message'), and removed the entry: the
    message was gone from the list, `unacked` and everywhere."""
    broker, queue, transport = redis_queue(fault_environment, "hand-back")
    client = redis.Redis.from_url(broker.url)
    client.lpush(queue.name, item)
    conn, received = take(broker.url, transport, queue, 1)
    try:
        received[0].reject(requeue=True)
    finally:
        conn.release()
    (back,) = on_list(broker.url, queue.name)
    assert client.hlen("unacked") == 0
    message = json.loads(item) if item.strip().startswith(b"{") and b"this is" not in item else None
    if message is not None and isinstance(message.get("headers"), dict) and message["body"] != "!!x":
        restored = json.loads(back)  # a message goes back as kombu hands one back: marked redelivered
        assert restored["body"] == message["body"] and restored["headers"]["redelivered"] is True
    else:
        assert back == item  # anything else, byte for byte


def test_the_visibility_sweep_hands_back_what_it_cannot_parse(fault_environment) -> None:
    """Before: the sweep raised on an entry that is no JSON (every worker's sweep, every time), and
    the older entries behind it were never handed back."""
    broker, queue, transport = redis_queue(fault_environment, "sweep")
    client = redis.Redis.from_url(broker.url)
    client.lpush(queue.name, b"{broken")
    publish(broker.url, transport, queue, [{"messageId": "behind"}])
    conn, _ = take(broker.url, transport, queue, 2)
    conn.default_channel.qos.visibility_timeout = -1  # everything delivered counts as abandoned
    conn.default_channel.qos.restore_visible(num=100, interval=1)
    conn.release()
    back = on_list(broker.url, queue.name)
    assert sorted(back, key=len)[0] == b"{broken" and len(back) == 2
    assert json.loads(sorted(back, key=len)[1])["headers"]["redelivered"] is True


BROKEN = {
    "bad base64": lambda m: {**m, "body": "!!x"},
    "headers a string": lambda m: {**m, "headers": "x"},
    "properties a list": lambda m: {**m, "properties": [1]},
    "task name a list": lambda m: {**m, "headers": {**m["headers"], "task": ["invoices.record_payment"]}},
    "task id a number": lambda m: {**m, "headers": {**m["headers"], "id": 7}},
    "retries a string": lambda m: {**m, "headers": {**m["headers"], "retries": "x"}},
    "task id missing": lambda m: {**m, "headers": {k: v for k, v in m["headers"].items() if k != "id"}},
    "not JSON": lambda m: b"\x00\x01 garbage",
    "a JSON array": lambda m: [m],
}
# Caught by the transport (the envelope) rather than by the consumer (the task headers).
TRANSPORT_LEVEL = {"bad base64", "headers a string", "properties a list", "not JSON", "a JSON array"}


def test_a_broken_item_is_dead_lettered_whole_and_its_read_goes_on(scenario) -> None:
    """Before: `Unrecoverable error: binascii.Error` (or TypeError), the worker exited 1, and every
    message of that read waited in `unacked` for the visibility timeout (an hour)."""
    if not scenario.broker_url.startswith("redis"):
        pytest.skip("Redis lists")
    worker = scenario.processes.worker()
    publisher, ledger, tenant = scenario.publisher(), Ledger(), f"t-{uuid.uuid4().hex[:6]}"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "B-1", total="1000.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    client = redis.Redis.from_url(scenario.broker_url)
    items: dict[str, bytes] = {}
    for name, damage in BROKEN.items():
        broken = damage(json.loads(celery_message("invoices.record_payment", payment(tenant, "B-1", "1.00"),
                                                  "invoices.payments")))
        items[name] = broken if isinstance(broken, bytes) else json.dumps(broken).encode()
    client.lpush("invoices.payments", *items.values())  # one read takes them all, valid ones behind them
    for _ in range(5):
        send(publisher, ledger, "invoices.record_payment", payment(tenant, "B-1", "1.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)

    def kept() -> list:
        return [d for d in dead_letters(scenario.database_url) if d[1] in ("not-a-message", "invalid-task")]

    wait_for(lambda: len(kept()) >= len(items), 60, what="a dead letter for every broken item")
    assert len(kept()) == len(items), kept()
    assert worker.poll() is None  # still consuming
    assert all(outcomes(scenario.database_url)[(tenant, m)] == "applied" for m in ledger.messages)
    wait_for(lambda: client.hlen("unacked") == 0, 30, what="nothing left unacknowledged")
    with psycopg.connect(conninfo(scenario.database_url)) as db:
        stored = [row[0] for row in db.execute("SELECT body FROM dead_letters WHERE reason = 'not-a-message'")]
    from worker.delivery.dead_letters import original_body

    kept_items = [original_body(body) for body in stored]
    assert all(items[name] in kept_items for name in TRANSPORT_LEVEL), kept_items  # byte for byte


def celery_message(task: str, body: dict[str, Any], queue: str) -> bytes:
    """A task message as Celery (protocol 2) writes it to a Redis list."""
    import base64

    task_id = str(uuid.uuid4())
    encoded = base64.b64encode(json.dumps([[body], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                         "chord": None}]).encode()).decode()
    return json.dumps({
        "body": encoded, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
                    "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
                    "root_id": task_id, "parent_id": None, "argsrepr": repr((body,)), "kwargsrepr": "{}",
                    "origin": "test", "ignore_result": False},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": queue, "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }).encode()


def test_messages_held_for_a_far_eta_do_not_stop_ready_work(scenario) -> None:
    """Before: the consumer counted messages held for their eta against the bytes it may hold
    (2 × MAX_MESSAGE_BYTES): three ~6 MB messages due in 50 minutes, from any tenant, stopped the
    worker taking anything else for those 50 minutes. Now they wait in Redis (parked), not in the
    worker, and come back to their queue when their eta comes."""
    if not scenario.broker_url.startswith("redis"):
        pytest.skip("Redis lists")
    from datetime import datetime, timedelta, timezone

    worker = scenario.processes.worker(extra_env={"BROKER_VISIBILITY_TIMEOUT": "3600"})  # an eta of 50 min is allowed
    publisher, ledger, tenant = scenario.publisher(), Ledger(), f"t-{uuid.uuid4().hex[:6]}"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "E-1", total="1000.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    client = redis.Redis.from_url(scenario.broker_url)
    later = datetime.now(timezone.utc) + timedelta(minutes=50)
    for _ in range(3):
        big = {**payment(f"t-other-{uuid.uuid4().hex[:4]}", "E-9", "1.00"), "notes": "n" * 6_000_000}
        publisher.send_task("invoices.record_payment", args=[big], queue="invoices.payments", eta=later)
    wait_for(lambda: client.llen("invoices.payments") == 0, 60, what="the worker to take the far-eta messages")
    for _ in range(5):
        send(publisher, ledger, "invoices.record_payment", payment(tenant, "E-1", "1.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)  # before: none of them within the 50 minutes
    assert client.zcard("invoices.parked") == 3  # waiting in Redis, not in the worker
    assert client.hlen("unacked") == 0 and worker.poll() is None


def test_a_parked_message_comes_back_when_its_eta_comes(scenario) -> None:
    if not scenario.broker_url.startswith("redis"):
        pytest.skip("Redis lists")
    from datetime import datetime, timedelta, timezone

    from worker.brokers.redis_transport import PARKED_ITEMS_KEY, PARKED_KEY

    scenario.processes.worker()
    publisher, ledger, tenant = scenario.publisher(), Ledger(), f"t-{uuid.uuid4().hex[:6]}"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "E-2", total="1000.00"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    client = redis.Redis.from_url(scenario.broker_url)
    due = payment(tenant, "E-2", "4.00")
    ledger.record("invoices.record_payment", due)
    publisher.send_task("invoices.record_payment", args=[due], queue="invoices.payments",
                        eta=datetime.now(timezone.utc) + timedelta(seconds=8))
    wait_for(lambda: client.zcard(PARKED_KEY) == 1, 30, what="the message parked")
    assert (tenant, due["messageId"]) not in outcomes(scenario.database_url)  # not before its eta
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    assert client.zcard(PARKED_KEY) == 0 and client.hlen(PARKED_ITEMS_KEY) == 0 and client.hlen("unacked") == 0
