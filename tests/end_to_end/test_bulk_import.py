"""Bulk import through a real worker: the message, and `invoice-worker import FILE`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, invoice_json, new_tenant, send, wait_outcome


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=120)


def test_the_example_batch_through_the_worker_with_its_completed_event(running, events):
    tenant = new_tenant("t-bulk")
    body = json.loads((ROOT / "examples" / "bulk_import.json").read_text())
    body.update(messageId=f"bulk-{tenant}", tenantId=tenant)
    send("invoices.bulk_import", body)
    assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    events.wait(lambda e: any(x["type"] == "import.completed" and x["tenantId"] == tenant for x in e),
                what="import.completed")
    received = events.of(tenant)
    completed = next(e for e in received if e["type"] == "import.completed")
    assert completed["data"]["batchId"] == "legacy-2026-11-24-001"
    assert completed["data"]["counts"] == {"created": 2, "updated": 0, "unchanged": 0, "deactivated": 0, "rejected": 0}
    assert completed["causationId"] == body["messageId"] and completed["sequence"] is None
    assert invoice_json(tenant, "LEG-10001")["status"] == "PartiallyPaid"
    assert invoice_json(tenant, "LEG-10002")["isActive"] is False
    assert sum(e["type"] == "invoice.created" for e in received) == 2


def test_import_command_reports_totals_rejections_and_line_numbers(running, tmp_path):
    tenant = new_tenant("t-cli-import")
    lines = [
        {"invoiceNumber": "J-1", "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "10.00"}]},
        {"invoiceNumber": "J-2", "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "20.00"}],
         "importedInvoiceTotal": "20.00", "importedBalance": "5.00"},
        "this line is not JSON",
        {"invoiceNumber": "J-1", "currency": "USD", "lineItems": [{"quantity": "1", "unitPrice": "99.00"}]},
        {"invoiceNumber": "J-3", "currency": "EUR", "lineItems": [{"quantity": "1", "unitPrice": "1.005"}]},
    ]
    path = tmp_path / "invoices.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")

    checked = cli("import", str(path), "--tenant", tenant, "--dry-run", "--json")
    report = json.loads(checked.stdout)
    assert report["dryRun"] is True and report["totals"]["rejected"] == 3
    assert any(p.startswith("line 3: not JSON") for p in report["problems"])
    assert invoice_json(tenant, "J-1") is None  # nothing was sent

    done = cli("import", str(path), "--tenant", tenant, "--batch-size", "2", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1  # some entries were rejected
    assert report["totals"] == {"created": 2, "updated": 0, "unchanged": 0, "deactivated": 0, "rejected": 3}
    problems = "\n".join(report["problems"])
    assert "line 3: not JSON" in problems
    assert "line 5 (J-3): invalid-entry" in problems and "more decimals than EUR allows" in problems
    assert "line 4 (J-1): duplicate-in-file: the invoice number is already on line 1" in problems
    assert invoice_json(tenant, "J-2")["status"] == "PartiallyPaid"

    again = json.loads(cli("import", str(path), "--tenant", tenant, "--batch-size", "2", "--json").stdout)
    # the same batches are the same messages: nothing is sent again, nothing changes
    assert again["totals"] == {"created": 0, "updated": 0, "unchanged": 2, "deactivated": 0, "rejected": 3}


def test_import_command_reads_csv_one_row_per_line_item(running):
    tenant = new_tenant("t-csv")
    result = cli("import", str(ROOT / "examples" / "invoices.csv"), "--tenant", tenant)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "created: 2" in result.stdout
    first = invoice_json(tenant, "LEG-20001")
    assert [line["sku"] for line in first["lineItems"]] == ["WID-1", "SVC-9"]
    assert (first["invoiceTotal"], first["balance"], first["status"]) == ("140.00", "40.00", "PartiallyPaid")
    assert invoice_json(tenant, "LEG-20002")["invoiceTotal"] == "25.00"
