"""How the worker is deployed: `invoice-worker run` with DATABASE_URL and BROKER_URL set, started
from a folder without .data/ (as a service manager starts it), still drives the scheduled retry of
failed payments; and the callback signing secret rotates without downtime."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg

from tests.conftest import wait_for
from tests.faults.checker import Ledger, conninfo, dead_letters, outcomes, wait_settled
from tests.faults.traffic import order, send
from worker.delivery.signing import sign


def start_payment(publisher, ledger: Ledger, tenant: str, number: str, profile: str | None = "card-1") -> str:
    payment_id = str(uuid.uuid4())
    send(publisher, ledger, "invoices.start_hosted_payment", {
        "messageId": f"start-{payment_id}", "tenantId": tenant, "invoiceNumber": number, "paymentId": payment_id,
        "amount": "10.00", "currency": "USD", "paymentProfileId": profile})
    return payment_id


def callback(tenant: str, number: str, payment_id: str, secret: str) -> dict:
    body = {"messageId": f"cb-{uuid.uuid4()}", "tenantId": tenant, "provider": "WorldPay", "invoiceNumber": number,
            "paymentId": payment_id, "transactionId": f"T-{uuid.uuid4().hex[:8]}", "result": "Approved",
            "amount": "10.00", "currency": "USD", "responseCode": "0", "responseMessage": "Approved"}
    body["signature"] = sign(body, secret)
    return body


def test_run_from_a_folder_without_data_dir_retries_failed_payments(scenario, tmp_path):
    folder = tmp_path / "service-cwd"
    folder.mkdir()
    env = {**os.environ, **scenario.env, "PAYMENT_RETRY_SCAN_SECONDS": "1", "PAYMENT_RETRY_DAYS": "0"}
    env.pop("DATA_DIR", None)
    log = tmp_path / "run.log"
    run = subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], cwd=folder, env=env, stdout=log.open("wb"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    scenario.processes.procs.append(run)
    wait_for(lambda: b" ready." in log.read_bytes() or run.poll() is not None, 90, what="the worker of `run`")
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-deploy"
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "R-1"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    failed = start_payment(publisher, ledger, tenant, "R-1")
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    send(publisher, ledger, "invoices.fail_payment", {"messageId": f"fail-{failed}", "tenantId": tenant,
                                                      "invoiceNumber": "R-1", "paymentId": failed,
                                                      "failureCode": "insufficient_funds", "failureReason": "no"})
    wait_settled(scenario.database_url, ledger, {}, timeout=60)

    def retried() -> bool:
        with psycopg.connect(conninfo(scenario.database_url)) as db:
            return bool(db.execute("SELECT count(*) FROM payments WHERE retry_of IN "
                                   "(SELECT id FROM payments WHERE payment_id = %s)", (failed,)).fetchone()[0])

    wait_for(retried, 60, what="beat's scan to request the retry")
    text = log.read_text()
    assert "FileNotFoundError" not in text and "exited with" not in text, text[-3000:]
    assert (folder / ".data").is_dir()


def test_signing_secret_rotates_without_downtime(scenario):
    publisher, ledger, tenant = scenario.publisher(), Ledger(), "t-rotate"
    both = scenario.processes.worker(extra_env={"CALLBACK_SIGNING_SECRET": "new-secret, old-secret"})
    send(publisher, ledger, "invoices.order_shipped", order(tenant, "S-1"))
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    payments = [start_payment(publisher, ledger, tenant, "S-1") for _ in range(3)]
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    under_old = callback(tenant, "S-1", payments[0], "old-secret")
    under_new = callback(tenant, "S-1", payments[1], "new-secret")
    for body in (under_old, under_new):
        send(publisher, ledger, "invoices.payment_callback", body)
    wait_settled(scenario.database_url, ledger, {}, timeout=60)
    done = outcomes(scenario.database_url)
    assert done[(tenant, under_old["messageId"])] == done[(tenant, under_new["messageId"])] == "applied"

    scenario.processes.stop(both)  # the old secret is removed
    scenario.processes.worker(extra_env={"CALLBACK_SIGNING_SECRET": "new-secret"})
    late_old = callback(tenant, "S-1", payments[2], "old-secret")
    send(publisher, ledger, "invoices.payment_callback", late_old)
    wait_settled(scenario.database_url, ledger, {late_old["messageId"]: "bad-signature"}, timeout=60)
    assert [(m, r) for m, r, _ in dead_letters(scenario.database_url)] == [(late_old["messageId"], "bad-signature")]
    assert (tenant, late_old["messageId"]) not in outcomes(scenario.database_url)
