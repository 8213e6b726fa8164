"""Payment ids of publishers are unique per invoice: a surrogate key of the worker's own, and the public paymentId beside it

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing payments keep their id as both key and public id: refunds and retry_of still point at
    # the same rows, and every paymentId published so far stays what it was.
    op.add_column("payments", sa.Column("payment_id", sa.Uuid(), nullable=True))
    op.execute("UPDATE payments SET payment_id = id")
    op.alter_column("payments", "payment_id", nullable=False)
    op.create_unique_constraint("uq_payments_invoice_id_payment_id", "payments", ["invoice_id", "payment_id"])


def downgrade() -> None:
    # Only possible while public ids are unique across invoices: the public id becomes the key
    # again, and refunds and retries follow it.
    op.drop_constraint("uq_payments_invoice_id_payment_id", "payments", type_="unique")
    op.drop_constraint(op.f("fk_refunds_payment_id_payments"), "refunds", type_="foreignkey")
    op.execute("UPDATE refunds SET payment_id = p.payment_id FROM payments p WHERE refunds.payment_id = p.id")
    op.execute("UPDATE payments AS retry SET retry_of = failed.payment_id FROM payments failed "
               "WHERE retry.retry_of = failed.id")
    op.execute("UPDATE payments SET id = payment_id")
    op.create_foreign_key(op.f("fk_refunds_payment_id_payments"), "refunds", "payments", ["payment_id"], ["id"],
                          ondelete="CASCADE")
    op.drop_column("payments", "payment_id")
