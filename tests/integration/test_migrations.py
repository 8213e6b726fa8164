"""Alembic migrations: the schema comes from migrations alone, matches the models, and goes
down and up again cleanly."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

import worker.storage.records  # noqa: F401
from models.base import Base
from worker.storage.migrate import current, upgrade


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
        assert current(empty_database) == "0008"
        with engine.connect() as conn:
            triggers = conn.exec_driver_sql("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal").scalars().all()
        assert "outbox_notify" in triggers
    finally:
        engine.dispose()


def test_migrations_go_down_and_up_again(empty_database):
    from alembic import command

    from worker.storage.migrate import alembic_config

    upgrade(empty_database)
    command.downgrade(alembic_config(empty_database), "base")
    engine = create_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade(empty_database)
    upgrade(empty_database)  # a second upgrade is a no-op
    assert current(empty_database) == "0008"


def test_0006_keeps_every_payment_id_and_goes_back(empty_database):
    """Existing payments keep their id as key and public id; down again, refunds and retries follow."""
    from alembic import command

    from worker.storage.migrate import alembic_config

    config = alembic_config(empty_database)
    command.upgrade(config, "0005")
    engine = create_engine(empty_database)
    invoice, failed, retry, refund = (str(uuid.uuid4()) for _ in range(4))
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO invoices (id, tenant_id, invoice_number, shipment_id, source, status, invoice_date, "
                "currency, customer, tax_amount, subtotal, discount_amount, invoice_total, amount_paid, balance, is_active, "
                "event_sequence, version, created_at, updated_at) VALUES (%(i)s, 't', 'INV-00001', '', 'create', "
                "'Issued', '2026-11-28', 'USD', '{}', 0, 10, 0, 10, 5, 5, true, 0, 1, now(), now())", {"i": invoice})
            for key, retry_of, status in ((failed, None, "Failed"), (retry, failed, "Completed")):
                conn.exec_driver_sql(
                    "INSERT INTO payments (id, invoice_id, status, amount, currency, retry_of, attempt, created_at) "
                    "VALUES (%(p)s, %(i)s, %(s)s, 5, 'USD', %(r)s, 0, now())",
                    {"p": key, "i": invoice, "s": status, "r": retry_of})
            conn.exec_driver_sql("INSERT INTO refunds (id, payment_id, amount, created_at) "
                                 "VALUES (%(f)s, %(p)s, 1, now())", {"f": refund, "p": retry})
        command.upgrade(config, "0006")
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT id::text, payment_id::text, retry_of::text FROM payments "
                                        "ORDER BY retry_of NULLS FIRST").all()
        assert [tuple(r) for r in rows] == [(failed, failed, None), (retry, retry, failed)]
        key, public = str(uuid.uuid4()), str(uuid.uuid4())
        with engine.begin() as conn:  # a later payment with a key of the worker's own, refunded, retrying the retry
            conn.exec_driver_sql(
                "INSERT INTO payments (id, payment_id, invoice_id, status, amount, currency, retry_of, attempt, "
                "created_at) VALUES (%(k)s, %(p)s, %(i)s, 'Completed', 1, 'USD', %(r)s, 1, now())",
                {"k": key, "p": public, "i": invoice, "r": retry})
            conn.exec_driver_sql("INSERT INTO refunds (id, payment_id, amount, created_at) "
                                 "VALUES (%(f)s, %(k)s, 1, now())", {"f": str(uuid.uuid4()), "k": key})
        command.downgrade(config, "0005")
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT id::text, retry_of::text FROM payments").all()
            assert sorted(tuple(r) for r in rows) == sorted([(failed, None), (retry, failed), (public, retry)])
            refunded = conn.exec_driver_sql("SELECT payment_id::text FROM refunds").scalars().all()
            assert sorted(refunded) == sorted([retry, public])
    finally:
        engine.dispose()
