"""The one checker every fault scenario calls: the invariants of CONTRACT.md sections 4 and 6,
read from the scenario's database and from the events a plain kombu consumer received.

- every messageId sent has exactly one outcome (an inbox row, or a dead letter, never both);
- `amountPaid` of every invoice is the exact Decimal sum of its distinct applied payments, and no
  payment exists twice;
- per invoice, the events received run 1..N without gaps or repeats after de-duplication by
  `eventId`, N being the invoice's own count; every event received was committed (it is in the
  outbox), and every committed event was received;
- the dead-letter store holds exactly what the scenario expects.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import psycopg
from sqlalchemy.engine import make_url


def conninfo(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Sent:
    task: str
    body: dict[str, Any]
    copies: int = 1


class Ledger:
    """What a scenario sent, by messageId (a copy sent again counts a copy, not a message)."""

    def __init__(self) -> None:
        self.messages: dict[str, Sent] = {}

    def record(self, task: str, body: dict[str, Any]) -> None:
        known = self.messages.get(body["messageId"])
        if known is None:
            self.messages[body["messageId"]] = Sent(task, body)
        else:
            known.copies += 1

    @property
    def copies(self) -> int:
        return sum(s.copies for s in self.messages.values())

    def keys(self) -> set[tuple[str, str]]:
        return {(s.body["tenantId"], m) for m, s in self.messages.items()}


class EventTap:
    """A plain kombu consumer (no project code) on a durable queue of its own bound to
    invoices.events; it reconnects when the broker goes away and comes back."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.queue_name = f"fault-events-{uuid.uuid4().hex[:8]}"
        self.events: dict[str, dict[str, Any]] = {}
        self.received = 0
        self._conn = None
        self._queue()

    def _queue(self):
        from kombu import Connection, Exchange, Queue

        if self._conn is None:
            self._conn = Connection(self.broker_url, connect_timeout=3)
        exchange = Exchange("invoices.events", type="topic", durable=True)
        queue = Queue(self.queue_name, exchange, routing_key="#", durable=True)
        bound = queue(self._conn.default_channel)
        bound.declare()
        return bound

    def drain(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                bound = self._queue()
                while (message := bound.get(no_ack=True, accept=["json"])) is not None:
                    assert message.content_type == "application/json"
                    event = message.decode()
                    self.received += 1
                    self.events.setdefault(event["eventId"], event)
            except Exception:  # the broker is away: connect again
                try:
                    self._conn.release()
                except Exception:
                    pass
                self._conn = None
                time.sleep(0.2)
                continue
            if until():
                return True
            time.sleep(0.05)
        return until()

    def close(self) -> None:
        try:
            self._queue().delete()
            self._conn.release()
        except Exception:
            pass


@dataclass
class Verdict:
    sent: int
    copies: int
    lost: int = 0
    applied_twice: int = 0
    events_missing: int = 0
    problems: list[str] = field(default_factory=list)

    def assert_holds(self) -> None:
        assert not self.problems, "invariants broken:\n" + "\n".join(self.problems[:40])


def outcomes(database_url: str) -> dict[tuple[str, str], str]:
    with psycopg.connect(conninfo(database_url)) as db:
        return {(t, m): o for t, m, o in db.execute("SELECT tenant_id, message_id, outcome FROM inbox")}


def dead_letters(database_url: str) -> list[tuple[str | None, str, int]]:
    with psycopg.connect(conninfo(database_url)) as db:
        return db.execute("SELECT message_id, reason, attempts FROM dead_letters ORDER BY id").fetchall()


def settled(database_url: str, ledger: Ledger, expected_dead: dict[str, str]) -> bool:
    """Every message sent has reached its outcome or its expected dead letter."""
    done = outcomes(database_url)
    dead = {m for m, _, _ in dead_letters(database_url)}
    return all(key in done or key[1] in dead for key in ledger.keys()) and set(expected_dead) <= dead


def wait_settled(database_url: str, ledger: Ledger, expected_dead: dict[str, str], timeout: float,
                 broker_url: str | None = None) -> float:
    """Wait until everything sent has its outcome; the moment it had, as time.monotonic(). With a
    Redis `broker_url`, a message still missing is named with where the broker holds it."""
    deadline = time.monotonic() + timeout
    while not settled(database_url, ledger, expected_dead):
        if time.monotonic() > deadline:
            dead = {m for m, _, _ in dead_letters(database_url)}
            missing = [key for key in ledger.keys() - set(outcomes(database_url)) if key[1] not in dead]
            found = held_by_redis(broker_url, {m for _, m in missing[:5]}) if broker_url else {}
            shown = ", ".join(f"{ledger.messages[m].task} {m}" + (f" [{found.get(m, 'nowhere')}]" if broker_url else "")
                              for _, m in missing[:5])
            raise AssertionError(f"{len(missing)} of {len(ledger.messages)} messages have no outcome after {timeout}s "
                                 f"({shown}); dead letters expected but missing: {set(expected_dead) - dead}")
        time.sleep(0.2)
    return time.monotonic()


def held_by_redis(broker_url: str, message_ids: set[str]) -> dict[str, str]:
    """Where a Redis broker holds these messages (by body messageId): 'list <queue>' or 'unacked'.
    One not named is in no list and not in the unacked hash: taken off its queue and gone."""
    import base64
    import json

    import redis

    if not broker_url.startswith(("redis://", "rediss://")):
        return {}

    def message_id(raw: bytes) -> str | None:
        try:
            payload = json.loads(raw)
            if isinstance(payload, list):  # an unacked entry: [payload, exchange, routing key]
                payload = payload[0]
            body = payload["body"]
            if payload["properties"].get("body_encoding") == "base64":
                body = base64.b64decode(body)
            return json.loads(body)[0][0].get("messageId")
        except Exception:
            return None

    where: dict[str, str] = {}
    client = redis.Redis.from_url(broker_url)
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            items = client.lrange(key, 0, -1) if kind == b"list" else client.hvals(key) if kind == b"hash" else []
            for raw in items:
                found = message_id(raw)
                if found in message_ids:
                    where[found] = f"{'list' if kind == b'list' else 'hash'} {key.decode()}"
    finally:
        client.close()
    return where


def check(database_url: str, ledger: Ledger, tap: EventTap, *, expected_dead: dict[str, str] | None = None,
          event_timeout: float = 60) -> Verdict:
    """Every invariant, once everything sent has settled; the relay is given `event_timeout` to
    publish what committed."""
    expected_dead = expected_dead or {}
    verdict = Verdict(sent=len(ledger.messages), copies=ledger.copies)
    problems = verdict.problems
    done = outcomes(database_url)
    dead = dead_letters(database_url)
    dead_ids = Counter(m for m, _, _ in dead)

    # One outcome per messageId.
    for (tenant, message_id) in ledger.keys():
        has_outcome, is_dead = (tenant, message_id) in done, dead_ids[message_id] > 0
        if not has_outcome and not is_dead:
            verdict.lost += 1
            problems.append(f"lost: {message_id} has no outcome")
        elif has_outcome and is_dead:
            problems.append(f"{message_id} has an outcome ({done[(tenant, message_id)]}) and a dead letter")
        if dead_ids[message_id] > 1:
            problems.append(f"{message_id} was dead-lettered {dead_ids[message_id]} times")
    found_dead = {m: r for m, r, _ in dead}
    if found_dead != expected_dead:
        problems.append(f"dead letters {found_dead} != expected {expected_dead}")

    with psycopg.connect(conninfo(database_url)) as db:
        # Exact sums: amountPaid = Σ of the distinct applied offline payments (+ completed hosted ones).
        applied_amounts: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        applied_count: Counter = Counter()
        for message_id, sent in ledger.messages.items():
            body = sent.body
            if sent.task == "invoices.record_payment" and done.get((body["tenantId"], message_id)) == "applied":
                applied_amounts[(body["tenantId"], body["invoiceNumber"])] += Decimal(str(body["amount"]))
                applied_count[(body["tenantId"], body["invoiceNumber"])] += 1
        invoices = db.execute("SELECT i.id, i.tenant_id, i.invoice_number, i.amount_paid, i.event_sequence, "
                              "(SELECT count(*) FROM payments p WHERE p.invoice_id = i.id AND p.status = 'Completed') "
                              "FROM invoices i").fetchall()
        for invoice_id, tenant, number, paid, sequence, completed in invoices:
            key = (tenant, number)
            if key in applied_amounts:
                if paid != applied_amounts[key]:
                    problems.append(f"{tenant}/{number}: amountPaid {paid} != exact sum {applied_amounts[key]}")
                if completed > applied_count[key]:
                    verdict.applied_twice += completed - applied_count[key]
                    problems.append(f"{tenant}/{number}: {completed} payments for {applied_count[key]} applied messages")
        outbox = {str(e): (str(i) if i else None, s) for e, i, s in
                  db.execute("SELECT event_id, invoice_id, sequence FROM outbox").fetchall()}
        sequences = {str(i): s for i, _, _, _, s, _ in invoices}

    # Events: everything committed is received, nothing uncommitted is, sequences 1..N.
    tap.drain(lambda: set(outbox) <= set(tap.events), event_timeout)
    verdict.events_missing = len(set(outbox) - set(tap.events))
    if verdict.events_missing:
        problems.append(f"{verdict.events_missing} committed events were never received")
    uncommitted = set(tap.events) - set(outbox)
    if uncommitted:
        problems.append(f"{len(uncommitted)} events received that never committed")
    per_invoice: dict[str, list[int]] = defaultdict(list)
    for event in tap.events.values():
        if event["sequence"] is not None:
            per_invoice[event["invoiceId"]].append(event["sequence"])
    for invoice_id, count in sequences.items():
        got = sorted(per_invoice.get(invoice_id, []))
        if got != list(range(1, count + 1)):
            problems.append(f"invoice {invoice_id}: sequences {got[:10]}… are not 1..{count}")
    return verdict


@dataclass
class ReliabilityRow:
    scenario: str
    sent: int
    copies: int
    faults: str
    lost: int
    applied_twice: int
    events_missing: int
    recovery_seconds: float | None


def write_reliability(path: Path, rows: list[ReliabilityRow], broker: str = "Redis (Valkey)") -> None:
    """Rewrite this broker's section of RELIABILITY.md; the other broker's section is kept."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability",
        "",
        "Written by the fault suite (`tests/faults/`, part of `make test` on Redis and of",
        "`make test-rabbitmq` on RabbitMQ). Each row is one scenario run against real processes and",
        "servers, the faults injected from outside; the figures are what the shared checker",
        "(`tests/faults/checker.py`) found afterwards.",
        "",
    ]
    sections = {}
    if path.exists():
        for chunk in path.read_text().split("\n## ")[1:]:
            sections[chunk.split("\n", 1)[0]] = "## " + chunk.rstrip("\n")
    table = [
        f"## {broker}",
        "",
        f"Run on {when}.",
        "",
        "| scenario | messages sent (copies) | faults injected | lost | applied twice | events missing | fault cleared → all applied |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.scenario):
        recovery = f"{r.recovery_seconds:.1f} s" if r.recovery_seconds is not None else "n/a"
        table.append(f"| {r.scenario} | {r.sent} ({r.copies}) | {r.faults} | {r.lost} | {r.applied_twice} | "
                     f"{r.events_missing} | {recovery} |")
    sections[broker] = "\n".join(table)
    order = sorted(sections, key=lambda name: (not name.startswith("Redis"), name))
    path.write_text("\n".join(lines) + "\n" + "\n\n".join(sections[name] for name in order) + "\n")
