"""Agent calls: what an agent (a workspace's token) may run, through MCP, on its two logical databases.

A part of :class:`agentpg.service.Service` (``service.agents``), kept apart because it is the hot path and
most of the code: each call is classified (pglast, once per statement text: :class:`Statements`), pre-checked
against the agent's permissions and budget, run by the access layer as the agent's own role through the
service's :class:`~agentpg.service.tenant.TenantAccess`, and audited (success or not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select

from agentpg.access import audit as audit_log
from agentpg.access import cache, explain, introspect
from agentpg.access.audit import AuditDraft, AuditPage, AuditRecord
from agentpg.access.classify import StatementKind, check_shared
from agentpg.access.permissions import (
    AgentTarget,
    GlobalDbPermissions,
    GlobalDbPermissionsSet,
    PermissionRefused,
    check_tool,
    from_row,
    precheck,
)
from agentpg.access.query import QueryLimits
from agentpg.access.results import StatementFailed, StatementResult
from agentpg.catalog.models import (
    AgentGlobalDbPermissions,
    User,
    UserGlobalDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from agentpg.lifecycle import users, workspace_ids, workspaces
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.lifecycle.undo import TargetSpec
from agentpg.providers.extensions import NEVER_ALLOWED
from agentpg.schemas import WorkspaceInfo
from agentpg.service.client_configs import client_configs
from agentpg.service.statements import Statements
from agentpg.service.tenant import TenantAccess
from agentpg.service.tool_choice import ToolChoice
from agentpg.service.undo import CheckpointInfo, RestoreResult, UndoService
from agentpg.settings import Settings
from agentpg.tokens import Principal

log = logging.getLogger(__name__)


class AgentCalls:
    """What an agent may run on its two logical databases, its permissions and its audit log.

    Built by :class:`~agentpg.service.Service`, which hands it what it needs from the rest of the service as
    plain callables (no back-reference to the façade): the workspace lookup, the platform URI, the write
    block reason, and the tenant access (opened by the assembly; :class:`~agentpg.service.tenant.NotStarted`
    until then).
    """

    def __init__(self, deps: LifecycleDeps, *, audit_writer: audit_log.AuditWriter, undo: UndoService,
                 tool_choice: ToolChoice, statements: Statements, tenant: Callable[[], TenantAccess],
                 get_workspace: Callable[..., WorkspaceInfo], platform_uri: Callable[..., str],
                 write_block_reason: Callable[[str], str | None]) -> None:
        self.deps = deps
        self.audit_writer = audit_writer
        self.undo = undo
        self.tool_choice = tool_choice
        self.statements = statements
        self._tenant = tenant
        self._get_workspace = get_workspace
        self._platform_uri = platform_uri
        self._write_block_reason = write_block_reason
        # Hot-path caches (see agentpg.access.cache: 2 s, dropped at once by any change made by this service).
        self._targets: cache.TtlCache[tuple[str, str], AgentTarget] = cache.TtlCache(deps.invalidation)
        self._write_blocks: cache.TtlCache[str, tuple[str | None]] = cache.TtlCache(deps.invalidation)

    def limits(self) -> QueryLimits:
        """The limits every agent call runs under (timeouts, rows, bytes), as the tenant access has them."""
        return self._tenant().queries.limits

    # -- MCP: agent calls, permissions, audit ---------------------------------------------------------
    # An agent (a workspace's token) reaches its user's global database as its own role and its agent
    # database with full rights, only through these methods. Each call is classified (pglast), pre-checked
    # against the agent's permissions, run by the access layer, and audited (success or not).

    def target_cached(self, principal: Principal, database: str) -> AgentTarget | None:
        """:meth:`target`'s answer if it is cached (no I/O: for the event loop), else ``None``."""
        if principal.kind != "agent" or principal.workspace_id is None:
            return None
        return self._targets.get((principal.workspace_id, database))

    async def _target(self, principal: Principal, database: str) -> AgentTarget:
        hit = self.target_cached(principal, database)
        return hit if hit is not None else await asyncio.to_thread(self.target, principal, database)

    def target(self, principal: Principal, database: str) -> AgentTarget:
        """Where an agent's call on ``database`` ("global" | "agent") runs, and the permissions that apply
        (None: unrestricted, i.e. the agent database or a bring-your-own global database).

        Remembered for the cache TTL (2 s) per (workspace, database); a permission change or a deletion made
        through this process drops it at once. The role's grants, not this answer, bound what runs: a stale
        entry can only make a refusal less precise (the server's "permission denied" instead of ours)."""
        if principal.kind != "agent" or principal.workspace_id is None:
            raise PermissionDenied("only an agent token (one workspace's) can use the agent tools")
        if database not in ("global", "agent"):
            raise InvalidInput('database must be "global" (the user\'s database, shared by all its agents) or '
                               '"agent" (this workspace\'s own)')
        workspace_id = principal.workspace_id
        hit = self._targets.get((workspace_id, database))
        if hit is not None:
            return hit
        gen = self.deps.invalidation.current()
        # The hot path of every tool call: one catalog round trip for the workspace, its permissions and
        # its agent database (what agent_uri finds in three).
        with self.deps.sessions() as s:
            found = s.execute(
                select(Workspace, AgentGlobalDbPermissions, WorkspaceAgentDatabase)
                .outerjoin(AgentGlobalDbPermissions, AgentGlobalDbPermissions.workspace_id == Workspace.id)
                .outerjoin(WorkspaceAgentDatabase, WorkspaceAgentDatabase.workspace_id == Workspace.id)
                .where(Workspace.id == workspace_id)).one_or_none()
        ws, perms_row, agent_db = found if found is not None else (None, None, None)
        if ws is None or ws.status != "active":
            raise NotFound(f"workspace {workspace_id!r} does not exist")
        self.tool_choice.remember(workspace_id, ws.mcp_tools, gen)  # the same row: no lookup of its own
        perms: GlobalDbPermissions | None = None
        if database == "global" and ws.global_uri_sealed is not None:
            uri = self.deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri")
            perms = from_row(perms_row)
        elif database == "global":  # brought by the platform: no per-agent roles, its own URI is all there is
            uri = self._platform_uri(ws.user_id)
        elif agent_db is None or agent_db.status != "ready" or agent_db.connection_uri_sealed is None:
            raise NotFound(f"workspace {workspace_id!r} has no ready database")
        else:
            uri = self.deps.open(agent_db.connection_uri_sealed, "workspace_agent_database", agent_db.id,
                                 "connection_uri")
        target = AgentTarget(uri=uri, user_id=ws.user_id, workspace_id=workspace_id, database=database,
                             permissions=perms)
        self._targets.put((workspace_id, database), target, gen)
        return target

    async def list_databases(self, principal: Principal) -> list[dict[str, Any]]:
        """The two logical databases an agent can name, with what it may do in each; audited."""
        async with self.audited(principal, "list_databases") as draft:
            out: list[dict[str, Any]] = []
            for name, about in (("global", "shared by every agent of your user"), ("agent", "this agent's own")):
                target = await self._target(principal, name)
                draft.user_id, perms = target.user_id, target.permissions
                out.append({"name": name, "description": about,
                            "access": "full" if perms is None else "restricted",
                            "permissions": perms.model_dump() if perms is not None else None})
            draft.rows = len(out)
            return out

    async def sql(self, principal: Principal, tool: Literal["query", "execute"],
                        database: str, statement: str, params: list[Any] | None = None,
                        max_rows: int | None = None) -> StatementResult:
        """One ``query`` (read-only) or ``execute`` call: classify, pre-check, run, audit.

        Raises ``RejectedStatement`` (the classifier's refusal), ``PermissionRefused``, ``StatementFailed`` or
        another :mod:`agentpg.errors` exception; every outcome is written to the audit log.
        """
        async with self.audited(principal, tool, database, self.statements.audit_text(statement)) as draft:
            target = await self._target(principal, database)
            draft.user_id = target.user_id
            c = self.statements.classify(statement)
            draft.fingerprint = c.fingerprint
            check_tool(c, tool)
            if c.extension is not None:  # never run as the agent: agentpg's admin installs allowed ones
                started = time.perf_counter()
                await asyncio.to_thread(self.install_extension, principal, database, c.extension)
                return StatementResult(columns=[], rows=[], truncated=False, command="CREATE EXTENSION",
                                       duration_ms=round((time.perf_counter() - started) * 1000, 3))
            if database == "global":
                check_shared(c)
            if target.permissions is not None:
                precheck(c, target.permissions)
            if tool == "execute" and c.kind in (StatementKind.WRITE, StatementKind.DDL):
                # The grants already say no while over budget or the storage limit; this says why.
                cached_block = self._write_blocks.get(target.user_id)
                if cached_block is not None:
                    blocked = cached_block[0]
                else:
                    gen = self.deps.invalidation.current()
                    blocked = await asyncio.to_thread(self._write_block_reason, target.user_id)
                    self._write_blocks.put(target.user_id, (blocked,), gen)
                if blocked is not None:
                    raise PermissionRefused(blocked, reason="storage_limit" if blocked.startswith("storage")
                                            else "budget_exceeded")
            result = await self._tenant().queries.run(target.uri, statement, params, read_only=tool == "query",
                                       max_rows=max_rows, user=target.user_id, shape=c.shape)
            draft.rows = result.rows_affected if result.rows_affected is not None else result.row_count
            return result

    def install_extension(self, principal: Principal, database: str, name: str) -> None:
        """An agent's ``CREATE EXTENSION name``: installed by agentpg's admin if the operator allows it
        (idempotent; every allowed one is already in new databases). Raises PermissionRefused naming the
        allow-list otherwise, NotFound for an unknown workspace, ProviderError if the server lacks it."""
        target = self.target(principal, database)
        allowed = self.deps.provider.extensions
        if name not in allowed:
            why = NEVER_ALLOWED.get(name)
            raise PermissionRefused(
                f"extension {name!r} is not available: "
                + (f"agentpg never installs it for tenants (it {why}). " if why else "")
                + f"Allowed by the operator (AGENTPG_TENANT_EXTENSIONS): {', '.join(allowed) or 'none'}.",
                reason="extension_not_allowed")
        with self.deps.sessions() as s:
            record: UserGlobalDatabase | WorkspaceAgentDatabase | None
            if database == "global":
                record = s.scalars(select(UserGlobalDatabase).where(
                    UserGlobalDatabase.user_id == target.user_id)).one_or_none()
            else:
                record = s.scalars(select(WorkspaceAgentDatabase).where(
                    WorkspaceAgentDatabase.workspace_id == target.workspace_id)).one_or_none()
            if record is None or record.ownership_type != "platform":
                raise PermissionRefused("this database was brought by the platform; agentpg does not manage its "
                                        "extensions", reason="extension_not_allowed")
            plan = users.plan_of(record)
        self.deps.provider.install_extension(plan, name)

    # -- undo for agents (issue 19): checkpoints of either database, restore of its own ---------------------

    def _agent_ids(self, principal: Principal) -> tuple[str, str]:
        if principal.kind != "agent" or principal.workspace_id is None or principal.user_id is None:
            raise PermissionDenied("only an agent token (one workspace's) can use the agent tools")
        return principal.user_id, principal.workspace_id

    async def checkpoint(self, principal: Principal, database: Literal["global", "agent", "both"],
                               name: str | None) -> list[CheckpointInfo]:
        async with self.audited(principal, "checkpoint", database if database != "both" else None) as draft:
            user_id, workspace_id = self._agent_ids(principal)
            made = await asyncio.to_thread(self.undo.agent_checkpoint, user_id, workspace_id, database, name)
            draft.rows = len(made)
            return made

    async def list_checkpoints(self, principal: Principal,
                                     database: Literal["global", "agent"]) -> list[CheckpointInfo]:
        async with self.audited(principal, "list_checkpoints", database) as draft:
            user_id, workspace_id = self._agent_ids(principal)
            listed = await asyncio.to_thread(self.undo.agent_list_checkpoints, user_id, workspace_id, database)
            draft.rows = len(listed)
            return listed

    async def restore(self, principal: Principal, checkpoint_id: str | None,
                            at: datetime | None, before_audit_id: int | None,
                            mode: Literal["in_place", "new"]) -> RestoreResult:
        """Restore the agent's own agent database; its pooled sessions are dropped after an in-place one."""
        async with self.audited(principal, "restore", "agent"):
            user_id, workspace_id = self._agent_ids(principal)
            spec = TargetSpec(checkpoint_id=checkpoint_id, at=at, before_audit_id=before_audit_id)
            result = await asyncio.to_thread(self.undo.agent_restore, user_id, workspace_id, spec, mode)
            if mode == "in_place":
                target = await self._target(principal, "agent")
                await self._tenant().pools.forget(target.uri)
            return result

    async def explain(self, principal: Principal, database: str, statement: str,
                            params: list[Any] | None = None, *, analyze: bool = False) -> dict[str, Any]:
        """One ``explain`` call: the plan of ``statement`` as this agent would run it, never executing a write.

        Classified and pre-checked as ``query``/``execute`` would (an agent may explain only what it could
        run), then run as ``EXPLAIN (FORMAT JSON)`` through the query path: READ ONLY, the query limits, the
        agent's own role, so Postgres checks table and function privileges as for the statement itself.
        ``analyze`` (reads only) executes the read in that same read-only transaction. Returns
        :func:`agentpg.access.explain.summarize`'s dict plus ``database``, ``command`` and ``duration_ms``.
        Raises like :meth:`sql`; audited as tool ``explain``.
        """
        async with self.audited(principal, "explain", database, self.statements.audit_text(statement)) as draft:
            target = await self._target(principal, database)
            draft.user_id = target.user_id
            c = self.statements.classify(statement)
            draft.fingerprint = c.fingerprint
            explain.check_explainable(c, analyze=analyze)
            if database == "global":
                check_shared(c)
            if target.permissions is not None:
                precheck(c, target.permissions)
            text, offset = explain.explain_text(statement, analyze=analyze)
            try:
                result = await self._tenant().queries.run(target.uri, text, params, read_only=True, max_rows=1,
                                           user=target.user_id)
            except StatementFailed as exc:
                raise StatementFailed(explain.shift_positions(exc.message, offset), outcome=exc.outcome,
                                      condition=exc.condition) from None
            if not result.rows or not result.rows[0]:
                raise StatementFailed("Postgres returned no plan for this statement", outcome="error",
                                      condition="no_plan")
            summary = explain.summarize(result.rows[0][0], analyze=analyze)
            draft.rows = 1
            return {"database": database, "command": c.command, "analyzed": analyze,
                    "duration_ms": result.duration_ms, **summary}

    async def list_tables(self, principal: Principal, database: str,
                                schema: str = "public") -> dict[str, Any]:
        """Tables of one schema of a logical database, with the agent's own privileges on each; audited."""
        async with self.audited(principal, "list_tables", database) as draft:
            target = await self._target(principal, database)
            draft.user_id = target.user_id
            listed = await introspect.list_tables(self._tenant().queries, target.uri, schema)
            draft.rows = len(listed["tables"])
            return {"database": database, **listed}

    async def describe_table(self, principal: Principal, database: str,
                                   table: str) -> dict[str, Any]:
        """Columns, keys, indexes and row estimate of one table; audited."""
        async with self.audited(principal, "describe_table", database) as draft:
            target = await self._target(principal, database)
            draft.user_id = target.user_id
            described = await introspect.describe_table(self._tenant().queries, target.uri, table)
            return {"database": database, **described}

    @asynccontextmanager
    async def audited(self, principal: Principal, tool: str, database: str | None = None,
                       statement: str | None = None) -> AsyncIterator[AuditDraft]:
        """Record the block as one audit entry, however it ends (a write failure is logged, not raised)."""
        started, started_at = time.perf_counter(), datetime.now(UTC)
        draft = AuditDraft(tool=tool, database=database, statement=statement)
        try:
            yield draft
        except BaseException as exc:
            draft.fail(exc)
            raise
        finally:
            user_id = draft.user_id or principal.user_id
            if user_id is not None and principal.workspace_id is not None:  # else not an agent: nothing ran
                entry = AuditRecord(
                    user_id=user_id, workspace_id=principal.workspace_id, tool=draft.tool, outcome=draft.outcome,
                    database=draft.database if draft.database in ("global", "agent") else None,
                    duration_ms=(time.perf_counter() - started) * 1000, fingerprint=draft.fingerprint,
                    statement=draft.statement, rows=draft.rows, error=draft.error, started_at=started_at)
                # Write-behind (AuditWriter: batched every 100 ms, back-pressure when its queue is full).
                await self.audit_writer.submit(entry)

    def list_audit(self, user_id: str, *, workspace_id: str | None = None, limit: int = 100,
                   cursor: str | None = None, where: audit_log.AuditFilter | None = None) -> AuditPage:
        """A user's audit entries, newest first, those matching ``where`` when given (``NotFound`` for an
        unknown user)."""
        validate_id(user_id, "user id")
        if workspace_id is not None:
            validate_id(workspace_id, "workspace id")
        if cursor is not None and (not cursor.isdigit() or int(cursor) > 2**63 - 1):  # ids are bigint
            raise InvalidInput("cursor must be the next_cursor of a previous page")
        with self.deps.sessions() as s:
            user = s.get(User, user_id)
            if user is None or user.status == "provisioning":
                raise NotFound(f"user {user_id!r} does not exist")
        self.audit_writer.flush()  # entries of calls that already returned are readable
        return audit_log.page(self.deps.sessions, user_id, workspace_id=workspace_id, limit=limit, cursor=cursor,
                              where=where)

    def get_agent_permissions(self, workspace_id: str, *, user_id: str | None = None) -> GlobalDbPermissions:
        """A workspace's permissions on its user's global database (scoped to ``user_id`` when given)."""
        validate_id(workspace_id, "workspace id")
        with self.deps.sessions() as s:
            ws = workspace_ids.find(s, workspace_id, user_id)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            return from_row(s.scalars(select(AgentGlobalDbPermissions)
                                          .where(AgentGlobalDbPermissions.workspace_id == ws.id))
                                .one_or_none())

    def set_agent_permissions(self, workspace_id: str, permissions: GlobalDbPermissions, *,
                              user_id: str | None = None) -> GlobalDbPermissionsSet:
        """Store a workspace's permissions and make its role's grants exactly these, at once.

        The workspace row stays locked while the provider re-grants, so concurrent changes apply one after
        the other and the catalog never says what Postgres does not enforce. ``Conflict`` for a
        bring-your-own global database: agentpg has no per-agent roles there to enforce anything with.
        """
        validate_id(workspace_id, "workspace id")
        with self.deps.sessions.begin() as s:
            ws = workspace_ids.find(s, workspace_id, user_id, for_update=True)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            workspace_id = ws.id  # the catalog's id (workspace ids are per user)
            glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == ws.user_id)).one()
            if ws.agent_role is None or glob.ownership_type != "platform":
                raise Conflict("this user's global database was brought by the platform, so agentpg has no "
                               "per-agent roles in it and cannot enforce per-agent permissions")
            row = s.scalars(select(AgentGlobalDbPermissions)
                            .where(AgentGlobalDbPermissions.workspace_id == workspace_id)).one_or_none()
            if row is None:
                row = AgentGlobalDbPermissions(workspace_id=workspace_id, user_id=ws.user_id)
                s.add(row)
            row.can_read, row.can_write = permissions.can_read, permissions.can_write
            row.can_create_tables, row.can_drop_tables = permissions.can_create_tables, permissions.can_drop_tables
            row.allowed_tables = permissions.allowed_tables
            self.deps.provider.set_agent_permissions(users.plan_of(glob), ws.agent_role,
                                                     workspaces.permissions_of(row))
            owner = ws.user_id
        self.deps.invalidation.bump()  # the next call of this agent sees the new permissions
        result = GlobalDbPermissionsSet(**permissions.model_dump())
        if permissions.allowed_tables:
            result.missing_tables = self._missing_relations(owner, permissions.allowed_tables)
        if result.missing_tables:
            result.warning = ("allowed_tables names what the global database does not have yet: "
                              + ", ".join(result.missing_tables) + ". Permissions match tables by name, so these "
                              "take effect when a table of that name is created (by an agent allowed to create "
                              "tables); check the spelling if none should be")
        return result

    def _missing_relations(self, user_id: str, names: list[str]) -> list[str]:
        """The names of ``names`` no relation of schema public of the user's global database has."""
        import psycopg

        with psycopg.connect(self._platform_uri(user_id), autocommit=True,
                             connect_timeout=10) as conn:
            found = {r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relnamespace = 'public'::regnamespace "
                "AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND c.relname = ANY(%s)", (names,))}
        return [n for n in names if n not in found]

    def mcp_config(self, workspace_id: str, base_url: str, settings: Settings, *,
                   user_id: str | None = None) -> dict[str, Any]:
        """The MCP client configurations for this workspace, HTTP and stdio, with a token placeholder
        (:func:`agentpg.service.client_configs.client_configs`)."""
        self._get_workspace(workspace_id, user_id=user_id)
        return client_configs(settings, base_url)

