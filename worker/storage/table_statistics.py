"""The planner's statistics of the invoices table, refreshed by the bulk import that outgrew them.

Every invoice index but the primary key leads with tenant_id. When the statistics do not know a
tenant yet (a new tenant's first import, or any import before autovacuum's next ANALYZE: a minute
at best, then again at each 10% of the table), the planner takes the tenant for a handful of rows,
every tenant-leading index looks alike, and a lookup by (tenant, invoiceNumber) may walk all of
the tenant's invoices through any of them. Measured: a batch of 30 record_payment for a tenant
of 1,200 invoices read 1,200 index entries of invoices (tests/integration/test_table_statistics.py);
the cost grows with every invoice the import adds, until the statistics catch up.

So an import that leaves the table with at least STALE_ROWS rows changed since its last ANALYZE
analyzes it then, after its commit, outside the message's transaction: one at a time (an
advisory lock; the others go on), never waiting long for autovacuum (which holds the same lock
while it works), and never failing the import (a refused or failed ANALYZE is logged and left to
autovacuum).
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.storage import db

log = logging.getLogger(__name__)

# Rows inserted, updated or deleted since the table's last ANALYZE (pg_stat_user_tables'
# n_mod_since_analyze) from which an import analyzes it: a batch's lookups then walk at most about
# this many of a tenant's invoices, and ANALYZE (a sample of 30,000 rows: 233-384 ms at 200,000
# invoices) runs once per ten imports of 1,000 new invoices at most. Measured, python -m
# bench.import_cpu 100000, alternating: PostgreSQL's CPU 9.7 / 10.6 s without, 11.4 / 11.0 s with
# (ten ANALYZEs); 7,036 / 6,561 against 6,664 / 6,671 invoices/s.
STALE_ROWS = 10_000
# pg_try_advisory_xact_lock's key: one ANALYZE of ours at a time across every worker.
ANALYZE_LOCK = 0x1D5_A7A1
ANALYZE_LOCK_WAIT_MS = 100


def counted_at_commit(session: Session) -> None:
    """Have this transaction's row counts reach pg_stat_user_tables as it commits: a backend
    otherwise keeps them for up to 10 s once idle (PostgreSQL 15 on; before 15 a backend sent them to
    the statistics collector every half second, and there is no such function)."""
    if session.get_bind().dialect.server_version_info >= (15,):
        session.execute(text("SELECT pg_stat_force_next_flush()"))


def refresh_if_stale() -> bool:
    """ANALYZE invoices when it changed by STALE_ROWS rows or more since its last; True when it ran."""
    try:
        with db.engine().connect() as conn:
            changed = conn.execute(text("SELECT n_mod_since_analyze FROM pg_stat_user_tables "
                                        "WHERE relid = 'invoices'::regclass")).scalar()
            if changed is None or changed < STALE_ROWS:
                return False
            if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": ANALYZE_LOCK}).scalar():
                return False  # another worker is analyzing it now
            conn.execute(text(f"SET LOCAL lock_timeout = {ANALYZE_LOCK_WAIT_MS}"))
            conn.execute(text("ANALYZE invoices"))
            conn.commit()
            log.info("analyzed invoices: %d rows changed since its last ANALYZE", changed)
            return True
    except Exception as exc:  # noqa: BLE001 - the import is committed; autovacuum analyzes it later
        log.warning("could not analyze invoices (%s); autovacuum will", exc)
        return False
