"""usage counters per database record, budgets per user

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_RECORDS = ("user_global_database", "workspace_agent_database")


def upgrade() -> None:
    for table in _RECORDS:
        op.add_column(table, sa.Column("period_cost_microcents", sa.BigInteger(), server_default="0", nullable=False))
        op.add_column(table, sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column("usage_snapshot", sa.JSON(), nullable=True))
    op.create_table(
        "user_budgets",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("budget_cents", sa.BigInteger(), nullable=True),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total_cost_cents", sa.BigInteger(), nullable=False),
        sa.Column("exceeded", sa.Boolean(), nullable=False),
        sa.Column("enforced", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id"),
    )


def downgrade() -> None:
    op.drop_table("user_budgets")
    for table in _RECORDS:
        op.drop_column(table, "usage_snapshot")
        op.drop_column(table, "period_start")
        op.drop_column(table, "period_cost_microcents")
