"""What the explorer's pages read, fetched through the REST API's own route functions.

The explorer is a second skin over the same routes, not a second implementation: each read here calls the
function behind the matching REST route (``routes_users.get_user``, ``routes_data.global_tables``,
``routes_agents.list_audit``…) with the principal the session cookie authenticated, so the tenant rules are
the API's, line for line (another user's user, workspace or table is "not found"). The reads that have no
REST route go through the same scoping first (:func:`platform_uri`): a live database size when the usage
sync has not measured one yet, the foreign-key/unique constraints of the tables panel, and the table
browser's filtered pages and counts (:mod:`agentpg.web.rows_view`). All run in a READ ONLY transaction with
a statement timeout (:func:`agentpg.access.browse.read_only`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.concurrency import run_in_threadpool

from agentpg.access import browse
from agentpg.access.audit import AuditPage
from agentpg.access.permissions import GlobalDbPermissions
from agentpg.api import routes_agents, routes_data, routes_usage, routes_users
from agentpg.api.context import AppContext
from agentpg.errors import AgentpgError, NotFound
from agentpg.schemas import DatabaseInfo, UsageReport, UserInfo, WorkspaceInfo, WorkspacePage
from agentpg.tokens import Principal

SIZE_READS_AT_ONCE = 8
_SIZE_LIMITS = browse.ReadLimits(statement_timeout_ms=2000)

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


def get_user(ctx: AppContext, principal: Principal, user_id: str) -> UserInfo:
    return routes_users.get_user(user_id, principal, ctx)


def get_workspace(ctx: AppContext, principal: Principal, user_id: str, workspace_id: str) -> WorkspaceInfo:
    """The workspace, if it is this user's and the caller may see it (else "not found", as the API says)."""
    return routes_users.get_user_workspace(user_id, workspace_id, principal, ctx)  # ids are per user


def platform_uri(ctx: AppContext, principal: Principal, user_id: str, workspace_id: str | None) -> str:
    """Scope first (as ``routes_data``), then the database's URI: a secret that stays in this process."""
    if workspace_id is None:
        get_user(ctx, principal, user_id)
        return ctx.service.platform_uri(user_id)
    get_workspace(ctx, principal, user_id, workspace_id)
    return ctx.service.browse_uri(user_id, None, workspace_id)


# -- databases panel --------------------------------------------------------------------------------------


async def _live_size(ctx: AppContext, uri: str, gate: asyncio.Semaphore) -> int | None:
    async with gate:
        try:
            async with ctx.pools.connection(uri) as conn, browse.read_only(conn, _SIZE_LIMITS):
                cur = await conn.execute("SELECT pg_catalog.pg_database_size(pg_catalog.current_database())")
                row = cast("tuple[Any, ...] | None", await cur.fetchone())
                return int(row[0]) if row else None
        except Exception:  # a size is a nicety: the panel shows "not measured yet"
            return None


async def overview(ctx: AppContext, principal: Principal, user_id: str, cursor: str | None) -> Overview:
    user = await run_in_threadpool(get_user, ctx, principal, user_id)
    usage = await run_in_threadpool(routes_usage.usage, user_id, principal, ctx)
    page = await run_in_threadpool(routes_users.list_workspaces, user_id, principal, ctx, 100, cursor)
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
        try:
            uri = await run_in_threadpool(ctx.service.platform_uri, user_id, ws.id if ws else None)
        except AgentpgError:
            return None, ""
        live = await _live_size(ctx, uri, gate)
        return live, "live" if live is not None else ""

    sizes = await asyncio.gather(*(size(ws, info, synced) for ws, info, synced, _ in entries))
    rows = [DatabaseRow(workspace=ws, info=info, size_bytes=s, size_measured=how, cost_cents=cost)
            for (ws, info, _, cost), (s, how) in zip(entries, sizes, strict=True)]
    return Overview(user=user, usage=usage, workspaces=page, databases=rows)


# -- tables ----------------------------------------------------------------------------------------------


async def tables(ctx: AppContext, principal: Principal, user_id: str,
                 workspace_id: str | None) -> tuple[browse.TableList, dict[str, list[Constraint]]]:
    if workspace_id is None:
        listed = await routes_data.global_tables(user_id, principal, ctx)
    else:
        listed = await routes_data.user_agent_tables(user_id, workspace_id, principal, ctx)
    constraints: dict[str, list[Constraint]] = {}
    if listed.tables:
        uri = await run_in_threadpool(platform_uri, ctx, principal, user_id, workspace_id)
        async with ctx.pools.connection(uri) as conn, browse.read_only(conn, ctx.read_limits):
            with browse.translated():
                cur = await conn.execute(_CONSTRAINTS)
                found = cast("list[tuple[str, str, str, str]]", await cur.fetchall())
                for table, name, kind, definition in found:
                    constraints.setdefault(table, []).append(
                        Constraint(name=name, kind="foreign key" if kind == "f" else "unique", definition=definition))
    return listed, constraints


# -- agents, audit ---------------------------------------------------------------------------------------


def agent_permissions(ctx: AppContext, principal: Principal, user_id: str,
                      page: WorkspacePage) -> list[tuple[WorkspaceInfo, GlobalDbPermissions | None, str | None]]:
    """Each agent with its permissions on the global database (or why they cannot be shown)."""
    out: list[tuple[WorkspaceInfo, GlobalDbPermissions | None, str | None]] = []
    for ws in page.items:
        try:
            perms = routes_agents.get_user_workspace_permissions(user_id, ws.id, principal, ctx)
            out.append((ws, perms, None))
        except NotFound:
            out.append((ws, None, f"this agent is {ws.status}; its permissions can be set once it is active"))
    return out


def set_permissions(ctx: AppContext, principal: Principal, user_id: str, workspace_id: str,
                    permissions: GlobalDbPermissions) -> GlobalDbPermissions:
    return routes_agents.put_user_workspace_permissions(user_id, workspace_id, permissions, principal, ctx)


def audit(ctx: AppContext, principal: Principal, user_id: str, workspace_id: str | None,
          cursor: str | None, limit: int) -> AuditPage:
    return routes_agents.list_audit(user_id, principal, ctx, workspace_id=workspace_id, limit=limit, cursor=cursor)


def workspaces(ctx: AppContext, principal: Principal, user_id: str, cursor: str | None = None,
               limit: int = 100) -> WorkspacePage:
    return routes_users.list_workspaces(user_id, principal, ctx, limit, cursor)


def usage(ctx: AppContext, principal: Principal, user_id: str) -> UsageReport:
    return routes_usage.usage(user_id, principal, ctx)
