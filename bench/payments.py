"""Ceilings A and B, and record_payment end to end, under steady load, and as duplicates."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psutil
import psycopg
from kombu import Producer

from bench.harness import Environment, EventsQueue, PeakMemory, ServerCpu, relay, wait, worker


def setup_invoices(env: Environment, count: int, prefix: str = "B") -> list[str]:
    """Issued invoices with room for many payments, made with one bulk import (fast and real)."""
    from messages.schemas import BulkImport
    from worker.delivery.handling import execute, parse
    from worker.storage.bulk_import import import_batch

    numbers = [f"{prefix}-{i:05d}" for i in range(count)]
    entries = [{"invoiceNumber": n, "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "100000.00"}],
                "importedInvoiceTotal": "100000.00", "importedBalance": "99999.00"} for n in numbers]
    for start in range(0, count, 5000):
        message = parse(BulkImport, {"messageId": f"setup-{prefix}-{start}", "tenantId": "bench", "batchId": "setup",
                                     "invoices": entries[start:start + 5000]})
        execute("invoices.bulk_import", message, import_batch)
    env.sql("UPDATE outbox SET published_at = now()")
    return numbers


def payment_bodies(numbers: list[str], count: int) -> list[dict[str, Any]]:
    return [{"messageId": f"pay-{uuid.uuid4()}", "tenantId": "bench", "invoiceNumber": numbers[i % len(numbers)],
             "amount": "1.00", "currency": "USD", "paymentMethod": "EFT"} for i in range(count)]


# RabbitMQ: how many publishes may await their confirmation at once.
CONFIRM_WINDOW = 2000


@dataclass
class Sent:
    began: float  # monotonic, when the sending began (the messages built)
    seconds: float  # until the broker had them all
    cpu_before: float  # the bench process's CPU seconds when the sending began


def publish(task: str, bodies: list[Any], queue: str) -> Sent:
    """Publish the bodies as Celery's send_task would; when sending began and how long it took until
    the broker had them all.

    The publisher stands for upstream services on machines of their own, but here it shares the
    worker's two cores: every microsecond it spends is taken from the worker under test. So each
    message is built before the clock starts, by Celery's own send_task (protocol 2, its headers,
    JSON), which hands kombu what it would send (_Recorder), and the clock covers only the sending:
    on Redis in kombu's pipelined batches where kombu has them (5.7), on RabbitMQ with up to
    CONFIRM_WINDOW publishes awaiting their confirmation (the app's own publisher waits for each
    one's before it sends the next, a round trip per message); the last confirmation closes the
    count, and a refused publish raises."""
    from worker.brokers.topology import is_amqp
    from worker.celery_app import app

    amqp = is_amqp(app.conf.broker_url)
    with app.connection_for_write(transport_options={"confirm_publish": False} if amqp else {}) as conn:
        channel = conn.default_channel
        messages = _prepared(app, Producer(channel), task, bodies, queue)
        producer = Producer(channel)
        cpu_before, began = _own_cpu(), time.monotonic()
        if not amqp:
            if producer.supports_batch_publish:
                with producer.batch(max_size=1000):
                    for args, kwargs in messages:
                        producer._publish(*args, **kwargs)
            else:
                for args, kwargs in messages:
                    producer._publish(*args, **kwargs)
            return Sent(began, time.monotonic() - began, cpu_before)
        confirmed, refused = [0], []
        channel.events["basic_ack"].add(lambda tag, multiple: confirmed.__setitem__(0, max(confirmed[0], tag)))
        channel.events["basic_nack"].add(lambda tag, multiple: refused.append(tag))
        channel.confirm_select()
        for sent, (args, kwargs) in enumerate(messages, 1):
            producer._publish(*args, **kwargs)
            while sent - confirmed[0] >= CONFIRM_WINDOW:
                conn.drain_events(timeout=30)
        while confirmed[0] < len(messages) and not refused:
            conn.drain_events(timeout=30)
        if refused:
            raise RuntimeError(f"RabbitMQ refused {len(refused)} publishes (first tag {refused[0]})")
        return Sent(began, time.monotonic() - began, cpu_before)


def _own_cpu() -> float:
    """The bench process's own CPU seconds (the servers and the worker are its children)."""
    return sum(psutil.Process().cpu_times()[:2])


class _Recorder(Producer):
    """A producer that keeps what kombu would send (the serialized body, headers, properties,
    exchange, routing key, the queue to declare) instead of sending it."""

    recorded: list[tuple[tuple, dict]]

    def _publish(self, *args: Any, **kwargs: Any) -> None:
        self.recorded.append((args, kwargs))


def _prepared(app: Any, producer: Producer, task: str, bodies: list[Any], queue: str) -> list[tuple[tuple, dict]]:
    """Each body as Celery's send_task makes it (its argsrepr given: Celery otherwise builds a safe
    repr of every body), ready for Producer._publish."""
    recorder = _Recorder(producer.channel)
    recorder.recorded = []
    for body in bodies:
        app.send_task(task, args=[body], producer=recorder, queue=queue, argsrepr="(…)", kwargsrepr="{}")
    return recorder.recorded


def publish_alone(env: Environment, bodies: list[dict[str, Any]]) -> float:
    """The bench's publisher alone, no worker running: record_payment messages per second until the
    broker had them all (then they are purged). End to end must stay well below it, or the
    publisher and not the worker is what end to end measures."""
    env.purge()
    seconds = publish("invoices.record_payment", bodies, "invoices.payments").seconds
    env.purge()
    return len(bodies) / seconds


def ceiling_a(env: Environment, count: int, concurrency: int) -> dict[str, float]:
    """A no-op task: messages per second from the first publish until the queue is drained."""
    proc = worker(concurrency, include="bench.noop")
    try:
        with PeakMemory(proc) as memory:
            started = publish("bench.noop", [{}] * count, "invoices.maintenance").began
            done = wait(env.queue_drained, 300)
        return {"rate": count / (done - started), "seconds": done - started, "pss_mb": memory.mb, "rss_mb": memory.rss_mb}
    finally:
        proc.stop()


def capture_record_payment(numbers: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The statements (and parameters) that one record_payment runs, as the worker runs them."""
    from sqlalchemy import event

    from messages.schemas import RecordPayment
    from tasks.payments import record_offline_payment
    from worker.delivery.handling import execute, parse
    from worker.storage import db

    captured: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        captured.append((statement, params))

    engine = db.engine()
    event.listen(engine, "before_cursor_execute", keep)
    try:
        body = payment_bodies(numbers, 1)[0]
        execute("invoices.record_payment", parse(RecordPayment, body), record_offline_payment)
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    return captured


def fresh_value(value: Any, mapping: dict[Any, Any], keep: set[Any]) -> Any:
    """A captured statement's parameter for its replay: a new uuid or payment messageId in place of
    each one the capture made (the same new one wherever the old one appears), the `keep` ones as
    they were."""
    if isinstance(value, uuid.UUID) and value not in keep:
        return mapping.setdefault(value, uuid.uuid4())
    if isinstance(value, str) and value.startswith("pay-"):
        return mapping.setdefault(value, f"pay-{uuid.uuid4()}")
    return value


def ceiling_b(env: Environment, numbers: list[str], seconds: float) -> dict[str, float]:
    """The same SQL in a tight psycopg loop on one connection: transactions per second."""
    statements = capture_record_payment(numbers)
    invoice_id = env.sql("SELECT id FROM invoices WHERE invoice_number = %s", (numbers[0],))[0][0]
    done, started = 0, time.monotonic()
    with psycopg.connect(env.libpq) as conn:
        version = conn.execute("SELECT version FROM invoices WHERE id = %s", (invoice_id,)).fetchone()[0]
        while time.monotonic() - started < seconds:
            mapping: dict[Any, Any] = {}
            for statement, params in statements:
                if isinstance(params, dict):
                    params = {k: fresh_value(v, mapping, {invoice_id}) for k, v in params.items()}
                    if "invoices_version" in params:  # the version check of the invoice's UPDATE
                        params["invoices_version"], params["version"] = version, version + 1
                    if "invoices_id" in params:
                        params["invoices_id"] = invoice_id
                conn.execute(statement, params, prepare=True)
            conn.commit()
            version += 1
            done += 1
    return {"rate": done / (time.monotonic() - started), "statements": len(statements)}


def publish_payments_until_applied(env: Environment, bodies: list[dict[str, Any]]) -> tuple[Sent, float]:
    """Publish record_payment bodies and wait until each has its inbox record and was acknowledged;
    how many messages a batch held on average (batch_fill)."""
    # Only the inbox rows made since the part began, through the BRIN index on processed_at (a
    # claim's processed_at is its transaction's start, after this clock reading). Counting every
    # record_payment row, ten times a second, was a sequential scan of the whole inbox: with
    # 2,000,000 rows there it took more of PostgreSQL's CPU than the worker's statements did
    # (the growth curve read 8,800 inbox tuples per message applied). Ceiling B's loop wrote inbox
    # rows of the same task before: these are older.
    since = env.sql("SELECT clock_timestamp()")[0][0]
    applied = ("SELECT count(*) FROM inbox WHERE processed_at >= %s AND task = 'invoices.record_payment'", (since,))
    before = env.sql(*applied)[0][0]
    sent = publish("invoices.record_payment", bodies, "invoices.payments")
    wait(lambda: env.sql(*applied)[0][0] >= before + len(bodies), 300, interval=0.1)
    wait(env.queue_drained, 30)
    return sent, batch_fill(env, "processed_at >= %s AND task = 'invoices.record_payment'", since)


def batch_fill(env: Environment, where: str, value: Any) -> float:
    """How many messages a batch held on average, of the inbox rows `where` picks: a batch's rows
    share their transaction's start (processed_at), a pool process committing a batch in one."""
    messages, batches = env.sql(f"SELECT count(*), count(DISTINCT processed_at) FROM inbox WHERE {where}", (value,))[0]
    return messages / max(1, batches)


def end_to_end(env: Environment, bodies: list[dict[str, Any]], concurrency: int,
               worker_env: dict[str, str] | None = None, nodes: int = 1) -> dict[str, float]:
    """From the first publish to the last event published, with the relay running (and `nodes`
    worker nodes of `concurrency` pool processes each)."""
    env.settle()
    procs = [worker(concurrency, worker_env) for _ in range(nodes)]
    rel = relay()
    try:
        cpu_before = sum(p.cpu_seconds() for p in procs)
        relay_before = rel.cpu_seconds()
        with PeakMemory(*procs) as memory, ServerCpu(env) as servers:
            sent, fill = publish_payments_until_applied(env, bodies)
            done = wait(lambda: env.sql("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0] == 0, 120)
        cpu = sum(p.cpu_seconds() for p in procs) - cpu_before
        per_message = {"worker_cpu_us": cpu, "relay_cpu_us": rel.cpu_seconds() - relay_before,
                       "broker_cpu_us": servers.seconds["broker"], "postgres_cpu_us": servers.seconds["postgres"],
                       # the bench's own process from the first send: the publisher, and polling for the end
                       "bench_cpu_us": _own_cpu() - sent.cpu_before}
        return {"rate": len(bodies) / (done - sent.began), "seconds": done - sent.began, "batch_fill": fill,
                "pss_mb": memory.mb,
                "rss_mb": memory.rss_mb, "publish_rate": len(bodies) / sent.seconds,
                **{key: seconds / len(bodies) * 1e6 for key, seconds in per_message.items()}}
    finally:
        rel.stop()
        for each in procs:
            each.stop()


def cpu_split(e2e: dict) -> str:
    """Where a message's CPU goes (µs per message, end to end): the processes share this machine's cores."""
    parts = {"worker": e2e["worker_cpu_us"], "broker": e2e["broker_cpu_us"], "PostgreSQL": e2e["postgres_cpu_us"],
             "relay": e2e["relay_cpu_us"], "publisher": e2e["bench_cpu_us"]}
    return (f"{sum(parts.values()):.0f}: " + ", ".join(f"{name} {us:.0f}" for name, us in parts.items())
            + f"; {e2e['batch_fill']:.1f} messages a batch on average")


def duplicates(env: Environment, bodies: list[dict[str, Any]], concurrency: int,
               worker_env: dict[str, str] | None = None) -> dict[str, float]:
    """The same messages again: each is recognised by its messageId and changes nothing."""
    ids = [b["messageId"] for b in bodies]
    caused = "SELECT count(*) FROM outbox WHERE causation_id = ANY(%s)"
    before = env.sql(caused, (ids,))[0][0]
    env.settle()
    proc = worker(concurrency, worker_env)
    try:
        with PeakMemory(proc) as memory:
            started = publish("invoices.record_payment", bodies, "invoices.payments").began
            done = wait(env.queue_drained, 300)
        assert env.sql(caused, (ids,))[0][0] == before, "a duplicate wrote an event"
        return {"rate": len(bodies) / (done - started), "seconds": done - started, "pss_mb": memory.mb, "rss_mb": memory.rss_mb}
    finally:
        proc.stop()


def latency(env: Environment, numbers: list[str], rate: int, seconds: float, concurrency: int,
            worker_env: dict[str, str] | None = None) -> dict[str, float]:
    """At a steady rate: publish time to the arrival of its payment.recorded event in a queue bound
    to invoices.events (declared with kombu; read with BRPOP directly on Redis and with a plain py-amqp
    consumer on RabbitMQ, since kombu's synchronous consumer in this process would itself become the
    bottleneck)."""
    import base64
    import json

    import redis

    from worker.celery_app import app

    env.settle()
    proc, rel = worker(concurrency, worker_env), relay()
    queue = EventsQueue(env, "bench-latency", "payment.recorded")
    name = queue.name
    # Both on the wall clock, the one PostgreSQL's timestamps use (one machine): the stages of the
    # slowest messages are read between them.
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    stop = threading.Event()
    reader = None if env.amqp else redis.Redis.from_url(env.broker_url)

    def consume_amqp() -> None:
        # RabbitMQ pushes: one plain py-amqp consumer on a connection of its own.
        import socket
        from urllib.parse import unquote, urlparse

        import amqp

        url = urlparse(env.broker_url)
        with amqp.Connection(f"{url.hostname}:{url.port}", userid=url.username, password=url.password,
                             virtual_host=unquote(url.path[1:]) or "/") as conn:
            channel = conn.channel()
            channel.basic_consume(name, no_ack=True, callback=lambda m: received.__setitem__(
                json.loads(m.body)["causationId"], time.time()))
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=1)
                except socket.timeout:
                    pass

    def consume() -> None:
        if env.amqp:
            return consume_amqp()
        while not stop.is_set():
            item = reader.brpop([name], timeout=1)
            if item is None:
                continue
            envelope = json.loads(item[1])
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            received[json.loads(body)["causationId"]] = time.time()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        # Memory once a second here, not ten times: at 200 msg/s the samples were a quarter of this
        # process's CPU (py-spy), as much as publishing, on the cores the worker needs.
        with PeakMemory(proc, rel, interval=1.0) as memory, app.producer_or_acquire() as producer, \
                ServerCpu(env) as servers:
            bodies = payment_bodies(numbers, int(rate * seconds))
            machine_before, own_before = psutil.cpu_times(), _own_cpu()
            worker_before, relay_before = proc.cpu_seconds(), rel.cpu_seconds()
            began = time.monotonic()
            for i, body in enumerate(bodies):
                pause = began + i / rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent[body["messageId"]] = time.time()
                app.send_task("invoices.record_payment", args=[body], queue="invoices.payments", producer=producer)
            try:
                wait(lambda: len(received.keys() & sent.keys()) >= len(bodies), 60)
            except TimeoutError:
                pass  # reported below as events that did not arrive in time
            busy = _busy(machine_before, psutil.cpu_times())
            split = {"worker_cpu_us": proc.cpu_seconds() - worker_before, "relay_cpu_us": rel.cpu_seconds() - relay_before,
                     "bench_cpu_us": _own_cpu() - own_before}
        delays = sorted((received[m] - sent[m]) * 1000 for m in sent if m in received)
        q = statistics.quantiles(delays, n=100)
        # The relay's own share: from the event's insert in the committing transaction to its publication.
        relay_ms = env.sql(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d) "
            "FROM (SELECT extract(epoch FROM published_at - created_at) * 1000 AS d FROM outbox "
            "WHERE type = 'payment.recorded' AND causation_id = ANY(%s)) AS x", (list(sent),))[0]
        return {"p50": statistics.median(delays), "p95": q[94], "p99": q[98], "count": len(delays),
                "batch_fill": batch_fill(env, "tenant_id = 'bench' AND message_id = ANY(%s)", list(sent)),
                "missing": len(bodies) - len(delays), "pss_mb": memory.mb, "rss_mb": memory.rss_mb,
                "commit_to_publish_p50": float(relay_ms[0]), "commit_to_publish_p99": float(relay_ms[1]), "busy": busy,
                **{key: cpu / len(bodies) * 1e6 for key, cpu in split.items()},
                **{f"{name}_cpu_us": cpu / len(bodies) * 1e6 for name, cpu in servers.seconds.items()},
                "slowest": _stages(env, sent, received, q[98])}
    finally:
        stop.set()
        consumer.join(5)
        queue.delete()
        try:  # what the worker could not keep up with is finished before the next part
            wait(env.queue_drained, 180)
        finally:
            rel.stop()
            proc.stop()



def _busy(before: Any, after: Any) -> float:
    """The share of the machine's cores busy between two psutil.cpu_times() (every process on it)."""
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    total = sum(after) - sum(before)
    return 1 - idle / total if total > 0 else 0.0


STAGES = ("to its batch", "applying", "commit and relay", "to arrival")


def _stages(env: Environment, sent: dict[str, float], arrived: dict[str, float], p99_ms: float) -> dict[str, float]:
    """Where the slowest 1% of messages (publish to arrival at or above p99) spent their time, mean
    ms per stage: publish to their batch's transaction start (broker, fetch, gathering the batch,
    the hand-off to a pool process: the inbox row's processed_at), applying (to the outbox row's
    insert), commit and relay (the commit, the relay's next read and its publication: published_at,
    marked once the broker took the event) and from there to arrival (the bench's consumer; the
    event may arrive before the relay marks it, by a millisecond)."""
    slow = [m for m in arrived if m in sent and (arrived[m] - sent[m]) * 1000 >= p99_ms]
    rows = env.sql(
        "SELECT i.message_id, extract(epoch FROM i.processed_at), extract(epoch FROM o.created_at), "
        "extract(epoch FROM o.published_at) FROM inbox AS i JOIN outbox AS o ON o.causation_id = i.message_id "
        "AND o.type = 'payment.recorded' WHERE i.tenant_id = 'bench' AND i.message_id = ANY(%s)", (slow,))
    totals = [0.0] * len(STAGES)
    for message, started, inserted, published in rows:
        marks = [sent[message], float(started), float(inserted), float(published), arrived[message]]
        for n in range(len(STAGES)):
            totals[n] += (marks[n + 1] - marks[n]) * 1000
    return {stage: total / max(1, len(rows)) for stage, total in zip(STAGES, totals)}


def slowest(result: dict[str, Any]) -> str:
    return (f"cores {result['busy']:.0%} busy, CPU per message, µs {cpu_split(result)}; the slowest 1%, mean ms: "
            + ", ".join(f"{stage} {ms:.1f}" for stage, ms in result["slowest"].items()))


def hot_invoice(env: Environment, numbers: list[str], count: int, concurrency: int) -> dict[str, Any]:
    """`count` payments to one invoice (a customer paying in instalments through many channels)
    against the same count spread over `numbers`, end to end with batching on; then the checks:
    every payment applied once (one payment row and one payment.recorded event per message, the
    amount paid up by exactly their sum) and the invoice's event sequence gap-free."""
    from decimal import Decimal

    spread = end_to_end(env, payment_bodies(numbers, count), concurrency)
    hot_number = setup_invoices(env, 1, prefix="HOT")[0]
    invoice_id, paid_before = env.sql("SELECT id, amount_paid FROM invoices WHERE tenant_id = 'bench' AND "
                                      "invoice_number = %s", (hot_number,))[0]
    bodies = payment_bodies([hot_number], count)
    hot = end_to_end(env, bodies, concurrency)
    ids = [b["messageId"] for b in bodies]
    payments_made = env.sql("SELECT count(*) FROM payments WHERE invoice_id = %s", (invoice_id,))[0][0]
    events = env.sql("SELECT count(*), count(DISTINCT causation_id) FROM outbox WHERE type = 'payment.recorded' "
                     "AND causation_id = ANY(%s)", (ids,))[0]
    paid, sequence = env.sql("SELECT amount_paid, event_sequence FROM invoices WHERE id = %s", (invoice_id,))[0]
    sequences = [row[0] for row in env.sql("SELECT sequence FROM outbox WHERE invoice_id = %s ORDER BY sequence",
                                           (invoice_id,))]
    checks = {
        "applied once": payments_made == count and tuple(events) == (count, count)
        and paid - paid_before == Decimal("1.00") * count,
        "gap-free": sequences == list(range(1, sequence + 1)),
    }
    retried = env.sql("SELECT count(*) FROM inbox WHERE message_id = ANY(%s) AND outcome <> 'applied'", (ids,))[0][0]
    return {"spread": spread, "hot": hot, "checks": checks, "not_applied": retried}
