"""invoices.bulk_import: a batch of invoices from another system, upserted by invoiceNumber."""

from __future__ import annotations

from messages.schemas import BulkImport
from worker.celery_app import app
from worker.delivery.task_base import InvoiceTask
from worker.storage import table_statistics
from worker.storage.bulk_import import import_batch


@app.task(name="invoices.bulk_import", base=InvoiceTask, bind=True)
def bulk_import(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    result = self.handle(BulkImport, body, import_batch, args, kwargs)
    table_statistics.refresh_if_stale()  # after the commit: what the import added, the planner then knows
    return result
