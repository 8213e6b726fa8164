"""The one place that turns an invoice into its camelCase JSON (CLI, events, tests)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP
from typing import TYPE_CHECKING, Any

from models.money import quantum

if TYPE_CHECKING:
    from models.invoice import Invoice


def invoice_json(invoice: "Invoice") -> dict[str, Any]:
    c = invoice.currency
    q = quantum(c)

    def amount(value: Any) -> str | None:
        return None if value is None else str(value.quantize(q, ROUND_HALF_UP))  # format_money (see quantum)

    return {
        "id": str(invoice.id),
        "tenantId": invoice.tenant_id,
        "orderId": invoice.order_id,
        "orderNumber": invoice.order_number,
        "shipmentId": invoice.shipment_id or None,
        "invoiceNumber": invoice.invoice_number,
        "externalId": invoice.external_id,
        "status": str(invoice.status),
        "invoiceDate": invoice.invoice_date.isoformat() if invoice.invoice_date else None,
        "dueDate": invoice.due_date.isoformat() if invoice.due_date else None,
        "paymentTerms": invoice.payment_terms,
        "currency": c,
        "purchaseOrderNumber": invoice.purchase_order_number,
        "notes": invoice.notes,
        "customer": invoice.customer or {},
        "salesRep": invoice.sales_rep,
        "lineItems": [line.to_json(c, q) for line in invoice.line_items],
        "discount": invoice.discount,
        "subtotal": amount(invoice.subtotal),
        "discountAmount": amount(invoice.discount_amount),
        "taxAmount": amount(invoice.tax_amount),
        "invoiceTotal": amount(invoice.invoice_total),
        "importedInvoiceTotal": amount(invoice.imported_invoice_total),
        "importedBalance": amount(invoice.imported_balance),
        "amountPaid": amount(invoice.amount_paid),
        "balance": amount(invoice.balance),
        "isActive": invoice.is_active,
        "payments": [p.to_json(invoice.payment_by_key(p.retry_of) if p.retry_of else None) for p in invoice.payments],
        "version": invoice.version,
        "createdAt": invoice.created_at.isoformat() if invoice.created_at else None,
        "updatedAt": invoice.updated_at.isoformat() if invoice.updated_at else None,
    }
