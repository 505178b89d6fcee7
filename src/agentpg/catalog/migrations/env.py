"""Alembic environment: runs on the connection agentpg hands over (see agentpg.catalog.engine.migrate)."""

from __future__ import annotations

from alembic import context

from agentpg.catalog.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
