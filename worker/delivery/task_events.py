"""A batched message as Celery's own tools see any task: listed by `celery inspect active`,
`reserved` and `query_task`, counted by `inspect stats`, and followed by its task events (what
Flower and `app.events.Receiver` read). Celery's path builds a Request per message for all that; a
batch has none (worker/delivery/batching.py), so the Batcher keeps a `BatchedRequest` per message
in Celery's worker state and sends the events Celery's path sends, each from where it is known:

| event            | sent from                                    | when |
|------------------|----------------------------------------------|------|
| `task-received`  | main process, the consumer's dispatcher      | the message is received (args and kwargs: the reprs its publisher put in its headers, as Celery's) |
| `task-started`   | main process                                 | a pool process took its batch (the pool's accept, as Celery's) |
| `task-succeeded` | the pool process, one dispatcher per process | its outcome is committed: `result` is the outcome's repr, `runtime` its share of the batch's time |
| `task-rejected`  | main process                                 | it was handed back (`requeue: true`); it comes back and runs alone, with Celery's own events |
| `task-revoked`   | main process (worker/delivery/revocation.py)  | its task id was revoked: dead-lettered `revoked`, not applied |

A batched message never fails alone (what fails is handed back and runs alone), so it sends no
`task-failed`. Events cost little: the consumer's dispatcher buffers task events and publishes them
together once per turn of the event loop (up to 24 in one `task.multi` message), and a pool
process publishes a batch's `task-succeeded` events in one message when the batch ends. Whether
they are sent follows the consumer's dispatcher, so `celery control enable_events` (which Flower
sends) turns them on for batched messages too.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from celery import current_app, signals
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state
from kombu.serialization import loads

log = logging.getLogger(__name__)

RESULT_REPR_MAX = 1024  # Celery's Task.resultrepr_maxsize


class BatchedRequest:
    """What Celery's worker state and control commands read of a task request, for a batched message."""

    __slots__ = ("id", "name", "message", "task", "hostname", "time_start", "worker_pid", "acknowledged",
                 "__weakref__")

    def __init__(self, task_id: str, task: Any, message: Any, hostname: str) -> None:
        self.id = task_id
        self.name = task.name
        self.task = task
        self.message = message
        self.hostname = hostname
        self.time_start: float | None = None
        self.worker_pid: int | None = None
        self.acknowledged = False

    def info(self, safe: bool = False) -> dict[str, Any]:
        """As Celery's Request.info: `safe` gives the publisher's reprs, else the decoded arguments
        (decoded here, when asked: the main process never decodes a batched message otherwise)."""
        headers = self.message.headers or {}
        if safe:
            args, kwargs = headers.get("argsrepr"), headers.get("kwargsrepr")
        else:
            try:
                args, kwargs, _ = loads(self.message.body, self.message.content_type, self.message.content_encoding,
                                        accept={"application/json"})
            except Exception:  # not decodable: its batch dead-letters it; show what its publisher said
                args, kwargs = headers.get("argsrepr"), headers.get("kwargsrepr")
        delivery = self.message.delivery_info or {}
        return {"id": self.id, "name": self.name, "args": args, "kwargs": kwargs, "type": self.name,
                "hostname": self.hostname, "time_start": self.time_start, "acknowledged": self.acknowledged,
                "delivery_info": {"exchange": delivery.get("exchange"), "routing_key": delivery.get("routing_key"),
                                  "priority": (self.message.properties or {}).get("priority"),
                                  "redelivered": delivery.get("redelivered", False)},
                "worker_pid": self.worker_pid}

    def terminate(self, pool: Any, signal: Any = None) -> None:
        """`revoke --terminate`: a batch is not killed for one of its messages (the others would be
        handed back with it). Revoked before its batch started, the message is dead-lettered;
        once started, its batch decides it within milliseconds."""
        log.info("%s[%s] runs in a batch and is not terminated alone", self.name, self.id)


def leave_active() -> None:
    """Take the batched messages out of Celery's active requests. Celery's consumer cancels its
    active requests when the broker connection is lost (with a WARNING that it terminates each) and
    at a cold shutdown; a batch is one pool job that runs to its end, and what it cannot acknowledge
    on the lost connection comes back and is applied once, by the inbox. They stay in `requests`
    until their batch ends."""
    for request in tuple(worker_state.active_requests):
        if isinstance(request, BatchedRequest):
            worker_state.active_requests.discard(request)


class TaskEvents:
    """The main process's half, one per Batcher: worker state, and the events of the consumer's dispatcher."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.hostname = consumer.hostname

    @property
    def dispatcher(self) -> Any:
        """The consumer's dispatcher, when it sends task events (read each time: the consumer makes a
        new one when it reconnects, and `enable_events` / `disable_events` change it)."""
        dispatcher = getattr(self.consumer, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled or (dispatcher.groups and "task" not in dispatcher.groups):
            return None
        return dispatcher

    def request(self, task_id: str, task: Any, message: Any) -> BatchedRequest:
        return BatchedRequest(task_id, task, message, self.hostname)

    def received(self, request: BatchedRequest) -> bool:
        """Reserved in the worker state; `task-received` sent when task events are on (returned)."""
        worker_state.task_reserved(request)
        dispatcher = self.dispatcher
        if dispatcher is None or not request.task.send_events:
            return False
        headers = request.message.headers or {}
        dispatcher.send("task-received", uuid=request.id, name=request.name, args=headers.get("argsrepr", ""),
                        kwargs=headers.get("kwargsrepr", ""), root_id=headers.get("root_id"),
                        parent_id=headers.get("parent_id"), retries=headers.get("retries") or 0,
                        eta=headers.get("eta"), expires=headers.get("expires"))
        return True

    def started(self, requests: Iterable[BatchedRequest], pid: int, time_accepted: float) -> None:
        """A pool process took the batch: its messages are active, and started."""
        time_start = time.time() - (time.monotonic() - time_accepted)
        dispatcher = self.dispatcher
        for request in requests:
            request.time_start, request.worker_pid = time_start, pid
            worker_state.task_accepted(request)
            if dispatcher is not None:
                dispatcher.send("task-started", uuid=request.id, timestamp=time_start)

    def ended(self, requests: Iterable[BatchedRequest], handed_back: Iterable[bool]) -> None:
        """Its batch ended: each message was acknowledged (its pool process sent `task-succeeded`) or
        handed back (`task-rejected`, requeued, as Celery sends when it requeues a message)."""
        dispatcher = self.dispatcher
        for request, back in zip(requests, handed_back):
            request.acknowledged = True
            worker_state.task_ready(request, successful=not back)
            if back and dispatcher is not None:
                dispatcher.send("task-rejected", uuid=request.id, requeue=True)

    def forget(self, requests: Iterable[BatchedRequest]) -> None:
        """Gathered by a consumer whose connection was lost: the broker hands them back."""
        for request in requests:
            worker_state.task_ready(request)

    def revoked(self, request: BatchedRequest | None, task_id: str) -> None:
        """Revoked by task id, dead-lettered and acknowledged: `task-revoked`, as Celery sends."""
        if request is not None:
            worker_state.task_ready(request)
        dispatcher = self.dispatcher
        if dispatcher is not None:
            dispatcher.send("task-revoked", uuid=task_id, terminated=False, signum=None, expired=False)


# ---------------------------------------------------------------- a pool process

# This pool process's worker hostname (Celery sends it with worker_process_init), its dispatcher
# (made at its first batch with events), and the events of the batch it is applying.
_pool: dict[str, Any] = {}
_batch_events: list[dict[str, Any]] = []


@signals.worker_process_init.connect
def _pool_process(sender: Any = None, **_: Any) -> None:
    _pool.clear()
    _pool["hostname"] = sender
    _batch_events.clear()


def succeeded(task_id: str, result: Any, runtime: float) -> None:
    """Note a batched message's `task-succeeded`, sent with its batch's others by `flush`."""
    _batch_events.append({"type": "task-succeeded", "uuid": task_id, "result": _result_repr(result),
                          "runtime": runtime, "timestamp": time.time()})


def retried(task_id: str, reason: str) -> None:
    """Note a `task-retried` of a message that left its batch and was sent again as a retry."""
    _batch_events.append({"type": "task-retried", "uuid": task_id, "exception": reason, "traceback": None,
                          "timestamp": time.time()})


def _result_repr(result: dict[str, Any]) -> str:
    """The result a `task-succeeded` event shows: the outcome's `repr`, or Celery's `saferepr(result,
    1024)` (what its own events carry) when longer. An outcome is a dict of JSON values, whose repr
    cannot fail and reads back as the outcome (saferepr quotes and escapes strings its own way and
    does not promise that); repr costs 4 µs where saferepr took 80 (an outcome of record_payment)."""
    text = repr(result)
    return text if len(text) <= RESULT_REPR_MAX else saferepr(result, RESULT_REPR_MAX)


def flush() -> None:
    """Publish the batch's events in one message. A connection gone stale (the broker restarted, or
    closed it while idle) is replaced once; the events of a broker that is away are dropped
    (they are a view, and the outcomes are recorded)."""
    if not _batch_events:
        return
    events = list(_batch_events)
    _batch_events.clear()
    for attempt in (1, 2):
        try:
            dispatcher = _dispatcher()
            for fields in events:
                dispatcher.send(**fields)
            dispatcher.flush(errors=False)
            return
        except Exception as exc:
            _close()
            if attempt == 1:
                log.info("task events: the broker connection was lost (%s: %s); a new one", type(exc).__name__, exc)
            else:
                log.warning("could not send the task events of %d batched messages (%s: %s)",
                            len(events), type(exc).__name__, exc)


def _dispatcher() -> Any:
    dispatcher = _pool.get("dispatcher")
    if dispatcher is None:
        app = current_app._get_current_object()
        # No AMQP heartbeat: nothing in a pool process would answer it while the process is idle.
        connection = app.connection_for_write(heartbeat=0)
        dispatcher = app.events.Dispatcher(connection, hostname=_pool.get("hostname"), buffer_group=["task"],
                                           buffer_limit=10_000, buffer_while_offline=False)
        _pool["dispatcher"], _pool["connection"] = dispatcher, connection
    return dispatcher


def _close() -> None:
    dispatcher, connection = _pool.pop("dispatcher", None), _pool.pop("connection", None)
    for closing in (dispatcher, connection):
        try:
            if closing is not None:
                closing.close() if closing is dispatcher else closing.release()
        except Exception:  # already broken: nothing to close cleanly
            pass
