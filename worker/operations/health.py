"""What the worker knows about its surroundings, read at scrape time (CONTRACT.md section 10):
whether PostgreSQL and the broker answer, the outbox lag, open dead letters, the depth of each
queue, and whether this worker is still consuming.

One probe reads all of it, at most once per PROBE_CACHE_SECONDS, so that a scrape every second
and a readiness check every second cost a few queries every two seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

log = logging.getLogger(__name__)

PROBE_CACHE_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 2
# Messages waiting on our queues and none received for this long, with a pool slot free: the
# consumer has stopped (Celery bugs #8030, #8384, #10205: alive after a reconnect, but not consuming).
# CONSUMER_STALL_SECONDS sets it.
STALL_SECONDS = 30.0

# What /readyz says of a part that does not answer: a word (the key) and a sentence of ours. The
# servers' own error text names hosts, ports and roles: it goes to the log, never to the caller.
PUBLIC_PROBLEMS = {
    "database": "PostgreSQL does not answer (the worker's log has the error)",
    "broker": "the broker does not answer (the worker's log has the error)",
}

OUTBOX_LAG = ("SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL")
OPEN_DEAD_LETTERS = "SELECT count(*) FROM dead_letters WHERE status = 'open'"


@dataclass
class Snapshot:
    """One reading. A part that could not be read is None, and `problems` says why."""

    taken: float
    outbox_unpublished: int | None = None
    outbox_oldest_age_seconds: float | None = None
    dead_letters_open: int | None = None
    queue_depth: dict[str, int] | None = None
    problems: dict[str, str] = field(default_factory=dict)


def read_database(database_url: str, snapshot: Snapshot) -> None:
    import psycopg

    from worker.endpoints import libpq_url

    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=PROBE_TIMEOUT_SECONDS) as db:
            count, oldest = db.execute(OUTBOX_LAG).fetchone()
            (open_letters,) = db.execute(OPEN_DEAD_LETTERS).fetchone()
    except Exception as exc:  # psycopg.Error, or a socket error on the way
        snapshot.problems["database"] = f"PostgreSQL does not answer: {_first_line(exc)}"
        return
    snapshot.outbox_unpublished = count
    snapshot.outbox_oldest_age_seconds = (datetime.now(timezone.utc) - oldest).total_seconds() if oldest else 0.0
    snapshot.dead_letters_open = open_letters


def read_queues(broker_url: str, queues: Iterable[Any], snapshot: Snapshot) -> None:
    """Messages waiting in each queue (not those a worker holds unacknowledged). Declaring a queue
    with the worker's own arguments is how both transports tell its length."""
    from kombu import Connection

    options = {"socket_timeout": PROBE_TIMEOUT_SECONDS, "socket_connect_timeout": PROBE_TIMEOUT_SECONDS,
               "max_retries": 1}
    try:
        with Connection(broker_url, connect_timeout=PROBE_TIMEOUT_SECONDS, transport_options=options) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            snapshot.queue_depth = {q.name: q(channel).queue_declare().message_count for q in queues}
    except Exception as exc:  # kombu's connection errors vary by transport
        snapshot.problems["broker"] = f"the broker does not answer: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def stalled(waiting: int, idle_seconds: float, active: int, concurrency: int, after: float = STALL_SECONDS) -> bool:
    """The consumer has stopped: messages wait on its queues, it has received none for `after`
    seconds, and a pool slot is free to take one (a full pool explains the wait)."""
    return waiting > 0 and idle_seconds >= after and active < concurrency


class Consumption:
    """The main process's view of its own consuming: when a message was last received from the
    broker, since when messages have been seen waiting, and how many it is running. `received()`
    is called for every message received."""

    def __init__(self, concurrency: int, after: float = STALL_SECONDS) -> None:
        self.concurrency = concurrency
        self.after = after
        self.last_received = time.monotonic()
        self.waiting_since: float | None = None
        self.tripped = False

    def received(self) -> None:
        self.last_received = time.monotonic()

    def problem(self, waiting: int) -> str | None:
        """A sentence when the consumer has stopped, else None; logs an ERROR when it first trips.
        The wait counts from the later of the last message received and the first reading that saw
        messages waiting (any reading with none starts it again), so that messages arriving after a
        quiet hour, or taken by another worker, do not look like a stop."""
        from celery.worker import state

        now = time.monotonic()
        if waiting == 0:
            self.waiting_since = None
        elif self.waiting_since is None:
            self.waiting_since = now
        idle = now - max(self.last_received, self.waiting_since or now)
        active = len(state.active_requests)
        if not stalled(waiting, idle, active, self.concurrency, self.after):
            if self.tripped:
                log.warning("consuming again (a message was received, or none waits)")
            self.tripped = False
            return None
        sentence = (f"not consuming: messages waiting on its queues: {waiting}; none received for {idle:.0f}s "
                    f"with {self.concurrency - active} of {self.concurrency} pool slots free")
        if not self.tripped:
            log.error("%s; the broker connection may need a restart of the worker", sentence)
        self.tripped = True
        return sentence


def _log_changes(previous: Snapshot | None, current: Snapshot) -> None:
    """The error text of each part that does not answer, logged when it first appears or changes
    (not at every reading), and a line when the part answers again."""
    before = previous.problems if previous is not None else {}
    for part, detail in current.problems.items():
        if before.get(part) != detail:
            log.warning("readiness: %s", detail)
    for part in before.keys() - current.problems.keys():
        log.info("readiness: %s answers again", part)


class Probe:
    """Reads the database and the broker at most once per PROBE_CACHE_SECONDS (thread-safe)."""

    def __init__(self, database_url: str, broker_url: str, queues: Iterable[Any],
                 consumption: Consumption | None = None) -> None:
        self.database_url = database_url
        self.broker_url = broker_url
        self.queues = list(queues)
        self.consumption = consumption
        self._lock = threading.Lock()
        self._last: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last.taken >= PROBE_CACHE_SECONDS:
                snapshot = Snapshot(taken=now)
                read_database(self.database_url, snapshot)
                read_queues(self.broker_url, self.queues, snapshot)
                _log_changes(self._last, snapshot)
                self._last = snapshot
            return self._last

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, JSON body): ready while PostgreSQL and the broker answer and the worker consumes."""
        snapshot = self.snapshot()
        problems = {part: PUBLIC_PROBLEMS.get(part, part) for part in snapshot.problems}
        if self.consumption is not None and snapshot.queue_depth is not None:
            stopped = self.consumption.problem(sum(snapshot.queue_depth.values()))
            if stopped:
                problems["consumer"] = stopped
        return not problems, {"ready": not problems, "problems": problems}
