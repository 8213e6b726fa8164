"""Alembic environment: the worker's metadata, one migration run at a time (advisory lock)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text

import worker.storage.records  # noqa: F401  (registers the worker's tables on the metadata)
from models.base import Base

MIGRATION_LOCK = 4_242_001

target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    connectable = context.config.attributes.get("connection") or create_engine(url)
    if hasattr(connectable, "connect"):
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:
    # Two starting workers (or `run` beside a one-shot migrate) must not migrate at the same time.
    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    try:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
        connection.commit()


run_migrations_online()
