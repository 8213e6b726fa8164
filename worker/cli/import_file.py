"""Reading an import file: JSON lines (one invoice per line) or CSV (one row per line item,
the rows of one invoice next to each other), streamed as (line number, entry) pairs."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TextIO

# CSV columns. Invoice columns are read from the first row of each invoice; line columns from every row.
INVOICE_COLUMNS = {
    "invoiceNumber": "invoiceNumber", "tenantId": "tenantId", "orderId": "orderId", "orderNumber": "orderNumber",
    "externalId": "externalId", "purchaseOrderNumber": "purchaseOrderNumber", "invoiceDate": "invoiceDate",
    "dueDate": "dueDate", "paymentTerms": "paymentTerms", "currency": "currency", "notes": "notes",
    "taxAmount": "taxAmount", "importedInvoiceTotal": "importedInvoiceTotal", "importedBalance": "importedBalance",
}
CUSTOMER_COLUMNS = {"customerId": "customerId", "customerNumber": "customerNumber", "companyName": "companyName",
                    "companyEmail": "companyEmail", "companyPhone": "companyPhone"}
LINE_COLUMNS = {"sku": "sku", "description": "description", "quantity": "quantity", "unitPrice": "unitPrice",
                "lineDiscount": "discountAmount"}
DISCOUNT_COLUMNS = {"discountType": "type", "discountValue": "value", "discountCode": "code"}


@dataclass
class FileLine:
    """One invoice read from the file (entry), or why a line could not be read (error)."""

    line: int
    entry: dict[str, Any] | None = None
    error: str | None = None


def read(path: Path) -> Iterator[FileLine]:
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".csv":
            yield from read_csv(handle)
        else:
            yield from read_jsonl(handle)


def read_jsonl(handle: TextIO) -> Iterator[FileLine]:
    for number, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as exc:
            yield FileLine(number, error=f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(entry, dict):
            yield FileLine(number, error="each line must be one JSON object (an invoice)")
            continue
        yield FileLine(number, entry=entry)


def _blank(value: str | None) -> bool:
    return value is None or value.strip() == ""


def read_csv(handle: TextIO) -> Iterator[FileLine]:
    reader = csv.DictReader(handle)
    missing = {"invoiceNumber", "quantity", "unitPrice"} - set(reader.fieldnames or [])
    if missing:
        yield FileLine(1, error=f"the header lacks the columns {', '.join(sorted(missing))}")
        return
    current: FileLine | None = None
    for row in reader:
        number = reader.line_num
        if None in row:
            yield FileLine(number, error="the row has more fields than the header")
            continue
        number_of_row = (row.get("invoiceNumber") or "").strip()
        if not number_of_row:
            yield FileLine(number, error="invoiceNumber is empty")
            continue
        # Rows of one invoice: the same (tenant, invoice number); another tenant's row starts its own.
        key = ((row.get("tenantId") or "").strip(), number_of_row)
        if current is None or (str(current.entry.get("tenantId") or "").strip(), current.entry["invoiceNumber"]) != key:
            if current is not None:
                yield current
            current = FileLine(number, entry=_invoice_from_row(row))
        line = {target: row[column] for column, target in LINE_COLUMNS.items() if not _blank(row.get(column))}
        current.entry["lineItems"].append(line)
    if current is not None:
        yield current


def _invoice_from_row(row: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {target: row[column] for column, target in INVOICE_COLUMNS.items()
                             if not _blank(row.get(column))}
    customer = {target: row[column] for column, target in CUSTOMER_COLUMNS.items() if not _blank(row.get(column))}
    if customer:
        entry["customer"] = customer
    discount = {target: row[column] for column, target in DISCOUNT_COLUMNS.items() if not _blank(row.get(column))}
    if discount:
        entry["discount"] = discount
    if not _blank(row.get("isActive")):
        entry["isActive"] = row["isActive"].strip().lower() not in ("false", "0", "no")
    entry["lineItems"] = []
    return entry
