"""How a command names its invoice: by number or by id."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class InvoiceAddress:
    """Commands name their invoice by invoiceNumber or invoiceId (or both, agreeing)."""

    invoice_number: str | None = None
    invoice_id: uuid.UUID | None = None

    def describe(self) -> str:
        return self.invoice_number or str(self.invoice_id)
