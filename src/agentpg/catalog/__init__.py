"""agentpg's own metadata: SQLAlchemy models, Alembic migrations, and the engine that reaches them."""
