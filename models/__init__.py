"""The invoice domain and its persistence: the invoice, its lines, payments and refunds, money,
the rules of every operation, and the events they raise.

Imports no other package of ours; inside it, modules import only downward (`invoice` takes its
mixins; the mixins name `Invoice` for typing only).
"""

from models.base import Base
from models.errors import DomainError, PaymentNotYetKnown
from models.events import DomainEvent
from models.invoice import Invoice
from models.line_item import LineItem
from models.payment import Payment, PaymentStatus, Refund
from models.rules import InvoiceStatus

__all__ = [
    "Base", "DomainError", "DomainEvent", "Invoice", "InvoiceStatus", "LineItem", "Payment", "PaymentNotYetKnown",
    "PaymentStatus", "Refund",
]
