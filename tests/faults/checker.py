"""(~450 lines on purpose: the ledger, the event tap and the four comparisons are read together.)

The one checker every fault scenario calls. It compares what the scenario SENT (the ledger: per
messageId, the outcome and the events the sender expects) with what happened: the inbox, the
dead-letter store, the invoices and payments, the outbox, and the events a plain kombu consumer
received. Its columns (RELIABILITY.md):

- lost: sent, and neither an inbox record nor a dead letter;
- wrong outcome: an outcome other than the one expected (a payment expected applied and recorded
  rejected, a dead letter where an outcome was expected, another reason);
- applied twice: any effect counted more than once: a message with two events of one type for one
  invoice (by causationId), or a dead-lettered twice; an invoice with more completed payments, or
  more `amountPaid`, than the payments expected applied on it (when no message of it is already
  counted); an order with more than one invoice;
- events missing: an applied message without its expected events (type, causationId, the payment's
  amount); a committed event never received (when its message is not already counted); an invoice
  whose sequences, sorted, do not run 1..N without gaps or repeats (when none of its messages is
  already counted). Relays may interleave: the contract promises numbers to reorder by, not order.

A count is per message (or per invoice or order where no message explains it), so that one fault
counts 1 in one column. `effects` names what the checker compared for the row. Anything else wrong
(an unexpected dead letter, a shortfall) is a problem: the scenario fails on it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable

import psycopg

APPLIED, DUPLICATE, REJECTED, DEAD = "applied", "duplicate", "rejected", "dead-lettered"


def conninfo(database_url: str) -> str:
    from worker.endpoints import libpq_url

    return libpq_url(database_url)  # several hosts (tests/cluster) in libpq's spelling


@dataclass(frozen=True)
class Expected:
    """What the sender expects of one message: its outcome (applied, duplicate, rejected, dead-lettered),
    the reason of a rejection or dead letter (None: any), and the event types it causes when applied."""

    outcome: str = APPLIED
    reason: str | None = None
    events: tuple[str, ...] = ()


def expected_of(task: str, body: dict[str, Any]) -> Expected:
    """The ordinary expectation of a message the scenarios send: applied, with its events."""
    events = {
        "invoices.order_shipped": ("invoice.created", "invoice.status_changed") if body.get("autoIssue")
        else ("invoice.created",),
        "invoices.create": ("invoice.created",),
        "invoices.delete": ("invoice.deleted",),
        "invoices.record_payment": ("payment.recorded",),
        "invoices.bulk_import": ("import.completed",),
    }
    return Expected(APPLIED, None, events.get(task, ()))


def rejected(reason: str) -> Expected:
    return Expected(REJECTED, reason, ("command.rejected",))


def dead_lettered(reason: str) -> Expected:
    return Expected(DEAD, reason)


@dataclass
class Sent:
    task: str
    body: dict[str, Any]
    expected: Expected
    copies: int = 1


class Ledger:
    """What a scenario sent, by messageId (a copy sent again counts a copy, not a message), and what
    it expects of each."""

    def __init__(self) -> None:
        self.messages: dict[str, Sent] = {}

    def record(self, task: str, body: dict[str, Any], expected: Expected | None = None) -> None:
        known = self.messages.get(body["messageId"])
        if known is None:
            self.messages[body["messageId"]] = Sent(task, body, expected or expected_of(task, body))
        else:
            known.copies += 1
            if expected is not None:
                known.expected = expected

    def expect(self, message_id: str, expected: Expected) -> None:
        self.messages[message_id].expected = expected

    @property
    def copies(self) -> int:
        return sum(s.copies for s in self.messages.values())

    def keys(self) -> set[tuple[str, str]]:
        return {(s.body["tenantId"], m) for m, s in self.messages.items()}


class EventTap:
    """A plain kombu consumer (no project code) on a durable queue of its own bound to
    invoices.events; it reconnects when the broker goes away and comes back. An event of another
    content type than application/json is counted in `not_json` (the checker reports it)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.queue_name = f"fault-events-{uuid.uuid4().hex[:8]}"
        self.events: dict[str, dict[str, Any]] = {}
        self.copies: Counter = Counter()  # eventId -> copies received (at least once: repeats are allowed)
        self.not_json: list[str] = []
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

    def _take(self) -> None:
        """Everything queued now; raises when the broker is away."""
        bound = self._queue()
        while (message := bound.get(no_ack=True, accept=["json", "application/data", "text/plain"])) is not None:
            if message.content_type != "application/json":
                self.not_json.append(message.content_type)
                continue
            event = message.decode()
            self.received += 1
            self.copies[event["eventId"]] += 1
            self.events.setdefault(event["eventId"], event)

    def drain(self, until: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._take()
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


COLUMNS = ("lost", "wrong_outcome", "applied_twice", "events_missing")


@dataclass
class Verdict:
    sent: int
    copies: int
    lost: int = 0
    wrong_outcome: int = 0
    applied_twice: int = 0
    events_missing: int = 0
    effects: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def counts(self) -> tuple[int, int, int, int]:
        return self.lost, self.wrong_outcome, self.applied_twice, self.events_missing

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
                 broker_url: str | None = None, strict: bool = True) -> float | None:
    """Wait until everything sent has its outcome; the moment it had, as time.monotonic(). When it
    does not: with `strict`, fail naming what is missing (with a Redis `broker_url`, where the broker
    holds it); else return None, and the checker counts what is missing."""
    deadline = time.monotonic() + timeout
    while not settled(database_url, ledger, expected_dead):
        if time.monotonic() > deadline:
            if not strict:
                return None
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
    """Compare the ledger with what happened (the module's docstring); the relay is given
    `event_timeout` to publish what committed. `expected_dead`: messageId -> the reason it is
    expected dead-lettered with (the same as `ledger.expect(m, dead_lettered(reason))`)."""
    for message_id, reason in (expected_dead or {}).items():
        if message_id in ledger.messages:
            ledger.expect(message_id, dead_lettered(reason))
    verdict = Verdict(sent=len(ledger.messages), copies=ledger.copies)
    with psycopg.connect(conninfo(database_url)) as db:
        state = _State.read(db)
    applied = _outcomes(verdict, ledger, state)
    lost = [m for m, s in ledger.messages.items() if (s.body["tenantId"], m) not in state.inbox
            and m not in {d for d, _ in state.dead}]
    if lost:  # on Redis, where the broker holds them (or nowhere: taken and gone)
        where = held_by_redis(tap.broker_url, set(lost[:5]))
        verdict.problems.append(f"{len(lost)} lost; of the first: " + ", ".join(f"{m} [{where.get(m, 'nowhere')}]"
                                                                               for m in lost[:5]))
    twice, twice_invoices = _effects(verdict, ledger, state, applied)
    _events(verdict, ledger, state, tap, applied, twice, event_timeout)
    # an invoice's excess is counted once, on the message that caused it when one is known
    of_messages = {(ledger.messages[m].body["tenantId"], ledger.messages[m].body.get("invoiceNumber")) for m in twice}
    twice_invoices = {(kind, key) for kind, key in twice_invoices if kind != "invoice" or key not in of_messages}
    verdict.applied_twice = len(twice) + len(twice_invoices)
    return verdict


@dataclass
class _State:
    """What the database holds after the scenario."""

    inbox: dict[tuple[str, str], tuple[str, str | None, str | None]]  # -> outcome, reason, invoice id
    dead: list[tuple[str | None, str]]
    invoices: list[tuple[str, str, str, str | None, Decimal, int, int]]  # id, tenant, number, order, paid, seq, completed
    outbox: dict[str, tuple[str | None, str | None, str]]  # eventId -> invoice id, causation id, type

    @classmethod
    def read(cls, db: psycopg.Connection) -> "_State":
        inbox = {(t, m): (o, r, str(i) if i else None) for t, m, o, r, i in
                 db.execute("SELECT tenant_id, message_id, outcome, reason, invoice_id FROM inbox")}
        dead = db.execute("SELECT message_id, reason FROM dead_letters ORDER BY id").fetchall()
        invoices = [(str(i), t, n, o, paid, seq, completed) for i, t, n, o, paid, seq, completed in db.execute(
            "SELECT i.id, i.tenant_id, i.invoice_number, i.order_id, i.amount_paid, i.event_sequence, "
            "(SELECT count(*) FROM payments p WHERE p.invoice_id = i.id AND p.status = 'Completed') FROM invoices i")]
        outbox = {str(e): (str(i) if i else None, c, t) for e, i, c, t in
                  db.execute("SELECT event_id, invoice_id, causation_id, type FROM outbox")}
        return cls(inbox, dead, invoices, outbox)


def _outcomes(verdict: Verdict, ledger: Ledger, state: _State) -> set[str]:
    """Count lost and wrong outcomes; the messageIds applied as expected."""
    dead_reasons: dict[str, list[str]] = defaultdict(list)
    for message_id, reason in state.dead:
        dead_reasons[message_id].append(reason)
    applied: set[str] = set()
    for message_id, sent in ledger.messages.items():
        record = state.inbox.get((sent.body["tenantId"], message_id))
        reasons = dead_reasons.get(message_id, [])
        if record is None and not reasons:
            verdict.lost += 1
            verdict.problems.append(f"lost: {sent.task} {message_id} has no outcome")
            continue
        if record is not None and reasons:
            verdict.problems.append(f"{message_id} has an outcome ({record[0]}) and a dead letter ({reasons[0]})")
        outcome, reason = (record[0], record[1]) if record is not None else (DEAD, reasons[0])
        want = sent.expected
        if outcome != want.outcome or (want.reason is not None and reason != want.reason):
            verdict.wrong_outcome += 1
            verdict.problems.append(f"wrong outcome: {sent.task} {message_id} is {outcome} {reason or ''}, "
                                    f"expected {want.outcome} {want.reason or ''}")
        elif outcome == APPLIED:
            applied.add(message_id)
    unexpected = {m: r for m, r in state.dead if m not in ledger.messages}
    if unexpected:
        verdict.problems.append(f"dead letters of messages not sent: {unexpected}")
    return applied


def _effects(verdict: Verdict, ledger: Ledger, state: _State, applied: set[str]) -> tuple[set[str], set[tuple]]:
    """Payments, amounts and invoices per order against what was sent expecting them. Returns the
    messages and the invoices/orders counted applied twice so far (a dead letter stored twice)."""
    twice: set[str] = {m for m, n in Counter(m for m, _ in state.dead).items() if n > 1 and m in ledger.messages}
    for message_id in twice:
        verdict.problems.append(f"applied twice: {message_id} was dead-lettered more than once")
    twice_invoices: set[tuple] = set()
    expected_sum: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    expected_count: Counter = Counter()
    orders: set[tuple[str, str]] = set()
    addressed: set[tuple[str, str]] = set()  # invoices created by a message of the ledger
    for message_id, sent in ledger.messages.items():
        body, tenant = sent.body, sent.body["tenantId"]
        if sent.task == "invoices.record_payment":
            if sent.expected.outcome == APPLIED:
                expected_sum[(tenant, body["invoiceNumber"])] += Decimal(str(body["amount"]))
                expected_count[(tenant, body["invoiceNumber"])] += 1
        elif sent.task == "invoices.order_shipped":
            orders.add((tenant, body["orderId"]))
            if body.get("invoiceNumber"):
                addressed.add((tenant, body["invoiceNumber"]))
        elif sent.task == "invoices.create":
            addressed.add((tenant, body["invoiceNumber"]))
    if expected_count:
        verdict.effects += ["payments", "amounts"]
    if orders:
        verdict.effects.append("invoices")
    per_order = Counter((tenant, order) for _, tenant, _, order, *_ in state.invoices if (tenant, order) in orders)
    for key, count in per_order.items():
        if count > 1:
            twice_invoices.add(("order", key))
            verdict.problems.append(f"applied twice: order {key} has {count} invoices")
    for _, tenant, number, _, paid, _, completed in state.invoices:
        key = (tenant, number)
        if key not in addressed and key not in expected_count:
            continue  # not an invoice of the ledger's payments (an imported one, say)
        want_sum, want_count = expected_sum[key], expected_count[key]
        if completed > want_count or paid > want_sum:
            twice_invoices.add(("invoice", key))
            verdict.problems.append(f"applied twice: {tenant}/{number} has {completed} payments, amountPaid {paid}; "
                                    f"sent {want_count} expected applied, {want_sum}")
        elif completed < want_count or paid < want_sum:
            verdict.problems.append(f"{tenant}/{number} has {completed} payments, amountPaid {paid}; "
                                    f"sent {want_count} expected applied, {want_sum}")
    return twice, twice_invoices


def _events(verdict: Verdict, ledger: Ledger, state: _State, tap: EventTap, applied: set[str], twice: set[str],
            event_timeout: float) -> None:
    """Per applied message its events (once each per invoice); per invoice its sequences."""
    tap.drain(lambda: set(state.outbox) <= set(tap.events), event_timeout)
    problems = verdict.problems
    if tap.not_json:
        problems.append(f"{len(tap.not_json)} events of content type {sorted(set(tap.not_json))}, not application/json")
    events = list(tap.events.values())
    uncommitted = set(tap.events) - set(state.outbox)
    if uncommitted:
        problems.append(f"{len(uncommitted)} events received that never committed")
    by_cause: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        if event.get("causationId") in ledger.messages:
            by_cause[event["causationId"]].append(event)
    invoice_of = {m: i for (_, m), (_, _, i) in state.inbox.items() if i}
    missing: set[str] = set()
    for message_id in applied:
        sent, got = ledger.messages[message_id], by_cause.get(message_id, [])
        for event_type in sent.expected.events:
            matching = [e for e in got if e["type"] == event_type]
            if event_type == "payment.recorded":
                matching = [e for e in matching
                            if Decimal(str(e["data"].get("amount"))) == Decimal(str(sent.body["amount"]))]
            if not matching:
                missing.add(message_id)
                problems.append(f"events missing: {sent.task} {message_id} applied without its {event_type}")
        caused = Counter((e["type"], e.get("invoiceId")) for e in got)
        repeats = [f"{event_type} x{n}" for (event_type, _), n in caused.items() if n > 1]
        if repeats:
            twice.add(message_id)
            problems.append(f"applied twice: {sent.task} {message_id} caused {', '.join(repeats)}")
    if any(ledger.messages[m].expected.events for m in applied):
        verdict.effects.append("events")
    explained = {invoice_of.get(m) for m in missing | twice} - {None}
    unreceived = [e for e in set(state.outbox) - set(tap.events) if state.outbox[e][1] not in missing]
    for event_id in unreceived:
        missing.add(f"event {event_id}")
        problems.append(f"events missing: {state.outbox[event_id][2]} {event_id} committed and never received")
    explained |= {state.outbox[e][0] for e in unreceived} - {None}
    per_invoice: dict[str, list[int]] = defaultdict(list)
    for event in events:
        if event.get("sequence") is not None:
            per_invoice[event["invoiceId"]].append(event["sequence"])
    for invoice_id, _, number, _, _, count, _ in state.invoices:
        got = sorted(per_invoice.get(invoice_id, []))
        if got != list(range(1, count + 1)):
            problems.append(f"invoice {number}: sequences {got[:12]}… are not 1..{count}")
            if invoice_id not in explained:
                missing.add(f"invoice {invoice_id}")
    if per_invoice:
        verdict.effects.append("sequences")
    verdict.events_missing = len(missing)
