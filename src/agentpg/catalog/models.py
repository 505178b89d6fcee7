"""The catalog's tables.

Database records follow the original design's ``user_global_database`` (one per user, UNIQUE(user_id)) and
give each workspace an ``workspace_agent_database`` of the same shape. Connection URIs and env var values
are stored sealed (see :mod:`agentpg.crypto`); nothing here holds a secret in clear.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), default=utcnow
    )
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), onupdate=utcnow)


class User(Timestamps, Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    email: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="provisioning")
    """provisioning | active | deleting"""


class Workspace(Timestamps, Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="provisioning")
    agent_role: Mapped[str | None] = mapped_column(String(63))
    """This workspace's LOGIN role in its user's global database (opaque name)."""
    global_uri_sealed: Mapped[str | None] = mapped_column(Text)
    """Sealed URI of ``agent_role`` into the global database."""
    mcp_tools: Mapped[list[str] | None] = mapped_column(JSON)
    """The MCP tools its agent is offered; null: all of them (:mod:`agentpg.service.tool_choice`)."""


class DatabaseRecord(Timestamps):
    """Columns shared by the global and the agent database records (the design's shape)."""

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    ownership_type: Mapped[str] = mapped_column(String(16), nullable=False, default="platform")
    """platform (we made it, we drop it) | user (brought by the platform, never dropped by us)"""
    provider: Mapped[str] = mapped_column(String(16), nullable=False, default="local")
    provider_server: Mapped[str | None] = mapped_column(String(64))
    provider_project_id: Mapped[str | None] = mapped_column(String(128))
    provider_branch_id: Mapped[str | None] = mapped_column(String(128))
    connection_uri_sealed: Mapped[str | None] = mapped_column(Text)
    database_name: Mapped[str] = mapped_column(String(63), nullable=False)
    owner_role: Mapped[str | None] = mapped_column(String(63))
    login_role: Mapped[str | None] = mapped_column(String(63))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="provisioning")
    """provisioning | ready | restoring | deleting | failed"""
    current_period_cost_cents: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    last_consumption_sync: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    period_cost_microcents: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    """The exact running cost this period; ``current_period_cost_cents`` is its rounded value."""
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    usage_snapshot: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The provider's counters at ``last_consumption_sync``; the next sync prices the difference."""
    backup_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """This database's share of its server's backup directory at the last sync (:mod:`agentpg.usage.backups`)."""
    period_backup_microcents: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    """The part of ``period_cost_microcents`` that is backup storage."""


class UserGlobalDatabase(DatabaseRecord, Base):
    __tablename__ = "user_global_database"
    __table_args__ = (UniqueConstraint("user_id"),)

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)


class WorkspaceAgentDatabase(DatabaseRecord, Base):
    __tablename__ = "workspace_agent_database"
    __table_args__ = (UniqueConstraint("workspace_id"),)

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)


class EnvVar(Timestamps, Base):
    """A sealed environment variable of a user, or of one workspace when ``workspace_id`` is set."""

    __tablename__ = "env_vars"
    __table_args__ = (
        Index("uq_env_vars_scope_name", "user_id", text("coalesce(workspace_id, '')"), "name", unique=True),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    workspace_id: Mapped[str | None] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    value_sealed: Mapped[str] = mapped_column(Text, nullable=False)
    managed: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    """Managed by agentpg (GLOBAL_DB_URL, AGENT_DB_URL): never readable or writable through the API."""


class AgentGlobalDbPermissions(Base):
    """The design's per-agent permissions on its user's global database."""

    __tablename__ = "agent_global_db_permissions"
    __table_args__ = (UniqueConstraint("workspace_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    can_read: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    can_write: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    can_create_tables: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    can_drop_tables: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    allowed_tables: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), onupdate=utcnow)


class Operation(Base):
    """The intent log: written before a provider is touched, finished or undone by ``reconcile``."""

    __tablename__ = "operations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    """register_user | delete_user | create_workspace | delete_workspace"""
    user_id: Mapped[str] = mapped_column(String(128), nullable=False)
    workspace_id: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="pending", index=True)
    """pending | done | undone"""
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    """Names of what the operation creates or drops (databases, roles); never a secret."""
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow,
                                                 index=True)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), onupdate=utcnow)


class Token(Base):
    """An API credential, stored as a SHA-256 hash of a high-entropy random secret."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)
    """admin | user | agent"""
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    workspace_id: Mapped[str | None] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WarmDatabase(Base):
    """A ready-made tenant database (with its owner and login roles) waiting to be claimed.

    Registration and workspace creation take one in their intent transaction (``FOR UPDATE SKIP LOCKED``),
    so only a fresh password has to be set before the user has a database. ``creating`` rows are the intent
    of a refill in progress; ``reconcile`` drops those whose refiller died.
    """

    __tablename__ = "warm_databases"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    provider: Mapped[str] = mapped_column(String(16), nullable=False)
    provider_server: Mapped[str | None] = mapped_column(String(64))
    database_name: Mapped[str] = mapped_column(String(63), nullable=False, unique=True)
    owner_role: Mapped[str] = mapped_column(String(63), nullable=False)
    login_role: Mapped[str] = mapped_column(String(63), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="creating", index=True)
    """creating | ready | dropping (trimmed: being dropped)"""
    password_sealed: Mapped[str | None] = mapped_column(Text)
    """The login role's password, set when the database was made (sealed, bound to this row): a claim
    re-seals it into the user's record instead of changing it on the server, so registration from the
    pool is one catalog commit. Null for databases made before this column (the claim sets a new one)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class AuditEntry(Base):
    """One agent tool call (MCP): who, where, what kind of statement, and how it went.

    Never holds a literal value: ``statement`` is normalised (constants replaced by ``$n``), ``error`` is a
    reason code or SQLSTATE name, not a server message. Kept after its workspace is deleted (no foreign key
    on ``workspace_id``); deleted with its user.
    """

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_user_id_id", "user_id", "id"),
        Index("ix_audit_log_workspace_id_id", "workspace_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    workspace_id: Mapped[str] = mapped_column(String(128), nullable=False)
    database: Mapped[str | None] = mapped_column(String(8))
    """global | agent; null for calls that touch no database (list_databases)"""
    tool: Mapped[str] = mapped_column(String(32), nullable=False)
    fingerprint: Mapped[str | None] = mapped_column(String(32))
    statement: Mapped[str | None] = mapped_column(Text)
    rows: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    """ok | refused (pre-check) | denied (Postgres: no privilege) | timeout | error"""
    error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the call began, before its statement reached the server: a restore "to before this statement"
    stops there (issue 19). Null for entries written before it was recorded."""


class UserBudget(Base):
    """The design's ``user_db_budget``: one per user, covering its global and every agent database."""

    __tablename__ = "user_budgets"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    budget_cents: Mapped[int | None] = mapped_column(BigInteger)
    """None: no budget (never enforced)."""
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    total_cost_cents: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    exceeded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    enforced: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    """Whether the databases are read-only right now: wanted while ``exceeded`` or ``storage_exceeded``, and
    lagging them only until the job that changed them has changed the grants."""
    storage_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    """The user's storage (all its databases) at the last storage check that recorded it: kept current only
    while it is near or over the limit (usage/storage.py), so the check writes nothing for the others."""
    storage_limit_mb: Mapped[int | None] = mapped_column(Integer)
    """The limit ``storage_exceeded`` was decided against (for the message)."""
    storage_exceeded: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default="false")
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), onupdate=utcnow)


class McpServerConfig(Base):
    """A user's MCP server config for the gateway (issue 5): ``{command, args, env}``, sealed whole.

    Args and env values may hold literal secrets the user typed, so the JSON is sealed (associated data
    ``mcp_servers/<id>/config``); only the name is in clear. ``${NAME}`` placeholders are kept as written.
    """

    __tablename__ = "mcp_servers"
    __table_args__ = (UniqueConstraint("user_id", "name", name="uq_mcp_servers_user_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    config_sealed: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Checkpoint(Base):
    """A named point in time of one tenant database (issue 19): a restore point in its server's WAL, no copy.

    ``database`` is ``global`` (the user's) or ``agent`` (``workspace_id``'s); ``run_id`` groups the two
    checkpoints of one agent run (its user's global database and its own agent database, taken together).
    """

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_user_id_created_at", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    workspace_id: Mapped[str | None] = mapped_column(String(128))
    database: Mapped[str] = mapped_column(String(8), nullable=False)
    database_name: Mapped[str] = mapped_column(String(63), nullable=False)
    """The tenant database it was taken of (a checkpoint outlives a restore of it, not its database)."""
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    lsn: Mapped[str] = mapped_column(String(32), nullable=False)
    created_by: Mapped[str] = mapped_column(String(160), nullable=False)
    """who: ``admin``, ``user``, ``agent <workspace>``, or ``agentpg`` (the checkpoint before a restore)"""
    run_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    """The database server's time when the restore point was written."""


class RestoredCopy(Base):
    """A database restored "as a new database" (issue 19), for the user to inspect, then keep or drop.

    It lives on the same server as its source, owned by the source's owner role; only the platform's reads
    reach it (its source's login role may connect), never an agent.
    """

    __tablename__ = "restored_copies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    workspace_id: Mapped[str | None] = mapped_column(String(128))
    database: Mapped[str] = mapped_column(String(8), nullable=False)
    source_database_name: Mapped[str] = mapped_column(String(63), nullable=False)
    database_name: Mapped[str] = mapped_column(String(63), nullable=False, unique=True)
    provider_server: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    """What it was restored to: ``{"checkpoint_id"|"at"|"before_audit_id": …, "lsn"|"time": …}``."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class UsageDay(Base):
    """One user's usage as the day's last usage sync left it (UTC days): the budget period's cost so far and
    the storage of all its databases. Every sync upserts today's row, so history grows by one row per user
    and day whatever the sync interval; the explorer charts it. Deleted with its user."""

    __tablename__ = "usage_daily"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    cost_cents: Mapped[int] = mapped_column(BigInteger, nullable=False)
    """The period's cost so far (cumulative within the period; a new period starts again from zero)."""
    storage_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
