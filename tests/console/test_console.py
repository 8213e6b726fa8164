"""An operator at the console, in Chromium: finds a dead-lettered payment, replays it and sees the
balance change and the audit row; discards by filter exactly what the confirmation counted; and the
console refuses what it must (no token, no CSRF token, markup in a body)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from decimal import Decimal

from sqlalchemy import text

from tests.conftest import invoice_json, new_tenant, send, wait_for, wait_outcome
from tests.console.conftest import TOKEN_NAME, sign_in
from tests.end_to_end.test_delivery import issued_invoice, payment
from worker.delivery import dead_letters
from worker.storage import db


def dead_letter(task: str, body: object, reason: str = "retries-exhausted",
                error: str = "OperationalError: the database was away") -> int:
    """Dead-letter a message through the worker's own store, as its consumer or task would."""
    delivery_id = str(uuid.uuid4())
    dead_letters.store(dead_letters.Delivery(delivery_id, task, body, {"id": delivery_id, "task": task}),
                       reason=reason, error=error)
    return dead_letters.get_by_delivery(delivery_id).id


def status_of(ids: list[int]) -> dict[int, str]:
    with db.engine().connect() as conn:
        return dict(conn.execute(text("SELECT id, status FROM dead_letters WHERE id = ANY(:ids)"), {"ids": ids}).all())


def http(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode() if data is not None else None,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_dead_lettered_payment_replayed_changes_the_balance_and_is_audited(running, page):
    tenant = new_tenant("t-console")
    invoice = issued_invoice(tenant)
    body = payment(tenant, invoice["invoiceNumber"], "12.50")
    letter = dead_letter("invoices.record_payment", body)
    sign_in(page.page)
    p = page.page

    # Finds it: the overview counts it by reason, the list filters by task and tenant.
    p.goto("/")
    assert "retries-exhausted: 1" in p.inner_text("body")
    p.goto("/dead-letters")
    p.fill("input[name=task]", "invoices.record_payment")
    p.fill("input[name=tenant]", tenant)
    p.click("text=Filter")
    assert p.inner_text("#matching") == "1"
    p.click(f"#dead-letters a[href='/dead-letters/{letter}']")
    assert json.loads(p.inner_text("#body")) == body
    assert "the database was away" in p.inner_text("#error")

    p.click("#replay")
    assert "replayed as invoices.record_payment" in p.inner_text("#done")
    assert p.inner_text("#status") == "replayed"
    assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"

    p.goto("/invoices")
    p.fill("#by-number input[name=tenant]", tenant)
    p.fill("#by-number input[name=number]", invoice["invoiceNumber"])
    p.click("#by-number button")
    expected = Decimal(invoice["balance"]) - Decimal("12.50")
    assert Decimal(p.inner_text("#balance")) == expected == Decimal(invoice_json(tenant, invoice["invoiceNumber"])["balance"])
    assert body["messageId"] in p.inner_text("#history")

    p.goto("/audit")
    first = p.locator("#audit tr").nth(1).inner_text()
    assert TOKEN_NAME in first and "dead-letter.replay" in first and f'"deadLetters": [{letter}]' in first
    assert page.dialogs == [] and page.errors == []


def test_bulk_discard_by_filter_states_the_count_and_discards_exactly_those(running, page):
    tenant, other = new_tenant("t-bulk"), new_tenant("t-bulk-other")
    chosen = [dead_letter("invoices.issue", {"messageId": f"m-{i}", "tenantId": tenant}, reason="malformed")
              for i in range(7)]
    kept = [dead_letter("invoices.issue", {"messageId": f"o-{i}", "tenantId": other}, reason="malformed")
            for i in range(3)]
    kept += [dead_letter("invoices.issue", {"messageId": f"s-{i}", "tenantId": tenant}, reason="bad-signature")
             for i in range(4)]
    sign_in(page.page)
    p = page.page
    p.goto(f"/dead-letters?reason=malformed&tenant={tenant}")
    assert p.inner_text("#matching") == "7"
    p.click("#bulk-discard")
    assert p.inner_text("h1") == "Discard 7 open dead letters?"
    late = dead_letter("invoices.issue", {"messageId": "late", "tenantId": tenant}, reason="malformed")
    p.click("#confirm")
    assert p.inner_text("#message") == "discarded 7 dead letters."
    assert set(status_of(chosen).values()) == {"discarded"}
    # Neither another tenant's, another reason's, nor one dead-lettered after the confirmation was shown.
    assert set(status_of(kept + [late]).values()) == {"open"}
    p.goto("/audit")
    assert "dead-letters.bulk-discard" in p.locator("#audit tr").nth(1).inner_text()


def test_without_the_token_every_page_and_action_is_refused(running, console, page):
    letter = dead_letter("invoices.issue", {"messageId": "no-token", "tenantId": "t"})
    for path in ("/", "/dead-letters", f"/dead-letters/{letter}", "/invoices", "/waiting", "/audit"):
        status, body = http(console.url + path)
        assert status == 401 and "Sign in" in body and "no-token" not in body, path
    assert http(console.url + f"/dead-letters/{letter}/discard", {"csrf": "x"})[0] == 401
    assert http(console.url + "/", headers={"Cookie": "console_session=forged"})[0] == 401
    p = page.page
    p.goto("/login")
    p.fill("input[name=token]", "not-the-secret")
    p.click("button[type=submit]")
    assert p.inner_text("#problem") == "That token is not valid."
    p.goto("/dead-letters")
    assert "Sign in" in p.inner_text("h1")
    assert status_of([letter]) == {letter: "open"}


def test_a_forged_post_without_the_csrf_token_is_refused(running, page):
    letter = dead_letter("invoices.issue", {"messageId": "csrf", "tenantId": "t"})
    sign_in(page.page)
    request = page.page.context.request  # the signed-in session's cookie, no form token
    for form in ({}, {"csrf": "guessed"}):
        refused = request.post(f"/dead-letters/{letter}/discard", form=form)
        assert refused.status == 403 and "CSRF" in refused.text()
    assert request.get(f"/dead-letters/{letter}/discard").status == 405  # actions are POST only
    assert status_of([letter]) == {letter: "open"}


def test_markup_in_a_body_renders_as_text(running, page):
    hostile = {"messageId": "<script>alert('body')</script>", "tenantId": "<img src=x onerror=alert('img')>",
               "note": "</pre><script>alert(1)</script><img src=x onerror=alert(2)>"}
    letter = dead_letter("invoices.issue", hostile, reason="malformed",
                         error="<script>alert('error')</script><img src=x onerror=alert(3)>")
    raw = dead_letter("<b>task</b>", b"<script>alert(4)</script>\xff", reason="not-json")
    sign_in(page.page)
    p = page.page
    for path in (f"/dead-letters/{letter}", "/dead-letters?status=all", f"/dead-letters/{raw}"):
        p.goto(path)
        assert p.locator("main script").count() == 0 and p.locator("main img").count() == 0, path
    p.goto(f"/dead-letters/{letter}")
    assert json.loads(p.inner_text("#body")) == hostile
    assert p.inner_text("#error") == "<script>alert('error')</script><img src=x onerror=alert(3)>"
    p.goto("/dead-letters?status=all")
    assert "<script>alert('body')</script>" in p.inner_text("#dead-letters")
    p.wait_for_timeout(300)  # an onerror would fire on the failed image load
    assert page.dialogs == [] and page.errors == []


def test_an_invoice_timeline_lists_fifty_changes_oldest_first(running, page):
    tenant = new_tenant("t-timeline")
    invoice = issued_invoice(tenant)
    with db.engine().connect() as conn:
        so_far = conn.execute(text("SELECT count(*) FROM invoice_history WHERE invoice_id = :id"),
                              {"id": invoice["id"]}).scalar_one()
    payments = [payment(tenant, invoice["invoiceNumber"], "0.01") for _ in range(50 - so_far)]
    for body in payments:
        send("invoices.record_payment", body)
    for body in payments:
        assert wait_outcome(tenant, body["messageId"])["outcome"] == "applied"
    with db.engine().connect() as conn:
        expected = [r[0] or r[1] for r in conn.execute(text(
            "SELECT message_id, causation_id FROM invoice_history WHERE invoice_id = :id ORDER BY id"),
            {"id": invoice["id"]})]
    assert len(expected) == 50
    sign_in(page.page)
    p = page.page
    p.goto(f"/invoices?payment={urllib.parse.quote(payments[-1]['messageId'])}")
    assert "not a payment id" in p.inner_text("#problem")
    p.goto(f"/invoices?tenant={tenant}&number={invoice['invoiceNumber']}")
    shown = p.locator("#history td.message-id").all_inner_texts()
    assert shown == expected
    assert "(new) →" in p.locator("#history tr").nth(1).inner_text()
    # The order is the database's (history ids: the order the row locks let the changes apply).
    # recorded_at is each transaction's start, so two payments that queued on the invoice's lock can
    # show times out of order; the first change still precedes the last, sent after it applied.
    times = [t.split("\t")[1] for t in p.locator("#history tr").all_inner_texts()[1:]]
    assert len(times) == 50 and times[0] < times[-1]


def test_the_overview_shows_the_worker_and_relay_alive_by_their_heartbeats(running, page):
    sign_in(page.page)
    p = page.page
    p.goto("/")
    wait_for(lambda: p.reload() and "alive" == p.inner_text("#alive-relay .big"), 20, what="the relay's heartbeat")
    assert p.inner_text("#alive-worker .big") == "alive"
    assert p.locator("#queues tr").count() == 1 + 5  # the five queues, read without taking a message
    assert p.locator("#chart polyline").count() == 3


def test_without_a_token_the_console_is_read_only_and_stays_on_loopback(urls, tmp_path, running, browser):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.console.conftest import ConsoleProcess

    refused = subprocess.run([sys.executable, "-m", "worker.cli", "console", "--address", "0.0.0.0"], cwd=ROOT,
                             env={**{k: v for k, v in os.environ.items() if k != "CONSOLE_TOKEN"}, **urls},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "without CONSOLE_TOKEN" in refused.stderr
    letter = dead_letter("invoices.issue", {"messageId": "read-only", "tenantId": "t"})
    console = ConsoleProcess(urls, tmp_path, token=None)
    try:
        context = browser.new_context(base_url=console.url)
        p = context.new_page()
        for path in ("/", "/dead-letters", f"/dead-letters/{letter}", "/audit"):
            p.goto(path)
            assert "Read-only" in p.inner_text("#read-only"), path
        assert p.locator("#replay").count() == 0
        csrf = p.locator("input[name=csrf]").count()  # no forms at all: nothing to post
        assert csrf == 0
        refused_post = context.request.post(f"/dead-letters/{letter}/discard", form={"csrf": "x"})
        assert refused_post.status == 403 and "read-only" in refused_post.text()
        context.close()
    finally:
        console.stop()
    assert status_of([letter]) == {letter: "open"}


def test_a_deleted_invoice_shows_its_tombstone_and_history(running, page):
    from tests.conftest import ROOT

    tenant = new_tenant("t-gone")
    create = {**json.loads((ROOT / "examples" / "create.json").read_text()), "tenantId": tenant,
              "messageId": f"create-{uuid.uuid4()}"}
    send("invoices.create", create)
    number = wait_outcome(tenant, create["messageId"])["invoiceNumber"]
    delete = {"tenantId": tenant, "invoiceNumber": number, "messageId": f"delete-{uuid.uuid4()}"}
    send("invoices.delete", delete)
    assert wait_outcome(tenant, delete["messageId"])["outcome"] == "applied"
    sign_in(page.page)
    p = page.page
    p.goto(f"/invoices?tenant={tenant}&number={number}")
    assert f"by message {delete['messageId']}" in p.inner_text("#tombstone")
    assert p.locator("#history td.message-id").all_inner_texts() == [create["messageId"], delete["messageId"]]
    assert "→ (deleted)" in p.locator("#history tr").nth(2).inner_text()


def test_a_parked_event_published_again_reaches_the_exchange(running, page):
    tenant = new_tenant("t-parked")
    with db.engine().begin() as conn:
        outbox_id = conn.execute(text(
            "INSERT INTO outbox (event_id, type, tenant_id, payload, parked_at, park_reason) VALUES "
            "(:event, 'import.completed', :tenant, CAST(:payload AS jsonb), now(), 'PreconditionFailed: too large') "
            "RETURNING id"), {"event": str(uuid.uuid4()), "tenant": tenant,
                              "payload": json.dumps({"type": "import.completed", "tenantId": tenant})}).scalar_one()
    sign_in(page.page)
    p = page.page
    p.goto("/waiting")
    row = p.locator("#parked ~ table tr", has_text="PreconditionFailed: too large")
    assert tenant in row.inner_text()
    row.locator("button", has_text="Publish again").click()
    assert p.inner_text("#done") == f"event {outbox_id} handed back to the relay"

    def published() -> bool:
        with db.engine().connect() as conn:
            return conn.execute(text("SELECT published_at IS NOT NULL FROM outbox WHERE id = :id"),
                                {"id": outbox_id}).scalar_one()

    wait_for(published, 20, what="the relay to publish the event")
    p.goto("/audit")
    assert "outbox.publish-again" in p.locator("#audit tr").nth(1).inner_text()
