"""A bulk import entry's fingerprint: what finds a re-sent entry unchanged."""

from __future__ import annotations

from messages.schemas import ImportEntry
from worker.storage.bulk_import import FINGERPRINT, fingerprint

BASE = {"invoiceNumber": "F-1", "currency": "USD", "customer": {"customerId": "C-1"}, "invoiceDate": "2026-10-01",
        "lineItems": [{"sku": "A", "quantity": "2", "unitPrice": "10.00"}], "importedInvoiceTotal": "20.00"}


def of(**changes: object) -> str:
    return fingerprint(ImportEntry.model_validate({**BASE, **changes}).content())


def test_the_same_entry_gives_the_same_fingerprint_and_its_form_is_marked():
    assert of() == of() and of().startswith(FINGERPRINT) and len(of()) == 64


def test_a_field_given_as_null_is_the_field_not_given():
    assert of(notes=None) == of()


def test_every_change_of_content_changes_it_but_is_active_does_not():
    assert len({of(), of(notes="n"), of(importedInvoiceTotal="21.00"), of(currency="EUR"),
                of(lineItems=[{"sku": "A", "quantity": "3", "unitPrice": "10.00"}]),
                of(customer={"customerId": "C-2"}), of(invoiceDate="2026-10-02")}) == 7
    assert of(isActive=False) == of()


def test_an_integer_beyond_64_bits_in_an_extra_field_still_has_one():
    big = {"customerId": "C-1", "ledger": 10**30}
    assert of(customer=big) == of(customer=big) != of()
