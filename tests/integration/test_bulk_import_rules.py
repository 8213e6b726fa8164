"""invoices.bulk_import against the database: every outcome of an entry, in-process."""

from __future__ import annotations

import threading
import uuid
from decimal import Decimal

from sqlalchemy import func, select, update

from messages.schemas import BulkImport, ImportEntry
from models.invoice import Invoice
from models.line_item import LineItem
from worker.delivery.handling import execute, parse
from worker.storage.bulk_import import FINGERPRINT, import_batch, legacy_fingerprint
from worker.storage.records import OutboxEvent

T = "t-import"


def entry(number: str, total: str = "100.00", balance: str | None = None, **extra) -> dict:
    body = {"invoiceNumber": number, "currency": "USD", "customer": {"customerId": "C-1"},
            "lineItems": [{"sku": "A", "quantity": "1", "unitPrice": total}], "importedInvoiceTotal": total, **extra}
    if balance is not None:
        body["importedBalance"] = balance
    return body


def send(entries: list[dict], message_id: str | None = None, batch: str = "b-1"):
    message = parse(BulkImport, {"messageId": message_id or f"imp-{uuid.uuid4()}", "tenantId": T, "batchId": batch,
                                 "invoices": entries})
    return execute("invoices.bulk_import", message, import_batch)


def invoices(session) -> dict[str, Invoice]:
    session.expire_all()
    return {i.invoice_number: i for i in session.scalars(select(Invoice).where(Invoice.tenant_id == T))}


def events(session, type_: str) -> list[dict]:
    return list(session.scalars(select(OutboxEvent.payload).where(OutboxEvent.type == type_).order_by(OutboxEvent.id)))


def test_created_with_imported_totals_status_and_lines(session):
    outcome = send([entry("A-1"), entry("A-2", "80.00", "30.00"), entry("A-3", "50.00", "0.00"),
                    entry("A-4", lineItems=[{"quantity": "2", "unitPrice": "5.00"}] * 3, importedInvoiceTotal=None)])
    assert outcome.extra["counts"] == {"created": 4, "updated": 0, "unchanged": 0, "deactivated": 0, "rejected": 0}
    found = invoices(session)
    assert (found["A-1"].status, found["A-1"].balance) == ("Draft", Decimal("100.00"))
    assert (found["A-2"].status, found["A-2"].amount_paid, found["A-2"].balance) == (
        "PartiallyPaid", Decimal("50.00"), Decimal("30.00"))
    assert found["A-3"].status == "Paid"
    assert found["A-4"].invoice_total == Decimal("30.00") and len(found["A-4"].line_items) == 3
    assert found["A-1"].to_json()["lineItems"][0]["sku"] == "A"
    created = events(session, "invoice.created")
    assert len(created) == 4 and {e["sequence"] for e in created} == {1}
    completed = events(session, "import.completed")
    assert completed[0]["data"]["counts"]["created"] == 4 and completed[0]["sequence"] is None


def test_a_resent_batch_changes_nothing_and_emits_no_invoice_event(session):
    batch = [entry("B-1"), entry("B-2", "20.00", "5.00")]
    send(batch, message_id="first")
    before = len(events(session, "invoice.created")) + len(events(session, "invoice.updated"))
    again = send(batch, message_id="second")  # the same entries under another messageId
    assert again.extra["counts"]["unchanged"] == 2
    assert len(events(session, "invoice.created")) + len(events(session, "invoice.updated")) == before
    duplicate = send(batch, message_id="first")
    assert duplicate.outcome == "duplicate"


def test_invoices_imported_with_the_legacy_fingerprint_are_found_unchanged(session):
    """Invoices imported before the fingerprint's "2:" form keep a bare SHA-256: re-sent, they are
    unchanged (no event); changed, they are updated and take the new form."""
    batch = [entry("L-1"), entry("L-2", "20.00", "5.00")]
    send(batch)
    stored = {i.invoice_number: i.import_fingerprint for i in invoices(session).values()}
    assert all(f.startswith(FINGERPRINT) and len(f) == 64 for f in stored.values()), stored
    for raw in batch:  # what the version before wrote
        legacy = legacy_fingerprint(ImportEntry.model_validate(raw))
        session.execute(update(Invoice).where(Invoice.tenant_id == T, Invoice.invoice_number == raw["invoiceNumber"])
                        .values(import_fingerprint=legacy))
    session.commit()
    before = len(events(session, "invoice.updated"))
    assert send(batch).extra["counts"]["unchanged"] == 2
    assert len(events(session, "invoice.updated")) == before
    counts = send([entry("L-1"), entry("L-2", "20.00", "4.00")]).extra["counts"]
    assert (counts["unchanged"], counts["updated"]) == (1, 1)
    assert invoices(session)["L-2"].import_fingerprint.startswith(FINGERPRINT)
    assert not invoices(session)["L-1"].import_fingerprint.startswith(FINGERPRINT)  # unchanged: not rewritten


def test_updated_deactivated_restored_and_rejected(session):
    send([entry("C-1"), entry("C-2"), entry("C-3")])
    outcome = send([
        entry("C-1", "120.00", "20.00"),               # updated: new totals, status follows
        entry("C-2", isActive=False),                   # deactivated (soft delete)
        entry("C-3"), entry("C-3", "1.00"),             # unchanged, then the same number again: rejected
        {"invoiceNumber": "C-4", "currency": "XYZ"},    # schema: rejected alone
        entry("C-5", "10.00", "20.00"),                 # rule: balance above total
        {"currency": "USD"},                            # no invoiceNumber
    ])
    counts = outcome.extra["counts"]
    assert counts == {"created": 0, "updated": 1, "unchanged": 1, "deactivated": 1, "rejected": 4}
    rejected = {r["index"]: r for r in outcome.extra["rejected"]}
    assert rejected[3]["reason"] == "duplicate-in-batch" and rejected[3]["invoiceNumber"] == "C-3"
    assert rejected[4]["reason"] == "invalid-entry" and "XYZ" in rejected[4]["message"]
    assert rejected[5]["reason"] == "invalid-invoice"
    assert rejected[6]["reason"] == "invalid-entry" and rejected[6]["invoiceNumber"] is None
    found = invoices(session)
    assert (found["C-1"].status, found["C-1"].balance, found["C-1"].line_items[0].unit_price) == (
        "PartiallyPaid", Decimal("20.00"), Decimal("120.00"))
    assert found["C-2"].is_active is False and "C-4" not in found
    sequences = [e["sequence"] for e in events(session, "invoice.updated") + events(session, "invoice.status_changed")
                 if e["invoiceNumber"] == "C-1"]
    assert sorted(sequences) == [2, 3]
    restored = send([entry("C-2")])
    assert restored.extra["counts"]["updated"] == 1 and invoices(session)["C-2"].is_active is True


def test_a_batch_of_ten_thousand_entries(session):
    batch = [entry(f"K-{i:05d}", "10.00", "10.00" if i % 2 else "0.00") for i in range(10_000)]
    outcome = send(batch)
    assert outcome.extra["counts"]["created"] == 10_000
    assert session.scalar(select(func.count()).select_from(Invoice).where(Invoice.tenant_id == T)) == 10_000
    assert session.scalar(select(func.count()).select_from(LineItem)) == 10_000
    assert send(batch).extra["counts"]["unchanged"] == 10_000


def test_two_overlapping_imports_at_once_stay_consistent(session):
    """Side by side, in opposite orders, on new and on existing invoices: every invoice once, every
    entry counted once, no deadlock surfaced."""
    rounds = 3
    for r in range(rounds):
        first = [entry(f"O{r}-{i:03d}", "10.00") for i in range(0, 300)]
        second = [entry(f"O{r}-{i:03d}", "10.00") for i in reversed(range(150, 450))]
        existing = [entry(f"O{r}-{i:03d}", "10.00", "5.00") for i in range(0, 450)]
        for pair in ((first, second), (existing, list(reversed(existing)))):
            results = []
            threads = [threading.Thread(target=lambda b=b: results.append(send(b))) for b in pair]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            counts = [res.extra["counts"] for res in results]
            assert len(counts) == 2 and all(c["rejected"] == 0 for c in counts)
            if pair[0] is first:
                assert sum(c["created"] for c in counts) == 450 and sum(c["unchanged"] for c in counts) == 150
            else:  # the same new content twice: one batch updates all 450, the other then finds them unchanged
                assert sorted(c["updated"] for c in counts) == [0, 450]
                assert sorted(c["unchanged"] for c in counts) == [0, 450]
    assert session.scalar(select(func.count()).select_from(Invoice).where(Invoice.tenant_id == T)) == 450 * rounds
    assert len(events(session, "invoice.created")) == 450 * rounds
    assert session.scalar(select(func.count()).select_from(Invoice).where(
        Invoice.tenant_id == T, Invoice.amount_paid != Decimal("5.00"))) == 0
