"""The cost of task events (issue #30): end to end with them off and on (batching on, a Celery event
receiver listening as Flower would), and what they cost one message in CPU, measured in-process."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Any

from bench.harness import Environment, wait
from bench.payments import end_to_end


class SucceededEvents:
    """A Celery event receiver (what Flower runs) counting task-succeeded events while it is open."""

    def __init__(self) -> None:
        from worker.celery_app import app

        self.app, self.count, self.receiver = app, 0, None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"task-succeeded": self._succeeded})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _succeeded(self, event: dict[str, Any]) -> None:
        self.count += 1

    def __enter__(self) -> "SucceededEvents":
        self.thread.start()
        wait(lambda: self.receiver is not None, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)


def side_by_side(env: Environment, make_bodies: Any, concurrency: int, rounds: int = 2) -> dict[str, Any]:
    """End to end (batching on) with task events off and on, alternating, `rounds` times each; with
    them on, a Celery event receiver listens, as Flower would, and counts the task-succeeded events."""
    off: list[dict[str, float]] = []
    on: list[dict[str, float]] = []
    per_message = []
    for _ in range(rounds):
        off.append(end_to_end(env, make_bodies(), concurrency, {"WORKER_SEND_TASK_EVENTS": "false"}))
        bodies = make_bodies()
        with SucceededEvents() as events:
            on.append(end_to_end(env, bodies, concurrency, {"WORKER_SEND_TASK_EVENTS": "true"}))
            wait(lambda: events.count >= len(bodies), 30)
        per_message.append(events.count / len(bodies))
    return {"off": [r["rate"] for r in off], "on": [r["rate"] for r in on],
            "cpu_off_us": statistics.mean(r["worker_cpu_us"] for r in off),
            "cpu_on_us": statistics.mean(r["worker_cpu_us"] for r in on), "succeeded_per_message": min(per_message),
            **micro()}


def micro(batches: int = 50, size: int = 100) -> dict[str, float]:
    """CPU per message of what the worker does for a batched message's Celery view (worker state
    only, events off; and with its three events built, serialized and published, on), in this
    process, on kombu's in-memory transport (a broker's answer is not CPU of the worker)."""
    from celery import Celery, current_app

    from worker.delivery import task_events

    previous = current_app._get_current_object()  # a pool process's dispatcher uses the current app
    app = Celery("micro", broker="memory://")
    app.conf.event_serializer = "json"
    app.set_current()
    dispatcher = app.events.Dispatcher(app.connection_for_write(), hostname="bench@localhost", buffer_group=["task"],
                                       buffer_limit=24)  # as the consumer's
    consumer = SimpleNamespace(hostname="bench@localhost", event_dispatcher=dispatcher, app=app)
    task = SimpleNamespace(name="invoices.record_payment", send_events=True)
    task_events._pool["hostname"] = "bench@localhost"
    result = {"outcome": "applied", "messageId": f"pay-{uuid.uuid4()}", "invoiceId": str(uuid.uuid4()),
              "invoiceNumber": "INV-00001", "paymentId": str(uuid.uuid4())}

    def message() -> Any:
        body = {"messageId": f"pay-{uuid.uuid4()}", "tenantId": "acme", "invoiceNumber": "INV-00001",
                "amount": "10.00", "currency": "USD", "paymentMethod": "EFT"}
        return SimpleNamespace(headers={"id": str(uuid.uuid4()), "argsrepr": repr([body]), "kwargsrepr": "{}"},
                               body=json.dumps([[body], {}, {}]), content_type="application/json",
                               content_encoding="utf-8", delivery_info={}, properties={})

    def run(on: bool) -> float:
        dispatcher.enabled = on
        work = [[message() for _ in range(size)] for _ in range(batches)]
        began = time.process_time()
        for batch in work:
            events = task_events.TaskEvents(consumer)
            requests = [events.request(m.headers["id"], task, m) for m in batch]
            for request in requests:
                events.received(request)
            events.started(requests, 1, time.monotonic())
            if on:
                for request in requests:
                    task_events.succeeded(request.id, result, 0.001)
                task_events.flush()
            events.ended(requests, [False] * size)
            if on:
                dispatcher.flush()
        return (time.process_time() - began) / (batches * size) * 1e6

    run(True)  # warm up
    off, on = min(run(False) for _ in range(3)), min(run(True) for _ in range(3))
    task_events._close()
    dispatcher.close()
    previous.set_current()
    return {"state_us": off, "events_us": on - off}
