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


def test_replay_all_and_discard_all_act_on_what_the_filter_selects(running):
    from tests.console.test_console import dead_letter, status_of

    tenant, other = new_tenant("t-dl-all"), new_tenant("t-dl-all-other")
    invoice = issued_invoice(tenant)
    payments = [{"messageId": f"pay-all-{i}-{tenant}", "tenantId": tenant, "invoiceNumber": invoice["invoiceNumber"],
                 "amount": "1.00", "currency": "USD", "paymentMethod": "EFT"} for i in range(3)]
    chosen = [dead_letter("invoices.record_payment", body) for body in payments]
    kept = [dead_letter("invoices.record_payment", {"messageId": "x", "tenantId": other}),
            dead_letter("invoices.issue", {"messageId": "y", "tenantId": tenant}, reason="malformed")]

    asked = subprocess.run([sys.executable, "-m", "worker.cli", "dead-letters", "replay-all", "--tenant", tenant,
                            "--reason", "retries-exhausted"], cwd=ROOT, env=os.environ.copy(), input="n\n",
                           capture_output=True, text=True, timeout=60)
    assert "replay 3 open dead letters?" in asked.stderr and asked.returncode != 0
    assert set(status_of(chosen).values()) == {"open"}
    done = json.loads(cli("dead-letters", "replay-all", "--tenant", tenant, "--reason", "retries-exhausted", "--yes",
                          "--json").stdout)
    assert sorted(done["done"]) == sorted(chosen) and done["failed"] == {}
    for body in payments:
        assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    assert set(status_of(kept).values()) == {"open"}

    discarded = cli("dead-letters", "discard-all", "--task", "invoices.issue", "--tenant", tenant, "--yes")
    assert discarded.stdout.strip() == "discarded 1 dead letter"
    assert status_of(kept) == {kept[0]: "open", kept[1]: "discarded"}


def test_a_parked_event_is_listed_and_published_again(running):
    from sqlalchemy import text

    from worker.storage import db

    with db.engine().begin() as conn:
        outbox_id = conn.execute(text(
            "INSERT INTO outbox (event_id, type, tenant_id, payload, parked_at, park_reason) VALUES "
            "(gen_random_uuid(), 'import.completed', 't-parked', '{}'::jsonb, now(), 'refused by the broker') "
            "RETURNING id")).scalar_one()
    parked = json.loads(cli("events", "parked", "--json").stdout)
    assert [(e["id"], e["parkReason"]) for e in parked] == [(outbox_id, "refused by the broker")]
    assert cli("events", "publish-again", str(outbox_id)).returncode == 0
    with db.engine().connect() as conn:
        wait_for(lambda: conn.execute(text("SELECT published_at IS NOT NULL FROM outbox WHERE id = :id"),
                                      {"id": outbox_id}).scalar_one() and (conn.rollback() or True), 20,
                 what="the relay to publish it")
    again = cli("events", "publish-again", str(outbox_id))
    assert again.returncode != 0 and f"no parked event {outbox_id}" in again.stderr
