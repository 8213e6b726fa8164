"""One message end to end: `invoice-worker publish` → a real worker → a Draft invoice that
`invoice-worker invoices get|list` shows with the camelCase fields of invoice-api.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, new_tenant, order_body, wait_outcome


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=60)


def test_order_shipped_published_from_the_cli_becomes_a_draft_invoice(running, tmp_path):
    tenant = new_tenant("acme-slice")
    body = order_body(tenant=tenant)
    body.pop("messageId")
    path = tmp_path / "order.json"
    path.write_text(json.dumps(body))

    sent = cli("publish", "invoices.order_shipped", str(path))
    assert sent.returncode == 0, sent.stderr
    message_id = json.loads(sent.stdout)["messageId"]  # filled in because the body had none
    outcome = wait_outcome(tenant, message_id)
    assert outcome["outcome"] == "applied"
    assert outcome["invoiceNumber"] == "INV-00001"

    shown = cli("invoices", "get", "INV-00001", "--tenant", tenant, "--json")
    assert shown.returncode == 0, shown.stderr
    invoice = json.loads(shown.stdout)
    assert invoice["status"] == "Draft"
    assert invoice["orderId"] == body["orderId"]
    assert invoice["customer"]["companyName"] == "Globex Corporation"
    assert invoice["salesRep"]["fullName"] == "Dana Reyes"
    assert [line["lineTotal"] for line in invoice["lineItems"]] == ["120.00", "20.00"]
    # 140.00 subtotal, 5% discount 7.00, tax 9.60
    assert (invoice["subtotal"], invoice["discountAmount"], invoice["invoiceTotal"]) == ("140.00", "7.00", "142.60")
    assert invoice["balance"] == "142.60" and invoice["amountPaid"] == "0.00"
    assert invoice["dueDate"] == "2026-12-24"  # Net30 from 2026-11-24

    by_id = cli("invoices", "get", invoice["id"], "--json")
    assert json.loads(by_id.stdout)["invoiceNumber"] == "INV-00001"

    listed = cli("invoices", "list", "--tenant", tenant, "--status", "Draft", "--json")
    page = json.loads(listed.stdout)
    assert (page["page"], page["perPage"], page["total"]) == (1, 25, 1)
    assert page["invoices"][0]["id"] == invoice["id"]
    assert json.loads(cli("invoices", "list", "--tenant", tenant, "--status", "Paid", "--json").stdout)["total"] == 0

    table = cli("invoices", "list", "--tenant", tenant)
    assert table.returncode == 0 and "INV-00001" in table.stdout


def test_a_wrong_setting_stops_the_cli_with_one_line_naming_it():
    result = subprocess.run([sys.executable, "-m", "worker.cli", "invoices", "list"], cwd=ROOT,
                            env={**os.environ, "PAYMENT_RETRY_DAYS": "abc"}, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: PAYMENT_RETRY_DAYS: expected comma-separated numbers of days, got 'abc'"]
    bad_url = subprocess.run([sys.executable, "-m", "worker.cli", "invoices", "list"], cwd=ROOT,
                             env={**os.environ, "DATABASE_URL": "mysql://x@y/z"}, capture_output=True, text=True)
    assert bad_url.returncode == 2 and "DATABASE_URL" in bad_url.stderr and "Traceback" not in bad_url.stderr
