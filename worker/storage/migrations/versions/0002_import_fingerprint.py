"""invoices.import_fingerprint: what the last bulk-import entry said, so that a re-sent entry is unchanged

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("invoices", sa.Column("import_fingerprint", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("invoices", "import_fingerprint")
