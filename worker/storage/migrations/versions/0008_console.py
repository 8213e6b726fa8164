"""The operator's console: its audit table, heartbeats of the worker, relay and beat, and the
dead-letter indexes its keyset pagination walks, and a BRIN index on the inbox's processed_at for the last hour's figures

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "heartbeats",
        sa.Column("component", sa.String(20), nullable=False),
        sa.Column("instance", sa.String(200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("component", "instance", name=op.f("pk_heartbeats")),
    )
    op.create_table(
        "console_audit",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("who", sa.String(200), nullable=False),
        sa.Column("action", sa.String(50), nullable=False),
        sa.Column("target", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_audit")),
    )
    op.create_index("ix_console_audit_at", "console_audit", ["at"])
    op.create_index("ix_dead_letters_status_id", "dead_letters", ["status", "id"])
    op.create_index("ix_dead_letters_status_reason_id", "dead_letters", ["status", "reason", "id"])
    op.create_index("ix_dead_letters_status_tenant_id", "dead_letters", ["status", "tenant_id", "id"])
    op.create_index("ix_dead_letters_first_seen", "dead_letters", ["first_seen"])
    op.create_index("ix_inbox_processed_at_brin", "inbox", ["processed_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_inbox_processed_at_brin", "inbox")
    op.drop_index("ix_dead_letters_first_seen", "dead_letters")
    op.drop_index("ix_dead_letters_status_tenant_id", "dead_letters")
    op.drop_index("ix_dead_letters_status_reason_id", "dead_letters")
    op.drop_index("ix_dead_letters_status_id", "dead_letters")
    op.drop_index("ix_console_audit_at", "console_audit")
    op.drop_table("console_audit")
    op.drop_table("heartbeats")
