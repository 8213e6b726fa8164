"""The next number of a tenant's gap-free invoice sequence, in one statement (docs/reference-choices.md: "A deleted
invoice's number is never used again")."""

from __future__ import annotations

from sqlalchemy import text

from models.rules import INVOICE_NUMBER_DIGITS, INVOICE_NUMBER_PREFIX


def number_sql(value: str) -> str:
    """invoice_number_for(value) in SQL. lpad alone would cut a longer number to the pad width
    (lpad('100000', 5, '0') is '10000'), so the width grows with the digits."""
    digits = f"({value})::text"
    return f"'{INVOICE_NUMBER_PREFIX}' || lpad({digits}, greatest({INVOICE_NUMBER_DIGITS}, length({digits})), '0')"


def _first_free_after(start: str) -> str:
    """The first sequence value after `start` whose number neither an invoice of the tenant (taken
    by an import or a publisher) nor a deleted invoice's tombstone holds. It probes the values one
    by one through the two (tenant, number) indexes, inside the server: one round trip however
    many numbers are taken."""
    number = number_sql("probe.value")
    return f"""(
        WITH RECURSIVE probe(value) AS (
            SELECT {start} + 1
            UNION ALL
            SELECT probe.value + 1 FROM probe
            WHERE EXISTS (SELECT FROM invoices
                          WHERE tenant_id = CAST(:tenant AS varchar) AND invoice_number = {number})
               OR EXISTS (SELECT FROM deleted_invoices
                          WHERE tenant_id = CAST(:tenant AS varchar) AND invoice_number = {number})
        )
        SELECT max(value) FROM probe)"""


# The upsert locks the tenant's counter row until commit, so numbering is serialised per tenant,
# and a rolled-back transaction gives its number back. The first free value is computed from the
# counter's latest value (the one the lock was taken on); a number an import took at that same
# moment and committed while this statement waited is not seen, and the invoice insert then meets
# the unique (tenant, number) index and is retried, as it was with a query per number.
NEXT_NUMBER = text(f"""
    INSERT INTO invoice_number_sequences AS seq (tenant_id, last_value)
    VALUES (CAST(:tenant AS varchar), {_first_free_after("0")})
    ON CONFLICT (tenant_id) DO UPDATE SET last_value = {_first_free_after("seq.last_value")}
    RETURNING {number_sql("seq.last_value")} AS invoice_number
""")
