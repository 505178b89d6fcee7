"""warm pool of ready-made tenant databases

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "warm_databases",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("provider_server", sa.String(length=64), nullable=True),
        sa.Column("database_name", sa.String(length=63), nullable=False),
        sa.Column("owner_role", sa.String(length=63), nullable=False),
        sa.Column("login_role", sa.String(length=63), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("database_name"),
    )
    op.create_index(op.f("ix_warm_databases_state"), "warm_databases", ["state"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_warm_databases_state"), table_name="warm_databases")
    op.drop_table("warm_databases")
