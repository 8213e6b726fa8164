"""Delivery records: deletion tombstones, messages waiting for their invoice, delivery counts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deleted_invoices",
        sa.Column("invoice_id", sa.Uuid(), primary_key=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("invoice_number", sa.String(200), nullable=False),
        sa.Column("message_id", sa.String(200), nullable=True),
        sa.Column("task", sa.String(100), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("ix_deleted_invoices_number", "deleted_invoices", ["tenant_id", "invoice_number"])
    op.create_table(
        "invoice_waits",
        sa.Column("tenant_id", sa.String(200), primary_key=True),
        sa.Column("message_id", sa.String(200), primary_key=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.create_table(
        "delivery_counts",
        sa.Column("delivery_id", sa.Text(), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("starts", sa.Integer(), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("delivery_counts")
    op.drop_table("invoice_waits")
    op.drop_index("ix_deleted_invoices_number", table_name="deleted_invoices")
    op.drop_table("deleted_invoices")
