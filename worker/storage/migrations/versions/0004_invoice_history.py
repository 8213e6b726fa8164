"""Invoice history (append-only, kept for good), order keys on tombstones, indexes for pruning

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "invoice_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("tenant_id", sa.String(200), nullable=False),
        sa.Column("invoice_id", sa.Uuid(), nullable=False),
        sa.Column("invoice_number", sa.String(200), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("message_id", sa.String(200), nullable=True),
        sa.Column("causation_id", sa.String(200), nullable=True),
        sa.Column("task", sa.String(100), nullable=False),
        sa.Column("events", postgresql.JSONB(), nullable=False),
        sa.Column("status_before", sa.String(16), nullable=True),
        sa.Column("status_after", sa.String(16), nullable=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("invoice_total", sa.Numeric(20, 4), nullable=False),
        sa.Column("amount_paid", sa.Numeric(20, 4), nullable=False),
        sa.Column("balance", sa.Numeric(20, 4), nullable=False),
    )
    op.create_index("ix_invoice_history_invoice", "invoice_history", ["invoice_id", "id"])
    op.create_index("ix_invoice_history_number", "invoice_history", ["tenant_id", "invoice_number"])
    # Tombstones name the order too: a copy of order_shipped for a deleted invoice's order is caught.
    op.add_column("deleted_invoices", sa.Column("order_id", sa.String(200), nullable=True))
    op.add_column("deleted_invoices", sa.Column("shipment_id", sa.String(200), nullable=True))
    op.create_index("ix_deleted_invoices_order", "deleted_invoices", ["tenant_id", "order_id", "shipment_id"])
    # Housekeeping deletes the oldest rows in small batches; these find them without a scan.
    # Only the tasks whose inbox rows may go (worker/storage/records.py INBOX_KEPT_TASKS, as of this revision).
    op.create_index("ix_inbox_prunable", "inbox", ["processed_at"], postgresql_where=sa.text(
        "task NOT IN ('invoices.create', 'invoices.update', 'invoices.apply_discount', "
        "'invoices.remove_discount', 'invoices.bulk_import')"))
    op.create_index("ix_dead_letters_closed_last_seen", "dead_letters", ["last_seen"],
                    postgresql_where=sa.text("status <> 'open'"))
    op.create_index("ix_invoice_waits_first_seen", "invoice_waits", ["first_seen"])
    op.create_index("ix_delivery_counts_last_seen", "delivery_counts", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_delivery_counts_last_seen", table_name="delivery_counts")
    op.drop_index("ix_invoice_waits_first_seen", table_name="invoice_waits")
    op.drop_index("ix_dead_letters_closed_last_seen", table_name="dead_letters")
    op.drop_index("ix_inbox_prunable", table_name="inbox")
    op.drop_index("ix_deleted_invoices_order", table_name="deleted_invoices")
    op.drop_column("deleted_invoices", "shipment_id")
    op.drop_column("deleted_invoices", "order_id")
    op.drop_index("ix_invoice_history_number", table_name="invoice_history")
    op.drop_index("ix_invoice_history_invoice", table_name="invoice_history")
    op.drop_table("invoice_history")
