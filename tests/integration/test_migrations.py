"""Alembic migrations: the schema comes from migrations alone, matches the models, and goes
down and up again cleanly."""

from __future__ import annotations

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

import worker.records  # noqa: F401
from models.base import Base
from worker.migrate import current, upgrade


@pytest.fixture
def empty_database(urls):
    base = make_url(urls["DATABASE_URL"])
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = base.database + "_mig"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_build_exactly_the_models_schema(empty_database):
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == []
        assert current(empty_database) == "0006"
        with engine.connect() as conn:
            triggers = conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").scalars().all()
        assert "outbox_notify" in triggers
    finally:
        engine.dispose()


def test_migrations_go_down_and_up_again(empty_database):
    from alembic import command

    from worker.migrate import alembic_config

    upgrade(empty_database)
    command.downgrade(alembic_config(empty_database), "base")
    engine = create_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(empty_database)
    upgrade(empty_database)  # a second upgrade is a no-op
    assert current(empty_database) == "0006"
