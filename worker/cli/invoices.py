"""`invoice-worker invoices list|get|history`."""

from __future__ import annotations

import json

import click
from rich.table import Table

from models.queries import AmbiguousInvoice, get_invoice, list_invoices
from models.rules import InvoiceStatus
from worker.cli.output import console
from worker.storage import db, history


@click.group()
def invoices() -> None:
    """Read invoices."""


@invoices.command("list")
@click.option("--tenant", help="Only this tenant's invoices.")
@click.option("--customer-id", help="Filter by customer ID.")
@click.option("--order-id", help="Filter by order ID.")
@click.option("--status", type=click.Choice([s.value for s in InvoiceStatus]), help="Filter by status.")
@click.option("--page", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--per-page", type=click.IntRange(1, 500), default=25, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the page of invoice objects as JSON.")
def list_command(tenant: str | None, customer_id: str | None, order_id: str | None, status: str | None,
                 page: int, per_page: int, as_json: bool) -> None:
    """As "List invoices": newest first, soft-deleted invoices hidden."""
    with db.sessions()() as session:
        result = list_invoices(session, tenant_id=tenant, customer_id=customer_id, order_id=order_id, status=status,
                               page=page, per_page=per_page)
        if as_json:
            click.echo(json.dumps({"page": result.page, "perPage": result.per_page, "total": result.total,
                                   "invoices": [i.to_json() for i in result.invoices]}, indent=2))
            return
        table = Table(title=f"invoices: page {result.page} of {result.pages} ({result.total} in all)")
        for column in ("tenant", "invoice", "status", "customer", "order", "date", "due", "total", "paid", "balance"):
            table.add_column(column, justify="right" if column in ("total", "paid", "balance") else "left")
        for i in result.invoices:
            j = i.to_json()
            table.add_row(i.tenant_id, i.invoice_number, j["status"], i.customer_id or "", i.order_id or "",
                          j["invoiceDate"] or "", j["dueDate"] or "", f"{j['invoiceTotal']} {i.currency}",
                          j["amountPaid"], j["balance"])
        console().print(table)


@invoices.command("get")
@click.argument("invoice")
@click.option("--tenant", help="The tenant (needed when two tenants share the invoice number).")
@click.option("--json", "as_json", is_flag=True, help="Print the invoice object as JSON.")
def get_command(invoice: str, tenant: str | None, as_json: bool) -> None:
    """The full invoice object: INVOICE is an invoice number or GUID."""
    with db.sessions()() as session:
        try:
            found = get_invoice(session, invoice, tenant)
            gone = history.tombstone(session, invoice, tenant) if found is None else None
        except AmbiguousInvoice as exc:
            raise click.ClickException(str(exc)) from None
        if gone is not None:  # exit status 1, saying when and by which message
            raise click.ClickException(history.deleted_sentence(gone))
        if found is None:
            raise click.ClickException(f"no invoice {invoice}" + (f" for tenant {tenant}" if tenant else ""))
        data = found.to_json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    out = console()
    out.print(f"{data['invoiceNumber']}  {data['status']}  tenant {data['tenantId']}  id {data['id']}")
    out.print(f"order {data['orderId']} ({data['orderNumber']})  customer {data['customer'].get('companyName') or data['customer'].get('customerId')}")
    out.print(f"date {data['invoiceDate']}  due {data['dueDate']}  terms {data['paymentTerms']}")
    lines = Table("#", "sku", "description", "qty", "unit price", "discount", "total")
    for line in data["lineItems"]:
        lines.add_row(str(line["lineNumber"]), line["sku"] or "", line["description"] or "", line["quantity"],
                      line["unitPrice"], line["discountAmount"], line["lineTotal"])
    out.print(lines)
    out.print(f"subtotal {data['subtotal']}  discount {data['discountAmount']}  tax {data['taxAmount']}  "
                  f"total {data['invoiceTotal']} {data['currency']}  paid {data['amountPaid']}  balance {data['balance']}")
    if data["payments"]:
        payments = Table("payment", "status", "amount", "method", "refunded", "failure")
        for p in data["payments"]:
            payments.add_row(p["paymentId"], p["status"], p["amount"], p["paymentMethod"] or p["provider"] or "",
                             p["refundedAmount"], p["failureCode"] or "")
        out.print(payments)


@invoices.command("history")
@click.argument("invoice")
@click.option("--tenant", help="The tenant (needed when two tenants share the invoice number).")
@click.option("--json", "as_json", is_flag=True, help="Print the changes as JSON.")
def history_command(invoice: str, tenant: str | None, as_json: bool) -> None:
    """Every change of the invoice, oldest first, kept for good (deleted invoices too)."""
    with db.sessions()() as session:
        try:
            rows = [history.to_json(r) for r in history.history(session, invoice, tenant)]
        except AmbiguousInvoice as exc:
            raise click.ClickException(str(exc)) from None
    if not rows:
        raise click.ClickException(f"no history of invoice {invoice}" + (f" for tenant {tenant}" if tenant else ""))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    first = rows[0]
    table = Table(title=f"history of {first['invoiceNumber']} (tenant {first['tenantId']}, id {first['invoiceId']})")
    for column in ("when", "task", "message", "events", "status", "total", "paid", "balance"):
        table.add_column(column, justify="right" if column in ("total", "paid", "balance") else "left")
    for r in rows:
        events = ", ".join(f"{e['type']} #{e['sequence']}" for e in r["events"])
        status = f"{r['statusBefore'] or '(new)'} → {r['statusAfter'] or '(deleted)'}"
        table.add_row(r["recordedAt"][:23], r["task"].removeprefix("invoices."), r["messageId"] or r["causationId"] or "",
                      events, status, f"{r['invoiceTotal']} {r['currency']}", r["amountPaid"], r["balance"])
    console().print(table)
