"""RELIABILITY.md: one row per fault scenario, written whatever happens to the scenario.

A scenario opens its row first (`reliability.row(...)`, with its ledger and event tap) and fills in
what it injected and what the checker found. When the scenario fails or times out before it ran
the checker, the fixture runs the checker itself on what is there and writes a FAILED row with
those counts; a row is never dropped. A section is rewritten per broker; the rows of scenarios not
run this time (a `-k` run, say) are kept from the previous run and marked so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.faults.checker import EventTap, Ledger, Verdict, check

HEADER = ("| scenario | result | messages sent (copies) | faults injected | lost | wrong outcome | applied twice "
          "| events missing | effects checked | fault cleared → all applied |")
RULE = "|" + "---|" * HEADER.count(" | ") + "---|"
INTRO = [
    "# Reliability",
    "",
    "Written by the fault suite (`tests/faults/`, part of `make test` on Redis and of",
    "`make test-rabbitmq` on RabbitMQ). Each row is one scenario run against real processes and",
    "servers, the faults injected from outside; the figures are what the shared checker",
    "(`tests/faults/checker.py`) found afterwards, comparing what the scenario sent (per message, the",
    "outcome and events it expects) with the inbox, the dead letters, the invoices, the payments and",
    "the events received. lost: sent, no outcome at all; wrong outcome: another outcome than expected;",
    "applied twice: an effect (payment, amount, invoice per order, event per message) counted more than",
    "once; events missing: an applied message without its events, or an invoice's sequences not 1..N.",
    "effects checked: what the checker compared for that row. A scenario that fails writes a FAILED",
    "row with what it counted. The section \"Cluster\" is written by `make test-cluster` (tests/cluster/:",
    "hosts as network namespaces, a three-node RabbitMQ cluster); its last column counts from the fault",
    "itself (the kill or the cut), not from its end.",
    "",
]


@dataclass
class ReliabilityRow:
    scenario: str
    database_url: str
    ledger: Ledger
    tap: EventTap
    expected_dead: dict[str, str] = field(default_factory=dict)
    faults: str = "none injected"
    verdict: Verdict | None = None
    recovery_seconds: float | None = None
    result: str = "passed"

    def checked(self, verdict: Verdict, recovery_seconds: float | None = None) -> Verdict:
        """Record the checker's verdict (and the time from the fault cleared to all settled)."""
        self.verdict, self.recovery_seconds = verdict, recovery_seconds
        return verdict

    def line(self) -> str:
        v = self.verdict
        recovery = f"{self.recovery_seconds:.1f} s" if self.recovery_seconds is not None else "n/a"
        if v is None:
            counts = "| not counted " * 4 + "| none "
            sent = f"{len(self.ledger.messages)} ({self.ledger.copies})"
        else:
            effects = ", ".join(v.effects) or "none"
            counts = f"| {v.lost} | {v.wrong_outcome} | {v.applied_twice} | {v.events_missing} | {effects} "
            sent = f"{v.sent} ({v.copies})"
        return f"| {self.scenario} | {self.result} | {sent} | {self.faults} {counts}| {recovery} |"


class Reliability:
    """The rows a test opened (the `reliability` fixture)."""

    def __init__(self) -> None:
        self.rows: list[ReliabilityRow] = []

    def row(self, scenario: str, database_url: str, ledger: Ledger, tap: EventTap,
            expected_dead: dict[str, str] | None = None) -> ReliabilityRow:
        row = ReliabilityRow(scenario, database_url, ledger, tap, dict(expected_dead or {}))
        self.rows.append(row)
        return row

    def finish(self, failure: Any | None) -> list[ReliabilityRow]:
        """Complete the rows at the test's end: count what the scenario did not (it failed before its
        check), mark a failed scenario FAILED with the first line of its failure."""
        for row in self.rows:
            if row.verdict is None:
                try:
                    row.verdict = check(row.database_url, row.ledger, row.tap, expected_dead=row.expected_dead,
                                        event_timeout=15)
                except Exception as exc:  # the database itself is gone: the row says so
                    row.result = f"FAILED (not counted: {type(exc).__name__})"
            if failure is not None and row.result == "passed":
                first = str(failure).strip().splitlines()[0][:120] if str(failure).strip() else "failed"
                row.result = "FAILED: " + first.replace("|", "/")
            row.tap.close()
        return self.rows


def write_reliability(path: Path, rows: list[ReliabilityRow], broker: str = "Redis (Valkey)") -> None:
    """Rewrite this broker's section of RELIABILITY.md; the other broker's section is kept, and so
    are this section's rows of scenarios not run this time."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections: dict[str, str] = {}
    if path.exists():
        for chunk in path.read_text().split("\n## ")[1:]:
            sections[chunk.split("\n", 1)[0]] = "## " + chunk.rstrip("\n")
    ran = {r.scenario for r in rows}
    kept = [line for line in _rows_of(sections.get(broker, "")) if line.split(" | ")[0][2:] not in ran]
    lines = {r.scenario: r.line() for r in rows}
    for line in kept:  # marked in its result cell, once
        cells = line.split(" | ")
        if "earlier run" not in cells[1]:
            cells[1] += " (earlier run)"
        lines[cells[0][2:]] = " | ".join(cells)
    table = [f"## {broker}", "", f"Run on {when}" + (f"; {len(kept)} rows kept from an earlier run (not run this time)."
                                                      if kept else "."), "", HEADER, RULE]
    table += [lines[name] for name in sorted(lines)]
    sections[broker] = "\n".join(table)
    order = sorted(sections, key=lambda name: (not name.startswith("Redis"), name))
    path.write_text("\n".join(INTRO) + "\n" + "\n\n".join(sections[name] for name in order) + "\n")


def _rows_of(section: str) -> list[str]:
    """The scenario rows of a section written in today's layout (an older layout's rows are not kept)."""
    lines = section.splitlines()
    if HEADER not in lines:
        return []
    return [line for line in lines[lines.index(HEADER) + 2:] if line.startswith("| ")]
