"""Heartbeats: the worker, the relay and beat each refresh a row of `heartbeats` every few
seconds from a thread of their own, so that `status` and the console can tell which of them is
alive without pinging (only workers answer a Celery ping; the relay and beat have no such channel).
Plain psycopg: operations imports no storage code."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import timezone
from typing import Any

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 5.0
# Seen within this long: alive. Three missed beats (a pause of the database, a busy host) first.
ALIVE_SECONDS = 20.0
COMPONENTS = ("worker", "relay", "beat")

UPSERT = """
INSERT INTO heartbeats (component, instance, started_at, seen_at) VALUES (%s, %s, now(), now())
ON CONFLICT (component, instance) DO UPDATE SET seen_at = now()
"""
# Rows of processes long gone (each start is a new host:pid) do not pile up.
PRUNE = "DELETE FROM heartbeats WHERE seen_at < now() - interval '1 day'"
READ = ("SELECT component, instance, started_at, round(extract(epoch FROM now() - seen_at), 3)::float8 "
        "FROM heartbeats ORDER BY component, seen_at DESC")


def instance() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat(threading.Thread):
    def __init__(self, component: str, database_url: str) -> None:
        super().__init__(name=f"heartbeat-{component}", daemon=True)
        self.component = component
        self.database_url = database_url
        self.stopped = threading.Event()

    def run(self) -> None:
        import psycopg

        from worker.endpoints import libpq_url

        me, beats = instance(), 0
        while not self.stopped.is_set():
            try:
                with psycopg.connect(libpq_url(self.database_url), connect_timeout=5) as db:
                    while not self.stopped.is_set():
                        db.execute(UPSERT, (self.component, me))
                        if beats % 720 == 0:  # about hourly
                            db.execute(PRUNE)
                        db.commit()
                        beats += 1
                        self.stopped.wait(INTERVAL_SECONDS)
            except Exception as exc:  # the database away, or not migrated yet: try again later
                log.debug("heartbeat of %s not written: %s", self.component, exc)
                self.stopped.wait(INTERVAL_SECONDS)

    def stop(self) -> None:
        self.stopped.set()


def start(component: str, database_url: str | None = None) -> Heartbeat | None:
    """Start the heartbeat thread of this process; None when no database can be found."""
    if database_url is None:
        from worker.config import ConfigurationError
        from worker.endpoints import database_url as find

        try:
            database_url = find()
        except ConfigurationError:
            return None
    beat = Heartbeat(component, database_url)
    beat.start()
    return beat


def read(db: Any) -> dict[str, Any]:
    """Per component: alive (seen within ALIVE_SECONDS), seconds since last seen, and the
    instances seen in the last day. `db` is an open psycopg connection."""
    found: dict[str, Any] = {c: {"alive": False, "lastSeenAgeSeconds": None, "instances": []} for c in COMPONENTS}
    for component, name, started, age in db.execute(READ).fetchall():
        entry = found.setdefault(component, {"alive": False, "lastSeenAgeSeconds": None, "instances": []})
        entry["instances"].append({"instance": name, "startedAt": started.astimezone(timezone.utc).isoformat(),
                                   "lastSeenAgeSeconds": age, "alive": age <= ALIVE_SECONDS})
        if entry["lastSeenAgeSeconds"] is None or age < entry["lastSeenAgeSeconds"]:
            entry["lastSeenAgeSeconds"] = age
        entry["alive"] = entry["alive"] or age <= ALIVE_SECONDS
    return found


def age_text(seconds: float | None) -> str:
    """A heartbeat's (or any moment's) age as `status` and the console show it: "12.0s ago", "3.5m ago"."""
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.1f}s ago"
