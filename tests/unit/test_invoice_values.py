"""InvoiceValues (the plain invoice bulk import computes with) follows the very rules of Invoice:
for any create body, both reject it with the same reason code or both build the same invoice."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timezone
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import DomainError
from models.invoice import Invoice, InvoiceValues
from models.line_item import LineItem, LineValues

NOW = datetime(2026, 10, 1, 12, tzinfo=timezone.utc)
COLUMNS = [c.name for c in Invoice.__table__.columns]
LINE_COLUMNS = ["position", "sku", "description", "quantity", "unit_price", "discount_amount", "line_total"]

# Amounts with 0 to 4 places, negative ones and zero among them: reaching every money rule.
AMOUNTS = st.builds(lambda n, places: Decimal(n).scaleb(-places), st.integers(-500, 10**6), st.integers(0, 4))
LINES = st.lists(st.fixed_dictionaries(
    {"quantity": st.sampled_from(["1", "2", "0.5", "0", "-1", "3.333"]), "unit_price": AMOUNTS},
    optional={"sku": st.text(max_size=5), "discount_amount": AMOUNTS}), max_size=4)
CONTENT = st.fixed_dictionaries(
    {"currency": st.sampled_from(["USD", "JPY", "KWD", "EUR", "XXX", ""])},
    optional={
        "line_items": LINES,
        "tax_amount": AMOUNTS,
        "discount": st.one_of(st.none(), st.fixed_dictionaries(
            {"type": st.sampled_from(["Percentage", "Amount", "Other"]), "value": AMOUNTS})),
        "imported_invoice_total": st.one_of(st.none(), AMOUNTS),
        "imported_balance": st.one_of(st.none(), AMOUNTS),
        "payment_terms": st.sampled_from(["Net30", "Net0", "DueOnReceipt", None]),
        "due_date": st.sampled_from([date(2026, 9, 1), date(2026, 12, 1), None]),
        "customer": st.fixed_dictionaries({"customerId": st.text(max_size=4)}),
        "notes": st.text(max_size=10),
    })


def build(kind: type, content: dict) -> object:
    try:
        return kind.create(tenant_id="t", invoice_number="INV-1", content=content, invoice_id=uuid.UUID(int=1),
                           source="import", now=NOW, announce=False)
    except DomainError as exc:
        return exc.code


@settings(max_examples=400, deadline=None)
@given(CONTENT)
def test_invoice_values_apply_the_rules_of_invoice(content: dict) -> None:
    mapped, plain = build(Invoice, content), build(InvoiceValues, content)
    if isinstance(mapped, str):
        assert plain == mapped
        return
    assert isinstance(plain, InvoiceValues)
    assert {c: getattr(plain, c) for c in COLUMNS} == {c: getattr(mapped, c) for c in COLUMNS}
    assert plain.to_json() == mapped.to_json()
    assert [type(line) for line in plain.line_items] == [LineValues] * len(mapped.line_items)
    assert all(type(line) is LineItem for line in mapped.line_items)
    assert [[getattr(line, c) for c in LINE_COLUMNS] for line in plain.line_items] == \
        [[getattr(line, c) for c in LINE_COLUMNS] for line in mapped.line_items]
    assert plain.pending_events == mapped.pending_events == []
