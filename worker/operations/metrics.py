"""Prometheus metrics (CONTRACT.md section 10), correct across the pool processes of the worker.

Counters and the task-time histogram are counted where the outcome is known, in the pool process
that ran the message, through prometheus_client's multiprocess mode: each process writes its own
memory-mapped file in PROMETHEUS_MULTIPROC_DIR, and a scrape (in the worker's main process) adds
the files up. A file outlives its process, so a counter never goes back when a pool process is
replaced. The relay counts the events it publishes into the same folder when `invoice-worker run`
starts it (it then sees them in the worker's scrape); alone, it serves its own port.

The alternative, counting in the main process, would add its work to the one thread that feeds
every pool process, and it only receives a task's return value as a repr string. The multiprocess
mode costs one memory-mapped write per sample in the process that already holds the numbers
(measured: see the commit that introduced this module and BENCHMARKS.md).

Gauges (outbox lag, open dead letters, queue depth) are read at scrape time: see worker.operations.health.

prometheus_client chooses between per-process and multiprocess values when it is imported, so
nothing imports it before `enable()` has set PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = ("applied", "duplicate", "rejected", "dead_lettered", "retried")
# Most messages take milliseconds; a bulk import batch can take a minute.
TASK_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_metrics: dict[str, Any] = {}
_owned_directory: str | None = None


def enabled() -> bool:
    return bool(_metrics)


def enable(*, multiprocess: bool = True) -> str | None:
    """Create the metrics of this process (and of the pool processes it forks later). With
    `multiprocess`, values go to PROMETHEUS_MULTIPROC_DIR: the given folder (which its owner,
    e.g. `invoice-worker run`, made empty), else a private one removed by `disable()`.
    Returns the folder, or None for per-process values."""
    global _owned_directory
    if _metrics:
        return os.environ.get(MULTIPROC_VARIABLE)
    directory = os.environ.get(MULTIPROC_VARIABLE) if multiprocess else None
    if multiprocess and not directory:
        directory = _owned_directory = tempfile.mkdtemp(prefix="invoice-worker-metrics-")
        os.environ[MULTIPROC_VARIABLE] = directory
    from prometheus_client import Counter, Histogram, disable_created_metrics, values

    if directory and not _is_multiprocess(values):
        raise RuntimeError("prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set")
    disable_created_metrics()  # the multiprocess mode has no *_created series; alone, none either
    _metrics.update(
        messages=Counter("invoice_worker_messages", "Messages by task and outcome.", ["task", "outcome"]),
        rejections=Counter("invoice_worker_rejections", "Rejected messages by task and reason code.",
                           ["task", "reason"]),
        task_seconds=Histogram("invoice_worker_task_seconds", "Time a pool process spent on one message.",
                               ["task"], buckets=TASK_SECONDS_BUCKETS),
        events=Counter("invoice_worker_events_published", "Events published by the relay, by type.", ["type"]),
    )
    return directory


def _is_multiprocess(values: Any) -> bool:
    return "MultiProcessValue" in getattr(values.ValueClass, "__qualname__", "")


def disable() -> None:
    """Forget the metrics; remove the private folder (a given one belongs to whoever gave it)."""
    global _owned_directory
    _metrics.clear()
    if _owned_directory:
        shutil.rmtree(_owned_directory, ignore_errors=True)
        if os.environ.get(MULTIPROC_VARIABLE) == _owned_directory:
            del os.environ[MULTIPROC_VARIABLE]
        _owned_directory = None


def count_message(task: str, outcome: str, reason: str | None = None, seconds: float | None = None) -> None:
    """One message ended: its outcome (applied, duplicate, rejected, dead_lettered, retried)."""
    if not _metrics:
        return
    _metrics["messages"].labels(task, outcome).inc()
    if outcome == "rejected":
        _metrics["rejections"].labels(task, reason or "unknown").inc()
    if seconds is not None:
        _metrics["task_seconds"].labels(task).observe(seconds)


def count_events(types: list[str]) -> None:
    """The relay published these events."""
    if not _metrics:
        return
    counter = _metrics["events"]
    for type_ in types:
        counter.labels(type_).inc()


class _Together:
    """Several collectors read as one registry, built per scrape (nothing registered globally, so
    concurrent scrapes never see each other's collectors)."""

    def __init__(self, *sources: Any) -> None:
        self.sources = sources

    def collect(self) -> Any:
        for source in self.sources:
            yield from source.collect()


def exposition(*collectors: Any) -> tuple[bytes, str]:
    """The Prometheus text of this worker: every process's counters and histograms, and the given
    scrape-time collectors. (Body, content type.)"""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    directory = os.environ.get(MULTIPROC_VARIABLE)
    if directory:
        from prometheus_client import multiprocess

        counted: Any = multiprocess.MultiProcessCollector(None, path=directory)
    else:
        counted = REGISTRY
    return generate_latest(_Together(counted, *collectors)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
