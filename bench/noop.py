"""Ceiling A: a no-op task on the worker's own app (same broker, serializer, acknowledgement
settings and concurrency), routed to the maintenance queue."""

from __future__ import annotations

from worker.celery_app import app


@app.task(name="bench.noop", acks_late=True)
def noop(body: object = None) -> None:
    return None
