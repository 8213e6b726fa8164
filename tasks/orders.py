"""invoices.order_shipped: an order shipped, so its invoice is created (Draft, or Issued)."""

from __future__ import annotations

from messages.schemas import OrderShipped
from models.address import InvoiceAddress
from models.errors import DomainError
from models.invoice import Invoice
from worker.celery_app import app
from worker.delivery.batching import batchable
from worker.delivery.task_base import InvoiceTask
from worker.storage.unit_of_work import Outcome, UnitOfWork


@app.task(name="invoices.order_shipped", base=InvoiceTask, bind=True)
def order_shipped(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(OrderShipped, body, create_from_order, args, kwargs)


def create_from_order(uow: UnitOfWork, message: OrderShipped) -> Outcome:
    """One invoice per (tenantId, orderId, shipmentId); a given invoiceNumber is kept, otherwise
    the tenant's next number is assigned."""
    existing = uow.find_order_invoice(message.order_id, message.shipment_id)
    if existing is not None:
        return Outcome("duplicate", message.message_id, reason="order-already-invoiced",
                       invoice_id=existing.id, invoice_number=existing.invoice_number)
    deleted = uow.deleted_order_invoice(message.order_id, message.shipment_id)
    if deleted is not None:  # the order's invoice was made, then deleted: not made again
        return Outcome("duplicate", message.message_id, reason="order-already-invoiced",
                       detail=f"its invoice {deleted.invoice_number} was deleted", invoice_id=deleted.invoice_id,
                       invoice_number=deleted.invoice_number)
    if message.invoice_number and uow.find(InvoiceAddress(invoice_number=message.invoice_number), lock=False):
        raise DomainError("duplicate-invoice-number",
                          f"tenant {message.tenant_id} already has an invoice {message.invoice_number}")
    if message.invoice_number:
        uow.refuse_deleted_number(message.invoice_number)
    number = message.invoice_number or uow.next_invoice_number()
    invoice = uow.add(Invoice.create(tenant_id=message.tenant_id, invoice_number=number, content=message.content(),
                                     source="order_shipped", shipment_id=message.shipment_id))
    if message.auto_issue:
        invoice.issue()
    return Outcome("applied", message.message_id, invoice_id=invoice.id, invoice_number=invoice.invoice_number)


batchable("invoices.order_shipped", OrderShipped, create_from_order)
