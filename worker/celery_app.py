"""The Celery app `worker`: JSON only, late acknowledgement, durable queues and routes of
CONTRACT.md section 2, and the beat schedule of section 8."""

from __future__ import annotations

import gc
import logging
import sys

from celery import Celery, signals

from worker.brokers import topology
from worker.brokers.topology import QUEUES, ROUTES
from worker.config import ConfigurationError, settings

TASK_MODULES = ("tasks.orders", "tasks.commands", "tasks.payments", "tasks.imports", "tasks.maintenance")


def _broker_url() -> str | None:
    from worker.endpoints import broker_url

    try:
        return broker_url()
    except ConfigurationError:
        return None  # commands that need no broker still import the app


def make_app() -> Celery:
    config = settings()
    app = Celery("worker")
    url = _broker_url()
    app.conf.update(
        # The transport and the queues' exchanges and arguments depend on the broker (worker/brokers/topology.py).
        **topology.broker_settings(tuple(QUEUES), url, config.max_deliveries),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        # No results; a revoke asks a task's state and is told PENDING (worker/delivery/revocation.py).
        result_backend="worker.delivery.revocation:NoResults",
        # At least once: acknowledge after the task ran, and hand the message back when the process running it dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # A task running when the broker connection drops cannot be acknowledged any more: its message
        # is handed back and runs again. Stop the old run at once rather than let two runs race (both
        # would be safe, by the inbox, but one is wasted); Celery 6 makes this the default.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=config.task_soft_time_limit,
        task_time_limit=config.task_time_limit,
        # Tasks can be long (bulk imports): one message at a time per pool process; with micro-batching,
        # room for two batches per pool process (one applied, one gathered).
        worker_prefetch_multiplier=max(config.worker_prefetch_multiplier,
                                       2 * config.apply_batch_size if config.apply_batch_size > 1 else 1),
        worker_concurrency=config.worker_concurrency,
        task_routes={task: {"queue": queue, "routing_key": queue} for task, queue in ROUTES.items()},
        task_default_queue="invoices.maintenance",
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # AMQP: heartbeats every BROKER_HEARTBEAT seconds, so that a silent connection (a partitioned
        # host) is noticed in seconds, not after TCP's minutes; the failover list of a cluster
        # (BROKER_URL `amqp://a;amqp://b;…`) is then tried in turn (kombu's round-robin).
        broker_heartbeat=config.broker_heartbeat,
        broker_connection_timeout=topology.CONNECT_TIMEOUT,  # Celery's default, which failover_options counts on
        broker_transport_options={
            # Redis: a message not acknowledged within this time goes to another worker. It must exceed
            # the longest task and the longest retry countdown (TASK_RETRY_BACKOFF_MAX).
            "visibility_timeout": config.broker_visibility_timeout,
            # AMQP: wait for the broker's confirmation of every publish.
            "confirm_publish": True,
            **topology.failover_options(url),
        },
        # Flower: task events on when WORKER_SEND_TASK_EVENTS is set (a publish per task state).
        worker_send_task_events=config.worker_send_task_events,
        worker_hijack_root_logger=False,
        worker_consumer="worker.delivery.consumer:InvoiceConsumer",
        imports=TASK_MODULES,
        beat_schedule={
            "retry-failed-payments": {
                "task": "invoices.retry_failed_payments",
                "schedule": config.payment_retry_scan_seconds,
                "args": [{}],
                "options": {"queue": "invoices.maintenance", "expires": config.payment_retry_scan_seconds},
            },
            "prune-outbox": {
                "task": "invoices.prune_outbox",
                "schedule": 3600.0,
                "args": [{}],
                "options": {"queue": "invoices.maintenance", "expires": 3600},
            },
            "prune-records": {
                "task": "invoices.prune_records",
                "schedule": 3600.0,
                "args": [{}],
                "options": {"queue": "invoices.maintenance", "expires": 3600},
            },
        },
    )
    # RabbitMQ only: plain JSON from any AMQP client, and what the broker dead-lettered (worker/delivery/ingress.py).
    app.steps["consumer"].add("worker.delivery.ingress:IngressStep")
    return app


try:
    app = make_app()
except ConfigurationError as exc:  # `celery -A worker …` with a wrong setting: one line, no traceback
    sys.stderr.write(f"configuration error: {exc}\n")
    raise SystemExit(2) from None


# An import batch allocates hundreds of thousands of objects that live until its commit; with the
# default threshold of 700 the collector walked them again and again (16% of an import's CPU).
# Objects still die by reference counting; cycles wait a little longer. Measured through 2 workers:
# 20,000 imported invoices 2,700 → 3,000 per second and peak PSS 245 → 199 MB; record_payment unchanged.
GC_THRESHOLD = (10_000, 20, 20)


@signals.worker_init.connect
def _freeze_startup_objects(**_: object) -> None:
    """Before the pool forks: the objects of start-up are never collected, so the collector does not
    walk them again and again, nor write to the pages the pool processes share with this one. The
    pool processes inherit both the frozen objects and the threshold (checked in a pool process)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


@signals.worker_init.connect
def _warn_unsigned_callbacks(**_: object) -> None:
    if not settings().callback_signing_secret:
        logging.getLogger(__name__).warning(
            "CALLBACK_SIGNING_SECRET is not set: payment callbacks are accepted unsigned; set it in production")


# What operators see: log format and redaction, metrics, /healthz and /readyz (Celery signals).
from worker.operations import logs, telemetry, tracing  # noqa: E402,F401


def publishing_app() -> Celery:
    """The app, connected to the broker; ConfigurationError when no broker can be found."""
    from worker.endpoints import broker_url

    url = broker_url()
    if app.conf.broker_url != url:
        topology.configure(app, tuple(QUEUES), url, settings().max_deliveries)
    return app

