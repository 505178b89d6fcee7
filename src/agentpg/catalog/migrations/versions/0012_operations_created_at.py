"""Warm pool for bursts (issue 22): operations by time (the pool sizes itself from the busiest recent
burst), and each warm database's sealed login password (a claim is one catalog commit)

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_operations_created_at", "operations", ["created_at"])
    op.add_column("warm_databases", sa.Column("password_sealed", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("warm_databases", "password_sealed")
    op.drop_index("ix_operations_created_at", table_name="operations")
