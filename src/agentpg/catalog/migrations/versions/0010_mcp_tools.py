"""A per-workspace choice of the MCP tools its agent is offered (issue 20); null means every tool

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("workspaces", sa.Column("mcp_tools", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("workspaces", "mcp_tools")
