"""Per-agent permissions on the user's global database: their shape, their rules, and the pre-check.

The boundary is Postgres: each workspace has its own LOGIN role in the global database whose grants are
exactly these permissions (``agentpg_internal.set_agent_grants``, see :mod:`agentpg.providers.tenant_sql`).
:func:`precheck` only turns what the grants would refuse into a clear message before the server is asked.

What each flag means in Postgres terms:

* ``can_read`` — SELECT on every table, view and sequence of schema ``public`` (or only ``allowed_tables``);
* ``can_write`` — INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES (and sequence USAGE for defaults);
* ``can_create_tables`` — CREATE on schema ``public``: tables, views, sequences, functions, types. What an
  agent creates is handed at once to the database's NOLOGIN owner role and granted to every agent whose
  permissions cover it, including the creator;
* ``can_drop_tables`` — membership in that owner role. Postgres lets only an owner drop or alter a table
  (ALTER TABLE, CREATE INDEX, COMMENT, GRANT …), and an owner may also read, write and create everywhere,
  so this flag requires the other three and cannot be combined with ``allowed_tables``: agentpg refuses
  such a combination (422) rather than pretend it holds;
* ``allowed_tables`` — null means every table; a list limits read and write grants to relations of those
  names in ``public``. A table of another name that the agent creates is usable by other agents but not
  by itself, so the pre-check refuses to create one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agentpg.access.classify import Classification, StatementKind
from agentpg.catalog.models import AgentGlobalDbPermissions
from agentpg.errors import AgentpgError

Tool = Literal["query", "execute"]

MAX_ALLOWED_TABLES = 1000
_OWNER_CREATES = frozenset({"CREATE INDEX", "CREATE TRIGGER", "CREATE POLICY", "CREATE RULE", "CREATE STATISTICS"})


class GlobalDbPermissions(BaseModel):
    """What one agent (workspace) may do in its user's global database. Defaults: read, write, create."""

    model_config = ConfigDict(extra="forbid")

    can_read: bool = True
    can_write: bool = True
    can_create_tables: bool = True
    can_drop_tables: bool = False
    allowed_tables: list[str] | None = Field(
        default=None, max_length=MAX_ALLOWED_TABLES,
        description="Table names in schema public this agent may use; null means all tables.")

    @model_validator(mode="after")
    def _consistent(self) -> GlobalDbPermissions:
        if self.allowed_tables is not None:
            names: list[str] = []
            for name in self.allowed_tables:
                if not name or len(name.encode()) > 63 or "\x00" in name:
                    raise ValueError("each allowed table must be a table name of 1 to 63 bytes")
                if name not in names:
                    names.append(name)
            self.allowed_tables = names
        if self.can_drop_tables and self.allowed_tables is not None:
            raise ValueError("can_drop_tables cannot be combined with allowed_tables: dropping a table in "
                             "Postgres means co-owning every table, which no table list could limit")
        if self.can_drop_tables and not (self.can_read and self.can_write and self.can_create_tables):
            raise ValueError("can_drop_tables requires can_read, can_write and can_create_tables: dropping a "
                             "table in Postgres means co-owning it, which includes all of those rights")
        return self


class GlobalDbPermissionsSet(GlobalDbPermissions):
    """The answer to setting permissions: the permissions as stored, and what the caller should know.

    ``allowed_tables`` matches by name, so a name no table has yet is accepted (an agent may create it
    later, and the grant then applies at once) but never silently: ``missing_tables`` lists such names and
    ``warning`` says what that means."""

    missing_tables: list[str] = Field(
        default_factory=list,
        description="Names in allowed_tables that no table, view or sequence of schema public has yet.")
    warning: str | None = Field(default=None, description="Set when missing_tables is not empty.")


def from_row(row: AgentGlobalDbPermissions | None) -> GlobalDbPermissions:
    """The catalog row as the public shape (the defaults when a workspace has no row)."""
    if row is None:
        return GlobalDbPermissions()
    return GlobalDbPermissions.model_construct(
        can_read=row.can_read, can_write=row.can_write, can_create_tables=row.can_create_tables,
        can_drop_tables=row.can_drop_tables,
        allowed_tables=list(row.allowed_tables) if row.allowed_tables is not None else None)


@dataclass(frozen=True)
class AgentTarget:
    """Where one agent call runs. ``uri`` is a secret (hidden from ``repr``); ``permissions`` None means
    unrestricted (the agent database, or a global database the platform brought)."""

    uri: str = field(repr=False)
    user_id: str
    workspace_id: str
    database: str
    permissions: GlobalDbPermissions | None


class PermissionRefused(AgentpgError):
    """The agent's permissions on the global database do not allow the statement (refused before running)."""

    status = 403
    code = "not_permitted"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_HOW = ("The user can change this agent's permissions (PUT /api/workspaces/{id}/global-database-permissions); "
        'your own "agent" database has no such limits.')


def _public(name: str) -> str | None:
    """The relation name a grant in schema public would cover, or None for other schemas / system names."""
    parts = name.split(".")
    if len(parts) > 1:
        return parts[-1] if parts[-2] == "public" else None
    return None if name.startswith("pg_") else name


def _publics(names: Iterable[str]) -> list[str]:
    return sorted({p for p in map(_public, names) if p is not None})


def _refuse(reason: str, message: str) -> PermissionRefused:
    return PermissionRefused(f"{message}. {_HOW}", reason=reason)


def _check_allowed(names: list[str], perms: GlobalDbPermissions, verb: str) -> None:
    if perms.allowed_tables is None:
        return
    outside = [n for n in names if n not in perms.allowed_tables]
    if outside:
        allowed = ", ".join(perms.allowed_tables) or "none"
        raise _refuse("table_not_allowed", f"This agent may not {verb} {', '.join(outside)} in the global "
                      f"database; its allowed tables are: {allowed}")


#: Maintenance commands PostgreSQL allows in a READ ONLY transaction that still rewrite a table, lock it, or
#: change its statistics: not for the reading tool (an ``mcp:read`` client, a reviewer agent).
_MAINTENANCE = frozenset({"VACUUM", "ANALYZE", "CLUSTER", "REINDEX"})


def check_tool(c: Classification, tool: Tool) -> None:
    """``query`` only reads: a write, DDL or maintenance statement gets a clear refusal pointing to
    ``execute``."""
    if tool == "query" and c.kind in (StatementKind.WRITE, StatementKind.DDL):
        raise PermissionRefused(f"The query tool only reads, and {c.command} changes data or schema "
                                "(even inside a CTE or a SELECT ... FOR UPDATE). Use the execute tool for it.",
                                reason="write_in_query")
    if tool == "query" and c.command.split(" ", 1)[0] in _MAINTENANCE:
        raise PermissionRefused(f"The query tool only reads, and {c.command} rewrites, locks or re-analyzes "
                                "tables. Use the execute tool for it.", reason="write_in_query")


def precheck(c: Classification, perms: GlobalDbPermissions) -> None:
    """Refuse, with the rule broken, a global-database statement these permissions would not let through.

    Mirrors the grants; where the server alone can tell (functions' bodies, system catalogs), it lets the
    statement through and Postgres decides.
    """
    read, written = _publics(c.tables_read), _publics(c.tables_written)
    if read and not perms.can_read:
        raise _refuse("no_read", "This agent may not read tables of the global database (can_read is false)")
    _check_allowed(read, perms, "read")
    creates = c.creates_table or (c.command.startswith("CREATE ") and c.command not in _OWNER_CREATES)
    if creates:
        if not perms.can_create_tables:
            raise _refuse("no_create", "This agent may not create tables or other objects in the global "
                          "database (can_create_tables is false)")
        if perms.allowed_tables is not None:
            _check_allowed(written, perms, "create (it could not use what it creates)")
    elif c.kind is StatementKind.WRITE:
        if not perms.can_write:
            raise _refuse("no_write", "This agent may not write to the global database (can_write is false)")
        _check_allowed(written, perms, "write to")
    elif c.kind is StatementKind.DDL and not perms.can_drop_tables:
        what = "drop tables" if c.drops_table else f"run {c.command} (only a table's owner may change it)"
        raise _refuse("no_drop", f"This agent may not {what} in the global database (can_drop_tables is false)")
