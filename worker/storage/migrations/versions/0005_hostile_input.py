"""Hostile input: dead letters keyed by the worker's own fingerprint; events the broker refuses are parked

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("fingerprint", sa.String(64), nullable=True))
    op.execute("UPDATE dead_letters SET fingerprint = md5(delivery_id) || md5(id::text)")
    op.alter_column("dead_letters", "fingerprint", nullable=False)
    op.create_unique_constraint(op.f("uq_dead_letters_fingerprint"), "dead_letters", ["fingerprint"])
    op.drop_constraint("uq_dead_letters_delivery_id", "dead_letters", type_="unique")
    op.create_index(op.f("ix_dead_letters_delivery_id"), "dead_letters", ["delivery_id"])
    op.add_column("outbox", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("park_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "park_reason")
    op.drop_column("outbox", "parked_at")
    op.drop_index(op.f("ix_dead_letters_delivery_id"), table_name="dead_letters")
    op.create_unique_constraint("uq_dead_letters_delivery_id", "dead_letters", ["delivery_id"])
    op.drop_constraint(op.f("uq_dead_letters_fingerprint"), "dead_letters", type_="unique")
    op.drop_column("dead_letters", "fingerprint")
