"""Celery's signals that feed what operators see, in every `celery -A worker worker`:

- main process, before the pool forks: the metrics are made (multiprocess, see worker.operations.metrics);
- main process, once consuming: the endpoint on METRICS_PORT starts, every message received from
  the broker is noted, and readiness is checked every WATCH_SECONDS (the "stopped consuming"
  check of /readyz, worker.operations.health, logs an ERROR when it trips);
- pool process, around each message: its outcome and time are counted, and (LOG_FORMAT=json)
  its line is logged.

Only the return value of a task says what happened to its message, so the counting sits here,
once for every task, rather than in each task.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import signals

from worker.operations import logs, metrics
from worker.config import settings

log = logging.getLogger(__name__)

# A task's outcome as its counter's label (section 4's names, as Prometheus labels).
OUTCOME_LABELS = {"applied": "applied", "duplicate": "duplicate", "rejected": "rejected",
                  "dead-lettered": "dead_lettered"}

# How often the main process checks its own readiness when nobody asks (/readyz answers at once).
WATCH_SECONDS = 10.0

_started: dict[str, float] = {}
_worker: dict[str, Any] = {}


@signals.worker_init.connect
def _make_metrics(**_: Any) -> None:
    if settings().metrics_port:
        metrics.enable()


@signals.worker_ready.connect
def _watch_and_serve(sender: Any = None, **_: Any) -> None:
    """The consumer is ready: watch readiness (an ERROR when the worker stops consuming, even when
    nobody scrapes), and serve /metrics, /healthz and /readyz unless METRICS_PORT is 0."""
    if sender is None:
        return
    from worker.endpoints import broker_url, database_url
    from worker.operations.endpoint import serve
    from worker.operations.health import Consumption, Probe

    config = settings()
    consumption = Consumption(sender.controller.concurrency, config.consumer_stall_seconds)
    queues = list(sender.app.amqp.queues.consume_from.values())
    probe = Probe(database_url(), broker_url(), queues, consumption)
    stop = threading.Event()
    threading.Thread(target=_watch, args=(probe, stop), name="readiness-watch", daemon=True).start()
    _worker.update(consumption=consumption, probe=probe, stop=stop,
                   server=serve(config.metrics_port, probe) if config.metrics_port else None)


def _watch(probe: Any, stop: threading.Event) -> None:
    while not stop.wait(WATCH_SECONDS):
        try:
            probe.readiness()
        except Exception:  # never let the watch die; the next round tries again
            log.exception("readiness check failed")


def readiness() -> tuple[bool, dict[str, Any]] | None:
    """This worker's readiness as /readyz reports it, (ready, {"ready", "problems"}); None outside
    a worker's main process. For code that wants to act on a worker that stopped consuming."""
    probe = _worker.get("probe")
    return probe.readiness() if probe is not None else None


@signals.worker_ready.connect
def _heartbeat_of_worker(**_: Any) -> None:
    """The worker says it is alive in `heartbeats` (worker/operations/heartbeats.py)."""
    from worker.operations import heartbeats

    _worker["heartbeat"] = heartbeats.start("worker")


@signals.beat_init.connect
def _heartbeat_of_beat(**_: Any) -> None:
    from worker.operations import heartbeats

    _worker["heartbeat"] = heartbeats.start("beat")


@signals.task_received.connect
def _received(**_: Any) -> None:
    consumption = _worker.get("consumption")
    if consumption is not None:
        consumption.received()


@signals.worker_shutdown.connect
def _stop_serving(**_: Any) -> None:
    if "stop" in _worker:
        _worker.pop("stop").set()
    server = _worker.pop("server", None)
    if server is not None:
        server.shutdown()
        server.server_close()
    metrics.disable()


@signals.task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@signals.task_postrun.connect
def _task_ended(task_id: str | None = None, task: Any = None, args: tuple = (), retval: Any = None,
                state: str | None = None, **_: Any) -> None:
    began = _started.pop(task_id, None) if task_id else None
    seconds = time.perf_counter() - began if began is not None else 0.0
    name = getattr(task, "name", "?")
    if state == "RETRY":
        outcome, reason = "retried", None
    elif state == "SUCCESS":
        result = retval if isinstance(retval, dict) else {}
        outcome, reason = OUTCOME_LABELS.get(result.get("outcome", "applied"), "applied"), result.get("reason")
    else:  # FAILURE: on_failure dead-lettered the message
        outcome, reason = "dead_lettered", type(retval).__name__ if isinstance(retval, BaseException) else None
    metrics.count_message(name, outcome, reason, seconds)
    logs.task_line(name, args[0] if args else None, retval if state == "SUCCESS" else None,
                   outcome, seconds, reason)
