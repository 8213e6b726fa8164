"""`invoice-worker dead-letters list|show|replay|discard`: an operator's view of the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, dead_letters_of, new_tenant, send, wait_for, wait_outcome
from tests.end_to_end.test_delivery import issued_invoice


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=60)


def test_list_show_replay_and_discard(running, tmp_path):
    tenant = new_tenant("t-dl")
    invoice = issued_invoice(tenant)
    broken = {"messageId": f"dl-1-{tenant}", "tenantId": tenant, "invoiceNumber": invoice["invoiceNumber"],
              "amount": "abc", "currency": "USD"}
    other = {"messageId": f"dl-2-{tenant}", "tenantId": tenant}
    send("invoices.record_payment", broken)
    send("invoices.issue", other)
    for body in (broken, other):
        wait_for(lambda: dead_letters_of(message_id=body["messageId"]), 20, what="the dead letter")

    listed = [d for d in json.loads(cli("dead-letters", "list", "--json").stdout)
              if d["messageId"] in (broken["messageId"], other["messageId"])]
    assert sorted(d["messageId"] for d in listed) == [broken["messageId"], other["messageId"]]
    first = next(d for d in listed if d["messageId"] == broken["messageId"])
    assert first["reason"] == "malformed" and "amount" in first["error"]
    assert broken["messageId"] in cli("dead-letters", "list").stdout

    shown = json.loads(cli("dead-letters", "show", str(first["id"]), "--json").stdout)
    assert shown["body"] == broken and shown["taskName"] == "invoices.record_payment"
    assert shown["attempts"] == 1 and shown["status"] == "open"

    # Replay the stored body as it is: still malformed, so it comes back as a new dead letter.
    replayed = json.loads(cli("dead-letters", "replay", str(first["id"]), "--json").stdout)
    assert replayed["task"] == "invoices.record_payment"
    wait_for(lambda: len(dead_letters_of(message_id=broken["messageId"])) == 2, 20, what="the replayed copy")
    # Replay a corrected body: it applies.
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**broken, "amount": "12.60"}))
    assert cli("dead-letters", "replay", str(first["id"]), "--body", str(fixed)).returncode == 0
    assert wait_outcome(tenant, broken["messageId"])["outcome"] == "applied"

    second = next(d for d in listed if d["messageId"] == other["messageId"])
    assert cli("dead-letters", "discard", str(second["id"])).returncode == 0
    assert json.loads(cli("dead-letters", "show", str(second["id"]), "--json").stdout)["status"] == "discarded"
    refused = cli("dead-letters", "replay", str(second["id"]))
    assert refused.returncode != 0 and "discarded" in refused.stderr
    open_ids = {d["id"] for d in json.loads(cli("dead-letters", "list", "--json").stdout)}
    assert second["id"] not in open_ids and first["id"] not in open_ids
    missing = cli("dead-letters", "show", "999999")
    assert missing.returncode != 0 and "no dead letter 999999" in missing.stderr
