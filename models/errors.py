"""Errors of the domain. Each carries the contract's reason code and a sentence a person can act on."""

from __future__ import annotations


class DomainError(Exception):
    """A rule of the reference forbids the operation: the message is rejected, not retried."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args, so that the error pickles across processes
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PaymentNotYetKnown(Exception):
    """A message names a payment that does not exist yet (it may arrive out of order): retry it."""

    def __init__(self, payment_id: str, invoice_number: str) -> None:
        super().__init__(payment_id, invoice_number)  # both in args, so that the error pickles
        self.payment_id = payment_id
        self.invoice_number = invoice_number

    def __str__(self) -> str:
        return f"payment {self.payment_id} of invoice {self.invoice_number} is not known yet"


class InvoiceNotYetKnown(Exception):
    """A message names an invoice that does not exist yet: its order_shipped or create may still be
    on its way through another queue (CONTRACT.md section 4). Retried until `wait_left` runs out."""

    def __init__(self, invoice: str, wait_left: float) -> None:
        super().__init__(invoice, wait_left)  # both in args, so that the error pickles
        self.invoice = invoice
        self.wait_left = wait_left

    def __str__(self) -> str:
        return f"invoice {self.invoice} is not known yet; waiting up to {self.wait_left:.1f}s more for it"
