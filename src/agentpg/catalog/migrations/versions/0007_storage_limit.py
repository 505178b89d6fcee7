"""Per-user storage limit (issue 18): each user's storage as of the last check, and whether it is over

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("user_budgets", sa.Column("storage_bytes", sa.BigInteger(), nullable=False,
                                            server_default="0"))
    op.add_column("user_budgets", sa.Column("storage_limit_mb", sa.Integer(), nullable=True))
    op.add_column("user_budgets", sa.Column("storage_exceeded", sa.Boolean(), nullable=False,
                                            server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("user_budgets", "storage_exceeded")
    op.drop_column("user_budgets", "storage_limit_mb")
    op.drop_column("user_budgets", "storage_bytes")
