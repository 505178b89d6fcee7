"""Undo: checkpoints, restored copies, and when each audited call began

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("workspace_id", sa.String(length=128), nullable=True),
        sa.Column("database", sa.String(length=8), nullable=False),
        sa.Column("database_name", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("lsn", sa.String(length=32), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_checkpoints_user_id_created_at", "checkpoints", ["user_id", "created_at"])
    op.create_table(
        "restored_copies",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("workspace_id", sa.String(length=128), nullable=True),
        sa.Column("database", sa.String(length=8), nullable=False),
        sa.Column("source_database_name", sa.String(length=63), nullable=False),
        sa.Column("database_name", sa.String(length=63), nullable=False),
        sa.Column("provider_server", sa.String(length=64), nullable=True),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("database_name"),
    )
    op.create_index("ix_restored_copies_user_id", "restored_copies", ["user_id"])
    op.add_column("audit_log", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_log", "started_at")
    op.drop_index("ix_restored_copies_user_id", table_name="restored_copies")
    op.drop_table("restored_copies")
    op.drop_index("ix_checkpoints_user_id_created_at", table_name="checkpoints")
    op.drop_table("checkpoints")
