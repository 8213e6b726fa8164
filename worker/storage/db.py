"""The engine and sessions of this process. Each process (and each forked pool child) makes its own."""

from __future__ import annotations

import os
import threading

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from worker.config import settings
from worker.endpoints import CONNECT_OPTIONS, IDLE_IN_TRANSACTION_MS, database_url

# Sequential scans off (enable_seqscan=off) for every connection of ours: each statement we run
# finds its rows by key, and has an index to do it with. On a young or fast-growing database the
# planner's statistics lag the tables (autovacuum analyzes a minute later at best); a plan made
# when the inbox held a few hundred rows, cached with its prepared statement for the connection's
# life, scanned the whole inbox for every outcome a batch wrote: 225 pages and 0.9 ms an update at
# 20,000 rows, PostgreSQL's CPU per message 805 µs instead of 284 (pg_stat_statements and
# auto_explain, in bench/brokers.py's end to end). A statement with no index to use still scans.
# tests/integration/test_batch_plans.py holds a batch to it.

_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_sessions: sessionmaker[Session] | None = None


def engine() -> Engine:
    """The process's engine; a forked child never reuses its parent's connections."""
    global _engine, _engine_pid, _sessions
    with _lock:
        if _engine is None or _engine_pid != os.getpid():
            if _engine is not None:
                _engine.dispose(close=False)
            config = settings()
            _engine = create_engine(database_url(), pool_size=4, max_overflow=4, pool_recycle=1800, connect_args={
                "options": f"-c statement_timeout={config.statement_timeout_ms} -c lock_timeout={config.lock_timeout_ms}"
                           f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS} -c enable_seqscan=off",
                **CONNECT_OPTIONS,
            })
            _engine_pid = os.getpid()
            # No autoflush: the unit of work writes everything at commit, in one flush. With autoflush
            # on, a lazy load inside a domain operation (the invoice's payments, read when a payment
            # settles it) flushed the half-built change, and SQLAlchemy warned that the new Payment
            # was "not in session" (it is added by the unit of work at commit).
            _sessions = sessionmaker(_engine, expire_on_commit=False, autoflush=False)
        return _engine


def sessions() -> sessionmaker[Session]:
    engine()
    assert _sessions is not None
    return _sessions


def reset() -> None:
    """Forget the engine (tests that change DATABASE_URL, forked children)."""
    global _engine, _sessions
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _sessions = None
