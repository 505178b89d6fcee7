"""Public shapes: what the edges (REST, MCP, CLI) may show. No field here can hold a secret."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


class DatabaseInfo(Public):
    """A tenant database as its owner may see it: never a URI, password or role name."""

    name: str
    status: Literal["provisioning", "ready", "restoring", "deleting", "failed"]
    """``restoring`` while a restore of it runs (agents keep working on the current state meanwhile)."""
    ownership_type: Literal["platform", "user"]
    provider: str
    created_at: datetime
    current_period_cost_cents: int = 0


class UserInfo(Public):
    id: str
    email: str | None
    status: str
    created_at: datetime
    global_database: DatabaseInfo | None


class WorkspaceInfo(Public):
    id: str
    user_id: str
    name: str | None
    status: str
    created_at: datetime
    database: DatabaseInfo | None


class StatusInfo(Public):
    version: str
    postgres: Literal["embedded", "external"]
    postgres_running: bool
    postgres_version: str | None
    catalog: Literal["ok", "unreachable"]
    users: int
    workspaces: int
    pending_operations: int
    extensions: list[str] = []
    """Of the operator's list (AGENTPG_TENANT_EXTENSIONS), what every new tenant database gets."""
    extensions_missing: list[str] = []
    """Of that list, what the server lacks (skipped)."""
    backups_restorable_from: datetime | None = None
    """The start of the restorable window (every archived server restorable from then on); None: nothing is
    archived, or no base backup yet. ``GET /api/backups`` has the details per server."""


class Page(Public):
    """Keyset pagination: pass ``next_cursor`` back as ``cursor`` for the next page."""

    next_cursor: str | None


class UserPage(Page):
    items: list[UserInfo]


class WorkspacePage(Page):
    items: list[WorkspaceInfo]


class DatabaseUsage(Public):
    """One database's cost this period."""

    database: Literal["global", "agent"]
    workspace_id: str | None
    name: str
    cost_cents: int
    """Storage, compute, writes and transfer; its share of the backups is ``backup_cost_cents``, apart."""
    storage_bytes: int | None
    last_sync: datetime | None
    backup_bytes: int | None = None
    """Its share of its server's backups (base backups + WAL) at the last sync: the server's backup bytes
    split across the server's tenant databases in proportion to their size (docs/undo.md)."""
    backup_cost_cents: int = 0


class BackupUsage(Public):
    """Backup storage, its own line of the report: the user's databases' shares of their servers' backups."""

    bytes: int = 0
    cost_cents: int = 0


class UsageReport(Public):
    """A user's spend this period: the global database, each agent database, and their total."""

    user_id: str
    period_start: datetime
    budget_cents: int | None
    total_cost_cents: int
    percent_of_budget: float | None
    status: Literal["ok", "warning", "exceeded"]
    read_only: bool
    """True while writes are refused: from the moment the budget is exceeded or the user is over its storage
    limit (before the grants on every database follow), until the grants are given back after the block is
    lifted. ``read_only_reason`` says why whenever this is true."""
    read_only_reason: str | None = None
    """Why writes are refused (both reasons when both apply), as MCP ``execute`` says it; null when writable."""
    storage_limit_exceeded: bool = False
    """Over ``AGENTPG_USER_STORAGE_LIMIT_MB`` at the last storage check (seconds ago, not at the last sync)."""
    global_database: DatabaseUsage | None
    agent_databases: list[DatabaseUsage]
    backups: BackupUsage = Field(default_factory=BackupUsage)
    """The sum of the databases' ``backup_bytes`` and ``backup_cost_cents``. ``total_cost_cents`` is the
    databases' ``cost_cents`` plus this line's."""


# -- request shapes shared by the edges (REST bodies, console forms) ------------------------------------

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
"""User and workspace ids (mirrors ``lifecycle.deps.validate_id``; a test keeps them equal)."""
ENV_NAME_PATTERN = r"^[A-Z_][A-Z0-9_]{0,127}$"
MAX_OFFSET = 1_000_000_000


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
Name = Annotated[Text, Field(min_length=1, max_length=255)]
"""A table or column name as the caller spells it; matched exactly (case-sensitive) against the catalog."""


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UserCreate(Body):
    id: Annotated[Text, Field(min_length=1, max_length=128, description="The platform's id for the user.")]
    email: Annotated[Text, Field(max_length=320)] | None = None


class WorkspaceCreate(Body):
    id: Annotated[Text, Field(min_length=1, max_length=128, description="The platform's id for the workspace.")]
    name: Annotated[Text, Field(max_length=200)] | None = None


class TokenCreate(Body):
    name: Annotated[Text, Field(max_length=200, description="A label for the token, e.g. where it is used.")] \
        | None = None
