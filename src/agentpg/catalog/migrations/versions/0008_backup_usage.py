"""Backup storage in usage (issue 19): each database's share of its server's backups, and what it cost

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_RECORDS = ("user_global_database", "workspace_agent_database")


def upgrade() -> None:
    for table in _RECORDS:
        op.add_column(table, sa.Column("backup_bytes", sa.BigInteger(), nullable=True))
        op.add_column(table, sa.Column("period_backup_microcents", sa.BigInteger(), server_default="0",
                                       nullable=False))


def downgrade() -> None:
    for table in _RECORDS:
        op.drop_column(table, "period_backup_microcents")
        op.drop_column(table, "backup_bytes")
