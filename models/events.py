"""Domain events: what an operation changed, recorded on the aggregate, published by the outbox."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EVENT_TYPES = frozenset({
    "invoice.created", "invoice.updated", "invoice.status_changed", "invoice.deleted",
    "payment.recorded", "payment.failed", "payment.refunded", "payment.retry_requested",
    "payment.retries_exhausted", "import.completed", "command.rejected",
})


@dataclass(frozen=True)
class DomainEvent:
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type}")
