"""The pure parts of what operators see: when a consumer counts as stopped, and what a log line
may never contain."""

from __future__ import annotations

import logging

import pytest

from worker.operations.health import STALL_SECONDS, Consumption, stalled
from worker.operations.logs import REDACTED, Redacting


@pytest.mark.parametrize(("waiting", "idle", "active", "expected"), [
    (5, STALL_SECONDS + 1, 0, True),    # messages wait, nothing received, slots free: stopped
    (0, STALL_SECONDS + 1, 0, False),   # nothing waits: idle, not stopped
    (5, STALL_SECONDS - 1, 0, False),   # received a moment ago
    (5, STALL_SECONDS + 1, 3, False),   # every slot busy (a long import): the wait is explained
    (5, STALL_SECONDS + 1, 2, True),    # one slot free and still nothing received
])
def test_a_consumer_is_stopped_when_messages_wait_and_none_arrives_with_a_slot_free(waiting, idle, active, expected):
    assert stalled(waiting, idle, active, concurrency=3) is expected


def test_consumption_trips_once_with_an_error_and_clears_when_a_message_arrives(caplog):
    watch = Consumption(concurrency=2)
    watch.last_received -= STALL_SECONDS + 5  # a quiet spell: nothing received, nothing waiting
    with caplog.at_level(logging.WARNING, logger="worker.operations.health"):
        arriving = watch.problem(waiting=7)  # messages just arrived after the quiet spell: not a stop
        watch.waiting_since -= STALL_SECONDS + 1  # ... and they are still waiting a while later
        first = watch.problem(waiting=7)
        second = watch.problem(waiting=7)
        watch.received()
        cleared = watch.problem(waiting=7)
    assert arriving is None
    assert first and "messages waiting on its queues: 7;" in first and second is not None  # still stopped
    assert cleared is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "not consuming" in errors[0].getMessage()


def test_a_secret_never_reaches_a_formatted_line_whatever_the_format():
    from worker.operations.logs import json_formatter

    record = logging.LogRecord("worker.x", logging.ERROR, __file__, 1, "cannot connect to %s with %s",
                               ("postgresql://app:hunter22@db/invoices", "sig-secret-1"), None)
    for inner in (logging.Formatter("%(message)s"), json_formatter()):
        line = Redacting(inner, ["hunter22", "sig-secret-1"]).format(record)
        assert "hunter22" not in line and "sig-secret-1" not in line
        assert line.count(REDACTED) == 2


def test_the_secrets_come_from_the_settings(monkeypatch):
    from worker import config
    from worker.operations.logs import secrets

    monkeypatch.setenv("CALLBACK_SIGNING_SECRET", "old-secret,new-secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://app:pg-pass-9@db/invoices")
    monkeypatch.setenv("BROKER_URL", "redis://:broker-pass-7@redis:6379/0")
    config.settings.cache_clear()
    try:
        assert set(secrets()) == {"old-secret", "new-secret", "pg-pass-9", "broker-pass-7"}
    finally:
        config.settings.cache_clear()
