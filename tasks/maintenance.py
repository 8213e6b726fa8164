"""The tasks of the invoices.maintenance queue, sent by Celery beat."""

from __future__ import annotations

from worker.celery_app import app
from worker.delivery import scheduler
from worker.delivery.task_base import InvoiceTask
from worker.storage import housekeeping


@app.task(name="invoices.retry_failed_payments", base=InvoiceTask, bind=True)
def retry_failed_payments(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    """Section 8: the body carries nothing the scan needs; any given is ignored."""
    return self.retrying(lambda: {"outcome": "applied", **scheduler.retry_failed_payments(scan_id=str(self.request.id))})


@app.task(name="invoices.prune_outbox", base=InvoiceTask, bind=True)
def prune_outbox(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.retrying(lambda: {"outcome": "applied", "pruned": housekeeping.prune_outbox()})


@app.task(name="invoices.prune_records", base=InvoiceTask, bind=True)
def prune_records(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    """The inbox (INBOX_RETENTION_DAYS), closed dead letters, invoice waits and delivery counts; and
    on Redis the queues of `events tail` processes that are gone."""
    return self.retrying(lambda: {"outcome": "applied", "pruned": housekeeping.prune_records(),
                                  "eventTails": scheduler.prune_event_tails(self.app)})
