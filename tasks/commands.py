"""The invoice commands of the invoices.commands queue: one domain operation each."""

from __future__ import annotations

from typing import Any, Callable

from messages.schemas import ApplyDiscount, CreateInvoice, InvoiceCommand, UpdateInvoice
from models.address import InvoiceAddress
from models.errors import DomainError
from models.invoice import Invoice
from worker.celery_app import app
from worker.delivery.batching import batchable
from worker.delivery.task_base import InvoiceTask
from worker.storage.unit_of_work import Outcome, UnitOfWork


def applied(message: Any, invoice: Invoice, **extra: Any) -> Outcome:
    return Outcome("applied", message.message_id, invoice_id=invoice.id, invoice_number=invoice.invoice_number,
                   extra=extra)


@app.task(name="invoices.create", base=InvoiceTask, bind=True)
def create(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(CreateInvoice, body, create_invoice, args, kwargs)


def create_invoice(uow: UnitOfWork, message: CreateInvoice) -> Outcome:
    """A Draft invoice. An invoiceNumber the tenant already has: duplicate when the content is
    the same, else rejected duplicate-invoice-number."""
    content = message.content()
    if message.invoice_number:
        existing = uow.find(InvoiceAddress(invoice_number=message.invoice_number))
        if existing is not None:
            if existing.has_content(content):
                return Outcome("duplicate", message.message_id, reason="same-invoice",
                               invoice_id=existing.id, invoice_number=existing.invoice_number)
            raise DomainError("duplicate-invoice-number",
                              f"tenant {message.tenant_id} already has an invoice {message.invoice_number} "
                              "with other content")
        uow.refuse_deleted_number(message.invoice_number)
    number = message.invoice_number or uow.next_invoice_number()
    return applied(message, uow.add(Invoice.create(tenant_id=message.tenant_id, invoice_number=number, content=content)))


@app.task(name="invoices.update", base=InvoiceTask, bind=True)
def update(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(UpdateInvoice, body, update_invoice, args, kwargs)


def update_invoice(uow: UnitOfWork, message: UpdateInvoice) -> Outcome:
    invoice = uow.invoice(message.address)
    invoice.update(message.content())
    return applied(message, invoice)


@app.task(name="invoices.apply_discount", base=InvoiceTask, bind=True)
def apply_discount(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
    return self.handle(ApplyDiscount, body, discount_invoice, args, kwargs)


def discount_invoice(uow: UnitOfWork, message: ApplyDiscount) -> Outcome:
    invoice = uow.invoice(message.address)
    invoice.apply_discount(message.discount.model_dump())
    return applied(message, invoice)


def _simple(task_name: str, operation: Callable[[Invoice], object]) -> Any:
    """The commands whose body is only the invoice address: issue, remove_discount, void, cancel, delete."""

    def apply(uow: UnitOfWork, message: InvoiceCommand) -> Outcome:
        invoice = uow.invoice(message.address)
        operation(invoice)
        return applied(message, invoice)

    def run(self: InvoiceTask, body: object = None, *args: object, **kwargs: object) -> dict:
        return self.handle(InvoiceCommand, body, apply, args, kwargs)

    run.__name__ = run.__qualname__ = task_name.split(".")[-1]
    batchable(task_name, InvoiceCommand, apply)
    return app.task(name=task_name, base=InvoiceTask, bind=True)(run)


issue = _simple("invoices.issue", Invoice.issue)
remove_discount = _simple("invoices.remove_discount", Invoice.remove_discount)
void = _simple("invoices.void", Invoice.void)
cancel = _simple("invoices.cancel", Invoice.cancel)
delete = _simple("invoices.delete", Invoice.delete)


batchable("invoices.create", CreateInvoice, create_invoice)
batchable("invoices.update", UpdateInvoice, update_invoice)
batchable("invoices.apply_discount", ApplyDiscount, discount_invoice)
