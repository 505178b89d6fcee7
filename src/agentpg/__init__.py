"""agentpg: every AI agent its own Postgres."""

__version__ = "0.1.0"
