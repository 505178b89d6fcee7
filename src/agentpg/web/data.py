"""What the explorer's pages read, through the same scoped service calls as the REST API.

The explorer is a second skin over the same service, not a second implementation: each read here goes
through :meth:`agentpg.service.Service.caller` with the principal the session cookie authenticated, the
object the REST routes call too, so the tenant rules are the API's, line for line (another user's user,
workspace or table is "not found"). The reads that have no REST route go through the same scoping first
(:func:`database_ref`): a live database size when the usage
sync has not measured one yet, the foreign-key/unique constraints of the tables panel, and the table
browser's filtered pages and counts (:mod:`agentpg.web.rows_view`). All run in a READ ONLY transaction with
a statement timeout (:func:`agentpg.access.browse.read_only`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

from starlette.concurrency import run_in_threadpool

from agentpg.errors import NotFound
from agentpg.service import (
    AuditPage,
    DatabaseInfo,
    DatabaseRef,
    GlobalDbPermissions,
    Principal,
    ReadLimits,
    TableList,
    UsageReport,
    UserInfo,
    WorkspaceInfo,
    WorkspacePage,
)
from agentpg.web.context import WebContext

SIZE_READS_AT_ONCE = 8
_SIZE_LIMITS = ReadLimits(statement_timeout_ms=2000)

_CONSTRAINTS = """
SELECT c.relname, con.conname, con.contype, pg_catalog.pg_get_constraintdef(con.oid)
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND con.contype IN ('f', 'u')
ORDER BY c.relname, con.contype, con.conname
"""


@dataclass(frozen=True)
class DatabaseRow:
    """One line of the databases panel."""

    workspace: WorkspaceInfo | None
    """None for the global database."""
    info: DatabaseInfo | None
    size_bytes: int | None
    size_measured: str
    """"usage sync" or "live" (or "" when unknown)."""
    cost_cents: int


@dataclass
class Overview:
    user: UserInfo
    usage: UsageReport
    workspaces: WorkspacePage
    databases: list[DatabaseRow] = field(default_factory=list)


@dataclass(frozen=True)
class Constraint:
    name: str
    kind: str
    definition: str


# -- scoping ----------------------------------------------------------------------------------------------


def get_user(ctx: WebContext, principal: Principal, user_id: str) -> UserInfo:
    return ctx.service.caller(principal).get_user(user_id)


def get_workspace(ctx: WebContext, principal: Principal, user_id: str, workspace_id: str) -> WorkspaceInfo:
    """The workspace, if it is this user's and the caller may see it (else "not found", as the API says)."""
    return ctx.service.caller(principal).get_workspace(user_id, workspace_id)  # ids are per user


def database_ref(ctx: WebContext, principal: Principal, user_id: str, workspace_id: str | None) -> DatabaseRef:
    """Scope first (as ``routes_data``), then the database to read (its URI never leaves the service)."""
    if workspace_id is None:
        get_user(ctx, principal, user_id)
        return DatabaseRef.global_db(user_id)
    get_workspace(ctx, principal, user_id, workspace_id)
    return DatabaseRef.agent_db(workspace_id, user_id)


# -- databases panel --------------------------------------------------------------------------------------


async def _live_size(ctx: WebContext, ref: DatabaseRef, gate: asyncio.Semaphore) -> int | None:
    async with gate:
        try:
            rows = await ctx.service.reader.catalog_rows(
                ref, "SELECT pg_catalog.pg_database_size(pg_catalog.current_database())", _SIZE_LIMITS)
            return int(rows[0][0]) if rows else None
        except Exception:  # a size is a nicety: the panel shows "not measured yet"
            return None


async def overview(ctx: WebContext, principal: Principal, user_id: str, cursor: str | None) -> Overview:
    user = await run_in_threadpool(get_user, ctx, principal, user_id)
    caller = ctx.service.caller(principal)
    usage = await run_in_threadpool(caller.usage, user_id)
    page = await run_in_threadpool(lambda: caller.list_workspaces(user_id, limit=100, cursor=cursor))
    costs = {u.workspace_id: u for u in usage.agent_databases}
    entries: list[tuple[WorkspaceInfo | None, DatabaseInfo | None, int | None, int]] = []
    glob = usage.global_database
    entries.append((None, user.global_database, glob.storage_bytes if glob else None, glob.cost_cents if glob else 0))
    for ws in page.items:
        u = costs.get(ws.id)
        entries.append((ws, ws.database, u.storage_bytes if u else None, u.cost_cents if u else 0))
    gate = asyncio.Semaphore(SIZE_READS_AT_ONCE)

    async def size(ws: WorkspaceInfo | None, info: DatabaseInfo | None, synced: int | None) -> tuple[int | None, str]:
        if synced is not None:
            return synced, "usage sync"
        if info is None or info.status != "ready":
            return None, ""
        ref = DatabaseRef.agent_db(ws.id, user_id) if ws else DatabaseRef.global_db(user_id)
        live = await _live_size(ctx, ref, gate)
        return live, "live" if live is not None else ""

    sizes = await asyncio.gather(*(size(ws, info, synced) for ws, info, synced, _ in entries))
    rows = [DatabaseRow(workspace=ws, info=info, size_bytes=s, size_measured=how, cost_cents=cost)
            for (ws, info, _, cost), (s, how) in zip(entries, sizes, strict=True)]
    return Overview(user=user, usage=usage, workspaces=page, databases=rows)


# -- tables ----------------------------------------------------------------------------------------------


async def tables(ctx: WebContext, principal: Principal, user_id: str,
                 workspace_id: str | None) -> tuple[TableList, dict[str, list[Constraint]]]:
    ref = await run_in_threadpool(database_ref, ctx, principal, user_id, workspace_id)
    listed = await ctx.service.reader.tables(ref)
    constraints: dict[str, list[Constraint]] = {}
    if listed.tables:
        found = cast("list[tuple[str, str, str, str]]", await ctx.service.reader.catalog_rows(ref, _CONSTRAINTS))
        for table, name, kind, definition in found:
            constraints.setdefault(table, []).append(
                Constraint(name=name, kind="foreign key" if kind == "f" else "unique", definition=definition))
    return listed, constraints


# -- agents, audit ---------------------------------------------------------------------------------------


def agent_permissions(ctx: WebContext, principal: Principal, user_id: str,
                      page: WorkspacePage) -> list[tuple[WorkspaceInfo, GlobalDbPermissions | None, str | None]]:
    """Each agent with its permissions on the global database (or why they cannot be shown)."""
    out: list[tuple[WorkspaceInfo, GlobalDbPermissions | None, str | None]] = []
    for ws in page.items:
        try:
            perms = ctx.service.caller(principal).get_agent_permissions(user_id, ws.id)
            out.append((ws, perms, None))
        except NotFound:
            out.append((ws, None, f"this agent is {ws.status}; its permissions can be set once it is active"))
    return out


def set_permissions(ctx: WebContext, principal: Principal, user_id: str, workspace_id: str,
                    permissions: GlobalDbPermissions) -> GlobalDbPermissions:
    return ctx.service.caller(principal).set_agent_permissions(user_id, workspace_id, permissions)


def audit(ctx: WebContext, principal: Principal, user_id: str, workspace_id: str | None,
          cursor: str | None, limit: int) -> AuditPage:
    return ctx.service.caller(principal).list_audit(user_id, workspace_id=workspace_id, limit=limit, cursor=cursor)


def workspaces(ctx: WebContext, principal: Principal, user_id: str, cursor: str | None = None,
               limit: int = 100) -> WorkspacePage:
    return ctx.service.caller(principal).list_workspaces(user_id, limit=limit, cursor=cursor)


def usage(ctx: WebContext, principal: Principal, user_id: str) -> UsageReport:
    return ctx.service.caller(principal).usage(user_id)
