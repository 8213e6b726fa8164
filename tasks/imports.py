"""invoices.bulk_import: a batch of invoices from another system, upserted by invoiceNumber."""

from __future__ import annotations

from tasks.messages import BulkImport
from worker.bulk_import import import_batch
from worker.celery_app import app
from worker.task_base import InvoiceTask


@app.task(name="invoices.bulk_import", base=InvoiceTask, bind=True)
def bulk_import(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(BulkImport, body, import_batch, args, kwargs)
