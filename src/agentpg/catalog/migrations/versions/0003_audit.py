"""audit log of agent tool calls

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("workspace_id", sa.String(length=128), nullable=False),
        sa.Column("database", sa.String(length=8), nullable=True),
        sa.Column("tool", sa.String(length=32), nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=True),
        sa.Column("statement", sa.Text(), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_user_id_id", "audit_log", ["user_id", "id"], unique=False)
    op.create_index("ix_audit_log_workspace_id_id", "audit_log", ["workspace_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_log_workspace_id_id", table_name="audit_log")
    op.drop_index("ix_audit_log_user_id_id", table_name="audit_log")
    op.drop_table("audit_log")
