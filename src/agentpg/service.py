"""The one façade the edges call. REST, MCP and the CLI go through here, so they cannot drift apart."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import replace

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agentpg import __version__, envvars
from agentpg.access import audit as audit_log
from agentpg.access import cache
from agentpg.access.guard import Reaper
from agentpg.access.permissions import (
    AgentTarget,
    PermissionRefused,
)
from agentpg.agent_calls import AgentCalls
from agentpg.catalog.models import (
    Operation,
    User,
    UserGlobalDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.errors import AgentpgError, Conflict, InvalidInput, NotFound, PermissionDenied
from agentpg.gateway import configs as gateway_configs
from agentpg.lifecycle import reconcile as reconcile_mod
from agentpg.lifecycle import undo, users, workspace_ids, workspaces
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.oauth.service import OAuthService
from agentpg.schemas import DatabaseInfo, StatusInfo, UsageReport, UserInfo, UserPage, WorkspaceInfo, WorkspacePage
from agentpg.tokens import IssuedToken, Principal, TokenInfo, TokenStore
from agentpg.tool_choice import AGENT_TOOLS, McpTools, ToolChoice
from agentpg.undo_service import UndoService
from agentpg.usage import history as usage_history_mod
from agentpg.usage import report as usage_report_mod
from agentpg.usage.budgets import SyncReport, UsagePolicy, sync_usage

log = logging.getLogger(__name__)


def _db_info(rec: UserGlobalDatabase | WorkspaceAgentDatabase | None) -> DatabaseInfo | None:
    if rec is None:
        return None
    return DatabaseInfo(name=rec.database_name, status=rec.status,  # type: ignore[arg-type]
                        ownership_type=rec.ownership_type, provider=rec.provider,  # type: ignore[arg-type]
                        created_at=rec.created_at, current_period_cost_cents=rec.current_period_cost_cents)


class Service(AgentCalls):
    """Users, workspaces and their databases. Methods raise :mod:`agentpg.errors` exceptions only."""

    def __init__(self, deps: LifecycleDeps, tokens: TokenStore, *, embedded: bool,
                 postgres_status: dict[str, object] | None = None, usage_policy: UsagePolicy | None = None,
                 reaper: Reaper | None = None):
        self.deps = deps
        self.reaper = reaper or Reaper()
        """Terminates tenant backends the edges gave up on (as agentpg's admin on the servers it manages)."""
        self.usage_policy = usage_policy or UsagePolicy()
        self.tokens = tokens
        self._embedded = embedded
        self._postgres_status = postgres_status or {}
        # Hot-path caches (see agentpg.access.cache: 2 s, dropped at once by any change made in this process)
        # and the audit log's write-behind queue.
        self._targets: cache.TtlCache[tuple[str, str], AgentTarget] = cache.TtlCache()
        self._write_blocks: cache.TtlCache[str, tuple[str | None]] = cache.TtlCache()
        self._browse_uris: cache.TtlCache[tuple[str | None, str | None, str | None], str] = cache.TtlCache()
        self.audit_writer = audit_log.AuditWriter(deps.sessions)
        self.tool_choice = ToolChoice(deps)
        """Which MCP tools each workspace's agent is offered (issue 20)."""
        self.oauth = OAuthService(deps)
        """The OAuth authorization server remote MCP clients sign in through (issue 20; docs/mcp.md)."""
        self.undo = UndoService(deps, resolve=self._workspace_catalog_id,
                                read_only=lambda user_id: self.write_block_reason(user_id) is not None)

    def _workspace_catalog_id(self, user_id: str, workspace_id: str) -> str:
        """The catalog's id of ``user_id``'s workspace ``workspace_id`` (NotFound for another user's)."""
        with self.deps.sessions() as s:
            return self._find_workspace(s, workspace_id, user_id).id

    def restored_database_uris(self, user_id: str, workspace_id: str | None) -> list[str]:
        """Every URI agentpg may hold pooled sessions on for one database (its login role's, and in a global
        database each agent's own): after a restore in place, the edges drop those pools. Secrets."""
        uris: list[str] = []
        with self.deps.sessions() as s:
            if workspace_id is None:
                for ws in s.scalars(select(Workspace).where(Workspace.user_id == user_id)):
                    if ws.global_uri_sealed is not None:
                        uris.append(self.deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri"))
                catalog_id = None
            else:
                catalog_id = self._find_workspace(s, workspace_id, user_id).id
        uris.append(self.platform_uri(user_id, catalog_id))
        return uris

    def copy_uri(self, user_id: str, copy_id: str) -> str:
        """The READ ONLY browse URI of a restored copy of ``user_id`` (a secret, for the access layer)."""
        validate_id(user_id, "user id")
        return undo.copy_uri(self.deps, user_id, copy_id)

    # -- users ---------------------------------------------------------------------------------------

    def register_user(self, user_id: str, email: str | None = None, database_url: str | None = None) -> UserInfo:
        users.register_user(self.deps, user_id, email, database_url)
        return self.get_user(user_id)

    def get_user(self, user_id: str) -> UserInfo:
        validate_id(user_id, "user id")
        with self.deps.sessions() as s:
            user = s.get(User, user_id)
            if user is None or user.status == "provisioning":
                raise NotFound(f"user {user_id!r} does not exist")
            return self._user_info(s, user)

    def _user_info(self, s: Session, user: User) -> UserInfo:
        rec = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user.id)).one_or_none()
        return UserInfo(id=user.id, email=user.email, status=user.status, created_at=user.created_at,
                        global_database=_db_info(rec))

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> UserPage:
        with self.deps.sessions() as s:
            query = select(User).where(User.status != "provisioning").order_by(User.id).limit(limit + 1)
            if cursor:
                query = query.where(User.id > cursor)
            rows = list(s.scalars(query))
            more = len(rows) > limit
            rows = rows[:limit]
            return UserPage(items=[self._user_info(s, u) for u in rows],
                            next_cursor=rows[-1].id if more and rows else None)

    def delete_user(self, user_id: str) -> None:
        try:
            users.delete_user(self.deps, user_id)
        finally:
            cache.invalidate_all()

    # -- workspaces ----------------------------------------------------------------------------------

    def create_workspace(self, user_id: str, workspace_id: str, name: str | None = None) -> WorkspaceInfo:
        workspaces.create_workspace(self.deps, user_id, workspace_id, name)
        return self.get_workspace(workspace_id, user_id=user_id)

    def get_workspace(self, workspace_id: str, *, user_id: str | None = None) -> WorkspaceInfo:
        """The workspace the platform calls ``workspace_id``, of ``user_id`` (another user's is "not found");
        for the admin (``user_id`` None) of whichever user has it, ``Conflict`` if several users do
        (workspace ids are per user: :mod:`agentpg.lifecycle.workspace_ids`)."""
        with self.deps.sessions() as s:
            return self._workspace_info(s, self._find_workspace(s, workspace_id, user_id))

    @staticmethod
    def _find_workspace(s: Session, workspace_id: str, user_id: str | None) -> Workspace:
        """The catalog row of :meth:`get_workspace`'s workspace (its ``id`` is the catalog's id)."""
        validate_id(workspace_id, "workspace id")
        ws = workspace_ids.find(s, workspace_id, user_id)
        if ws is None or ws.status == "provisioning":
            raise NotFound(f"workspace {workspace_id!r} does not exist")
        return ws

    def _workspace_info(self, s: Session, ws: Workspace) -> WorkspaceInfo:
        rec = s.scalars(select(WorkspaceAgentDatabase)
                        .where(WorkspaceAgentDatabase.workspace_id == ws.id)).one_or_none()
        return WorkspaceInfo(id=workspace_ids.public_id(ws.id), user_id=ws.user_id, name=ws.name,
                             status=ws.status, created_at=ws.created_at, database=_db_info(rec))

    def list_workspaces(self, user_id: str | None = None, *, limit: int = 100,
                        cursor: str | None = None) -> WorkspacePage:
        with self.deps.sessions() as s:
            # One user's: by the platform's id (unique per user). Everyone's (the CLI): by the catalog's id.
            key = Workspace.id if user_id is None else func.split_part(Workspace.id, workspace_ids.SEPARATOR, 1)
            query = select(Workspace).where(Workspace.status != "provisioning").order_by(key)
            if user_id is not None:
                validate_id(user_id, "user id")
                user = s.get(User, user_id)
                if user is None or user.status == "provisioning":
                    raise NotFound(f"user {user_id!r} does not exist")
                query = query.where(Workspace.user_id == user_id)
            if cursor:
                query = query.where(key > cursor)
            rows = list(s.scalars(query.limit(limit + 1)))
            more = len(rows) > limit
            rows = rows[:limit]
            last = (rows[-1].id if user_id is None else workspace_ids.public_id(rows[-1].id)) if rows else None
            return WorkspacePage(items=[self._workspace_info(s, w) for w in rows],
                                 next_cursor=last if more else None)

    def delete_workspace(self, workspace_id: str, *, user_id: str | None = None) -> None:
        try:
            workspaces.delete_workspace(self.deps, workspace_id, user_id=user_id)
        finally:
            cache.invalidate_all()

    # -- operations ----------------------------------------------------------------------------------

    def reconcile(self, *, fix: bool = False, upgrade: bool = False) -> reconcile_mod.ReconcileReport:
        return reconcile_mod.reconcile(self.deps, fix=fix, upgrade=upgrade)

    def status(self) -> StatusInfo:
        with self.deps.sessions() as s:
            n_users = s.scalar(select(func.count()).select_from(User)) or 0
            n_ws = s.scalar(select(func.count()).select_from(Workspace)) or 0
            n_ops = s.scalar(select(func.count()).select_from(Operation).where(Operation.state == "pending")) or 0
        version = self._postgres_status.get("version")
        try:
            extensions = self.deps.provider.extension_status()
        except AgentpgError:
            extensions = {"installed": [], "missing": []}
        return StatusInfo(version=__version__, postgres="embedded" if self._embedded else "external",
                          postgres_running=bool(self._postgres_status.get("running", True)),
                          postgres_version=str(version) if version else None, catalog="ok",
                          users=n_users, workspaces=n_ws, pending_operations=n_ops,
                          extensions=extensions["installed"], extensions_missing=extensions["missing"])

    # -- tenant connection strings (secrets: for the access layer only, never for an edge to show) ------

    def platform_uri(self, user_id: str, workspace_id: str | None = None) -> str:
        """The full-rights URI of a user's global database, or of one of its workspaces' agent databases.

        Used for the platform's own reads (REST tables/rows, explorer), always inside READ ONLY transactions.
        A workspace of another user is "not found".
        """
        with self.deps.sessions() as s:
            rec: UserGlobalDatabase | WorkspaceAgentDatabase | None
            if workspace_id is None:
                rec = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one_or_none()
                table, what = "user_global_database", f"user {user_id!r}"
            else:
                rec = s.scalars(select(WorkspaceAgentDatabase).where(
                    WorkspaceAgentDatabase.workspace_id == workspace_id,
                    WorkspaceAgentDatabase.user_id == user_id)).one_or_none()
                table, what = "workspace_agent_database", f"workspace {workspace_id!r}"
            if rec is None or rec.status != "ready" or rec.connection_uri_sealed is None:
                raise NotFound(f"{what} has no ready database")
            return self.deps.open(rec.connection_uri_sealed, table, rec.id, "connection_uri")

    def browse_uri_cached(self, scope_user: str | None, user_id: str | None, workspace_id: str | None) -> str | None:
        """What :meth:`browse_uri` returned for these arguments less than the cache TTL ago (no I/O)."""
        return self._browse_uris.get((scope_user, user_id, workspace_id))

    def browse_uri(self, scope_user: str | None, user_id: str | None, workspace_id: str | None) -> str:
        """The REST browse routes' URI: a user's global database (``user_id``) or a workspace's agent
        database (``workspace_id``, of ``scope_user`` when given: another user's is "not found").
        Remembered for the cache TTL: the routes read with it in READ ONLY transactions only."""
        key = (scope_user, user_id, workspace_id)
        hit = self._browse_uris.get(key)
        if hit is not None:
            return hit
        gen = cache.generation()
        if workspace_id is None:
            assert user_id is not None
            self.get_user(user_id)  # validates the id, and "does not exist" reads better than "not ready"
            uri = self.platform_uri(user_id)
        else:
            with self.deps.sessions() as s:
                ws = self._find_workspace(s, workspace_id, scope_user)
            uri = self.platform_uri(ws.user_id, ws.id)
        self._browse_uris.put(key, uri, gen)
        return uri

    def agent_uri(self, workspace_id: str, database: str) -> str:
        """The URI an agent's calls run with: its own role in the global database, or its agent database.

        ``database`` is the logical name, ``"global"`` or ``"agent"``.
        """
        with self.deps.sessions() as s:
            ws = s.get(Workspace, workspace_id)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            if database == "agent":
                user_id = ws.user_id
            elif database == "global":
                if ws.global_uri_sealed is not None:
                    return self.deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri")
                # A bring-your-own global database has no per-agent roles: its own URI is all there is.
                return self.platform_uri(ws.user_id)
            else:
                raise InvalidInput('database must be "global" (the user\'s shared database) or "agent" '
                                   "(this workspace's own)")
        return self.platform_uri(user_id, workspace_id)

    # -- REST: tokens, env, browse ---------------------------------------------------------------------
    # What the REST edge (agentpg.api) needs beyond the methods above. Scoping convention as above:
    # ``user_id`` given → a resource of another user is "not found".

    def create_workspace_with_token(self, user_id: str, workspace_id: str,
                                    name: str | None = None) -> tuple[WorkspaceInfo, IssuedToken]:
        """Create a workspace and issue its first agent token (its secret is shown to the caller once)."""
        info = self.create_workspace(user_id, workspace_id, name)
        return info, self.issue_agent_token(workspace_id, user_id=user_id)

    def issue_user_token(self, user_id: str, name: str | None = None) -> IssuedToken:
        """A token that reaches this user's REST routes only."""
        self._check_token_name(name)
        self.get_user(user_id)  # NotFound for an unknown user or one still being registered
        return self.tokens.issue("user", user_id=user_id, name=name)

    def issue_agent_token(self, workspace_id: str, *, user_id: str | None = None,
                          name: str | None = None) -> IssuedToken:
        """A token that reaches this workspace's MCP tools only."""
        self._check_token_name(name)
        with self.deps.sessions() as s:
            ws = self._find_workspace(s, workspace_id, user_id)
        if ws.status != "active":
            raise Conflict(f"workspace {workspace_id!r} is {ws.status}; tokens are issued to active workspaces")
        return self.tokens.issue("agent", user_id=ws.user_id, workspace_id=ws.id, name=name)

    def revoke_token(self, token_id: str, *, user_id: str | None = None) -> None:
        try:
            uuid.UUID(token_id)
        except (ValueError, TypeError):
            raise NotFound(f"token {token_id!r} does not exist") from None
        self.tokens.revoke(token_id, user_id=user_id)

    def list_tokens(self, user_id: str, workspace_id: str | None = None) -> list[TokenInfo]:
        """The user's live tokens, or one workspace's agent tokens: ids, kinds, names and dates, never a
        secret. ``NotFound`` for an unknown user, or a workspace that is not this user's."""
        self.get_user(user_id)
        catalog_id = None
        if workspace_id is not None:
            with self.deps.sessions() as s:
                catalog_id = self._find_workspace(s, workspace_id, user_id).id
        return [replace(t, workspace_id=workspace_ids.public_id(t.workspace_id) if t.workspace_id else None)
                for t in self.tokens.list_live(user_id, workspace_id=catalog_id)]

    def list_env(self, user_id: str) -> envvars.EnvVarList:
        return envvars.list_env(self.deps, user_id)

    def put_env(self, user_id: str, name: str, value: str) -> tuple[envvars.EnvVarInfo, bool]:
        """Create or replace a user's variable (sealed); returns it (no value) and whether it was created."""
        return envvars.put_env(self.deps, user_id, name, value)

    def delete_env(self, user_id: str, name: str) -> None:
        envvars.delete_env(self.deps, user_id, name)

    def database_uris(self, user_id: str, workspace_id: str | None = None) -> list[str]:
        """Platform URIs of a user's databases (all, or one workspace's), for closing pools before a drop.

        Secrets, like :meth:`platform_uri`: for the access layer only.
        """
        validate_id(user_id, "user id")
        with self.deps.sessions() as s:
            ws_ids = [self._find_workspace(s, workspace_id, user_id).id] if workspace_id is not None else list(
                s.scalars(select(Workspace.id).where(Workspace.user_id == user_id)))
        targets: list[str | None] = ([] if workspace_id is not None else [None]) + list(ws_ids)
        uris = []
        for target in targets:
            try:
                uris.append(self.platform_uri(user_id, target))
            except NotFound:
                continue
        return uris

    @staticmethod
    def _check_token_name(name: str | None) -> None:
        if name is not None and (not isinstance(name, str) or len(name) > 200 or "\x00" in name):
            raise InvalidInput("a token name is text of at most 200 characters without NUL bytes")

    # -- usage and budgets ---------------------------------------------------------------------------

    def sync_usage(self) -> SyncReport:
        """Sample every database, update costs and totals, enforce budgets (one instance at a time)."""
        policy = self.usage_policy
        try:
            return sync_usage(self.deps, policy.prices, default_budget_cents=policy.default_budget_cents)
        finally:
            cache.invalidate_all()

    def usage(self, user_id: str) -> UsageReport:
        validate_id(user_id, "user id")
        return usage_report_mod.usage_report(self.deps, user_id, warning_percent=self.usage_policy.warning_percent,
                                             default_budget_cents=self.usage_policy.default_budget_cents,
                                             prices=self.usage_policy.prices)

    def usage_history(self, user_id: str, days: int = 90) -> list[usage_history_mod.DayUsage]:
        """The user's usage per day (cost added, period total, storage) over the last ``days`` days, oldest
        first, as the usage syncs recorded it. ``NotFound`` for an unknown user, ``InvalidInput`` for a
        ``days`` outside 1..366."""
        self.get_user(user_id)
        try:
            return usage_history_mod.history(self.deps.sessions, user_id, days)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    def set_budget(self, user_id: str, budget_cents: int | None) -> UsageReport:
        validate_id(user_id, "user id")
        try:
            usage_report_mod.set_budget(self.deps, user_id, budget_cents)
        finally:
            cache.invalidate_all()
        return self.usage(user_id)

    def write_block_reason(self, user_id: str) -> str | None:
        """Why this user's agents may not write right now (budget exceeded), or ``None``."""
        return usage_report_mod.write_block_reason(self.deps, user_id)

    # -- MCP tool choice per workspace (issue 20; docs/mcp.md) ----------------------------------------------

    def get_mcp_tools(self, workspace_id: str, *, user_id: str | None = None) -> McpTools:
        return self.tool_choice.get(workspace_id, user_id=user_id)

    def set_mcp_tools(self, workspace_id: str, tools: list[str] | None, *,
                      user_id: str | None = None) -> McpTools:
        """Store which tools the workspace's agent is offered (None: all). ``InvalidInput`` names unknown
        tools and the valid list; ``NotFound`` for an unknown (or another user's) workspace."""
        return self.tool_choice.set(workspace_id, tools, user_id=user_id)

    async def agent_tools(self, principal: Principal) -> frozenset[str] | None:
        """The tools this agent may use (None: all), cached (2 s). ``PermissionDenied`` for a non-agent."""
        if principal.kind != "agent" or principal.workspace_id is None:
            raise PermissionDenied("only an agent token (one workspace's) can use the agent tools")
        hit = self.tool_choice.enabled_cached(principal.workspace_id)
        if hit is not None:
            return hit[0]
        return await asyncio.to_thread(self.tool_choice.enabled, principal.workspace_id)

    async def check_agent_tool(self, principal: Principal, name: str) -> None:
        """Raise ``PermissionRefused`` (reason ``tool_disabled``, audited) if the agent's user turned tool
        ``name`` off."""
        enabled = await self.agent_tools(principal)
        if enabled is not None and name not in enabled:
            offered = [t for t in AGENT_TOOLS if t in enabled]
            async with self._audited(principal, name):  # recorded like every call: refused, tool_disabled
                raise PermissionRefused(
                    f"The tool {name!r} is not enabled for this agent; its user chose the tools it is offered "
                    f"({', '.join(offered) or 'none'}) and can change that (PUT /api/workspaces/{{id}}/mcp-tools).",
                    reason="tool_disabled")

    # -- MCP gateway: user MCP server configs, resolved for an agent (issue 5; docs/gateway.md) -----------
    # Configs hold ${NAME} placeholders as written (sealed whole); they are resolved only in gateway_target,
    # whose result is a secret for the gateway alone. GLOBAL_DB_URL resolves to the calling workspace's own
    # role in the global database (its permissions hold), AGENT_DB_URL to its agent database.

    def list_mcp_servers(self, user_id: str,
                         catalog: gateway_configs.Catalog) -> gateway_configs.McpServerList:
        return gateway_configs.list_configs(self.deps, user_id, catalog)

    def put_mcp_server(self, user_id: str, name: str, spec: gateway_configs.McpServerSpec,
                       catalog: gateway_configs.Catalog) -> tuple[gateway_configs.McpServerInfo, bool]:
        return gateway_configs.put_config(self.deps, user_id, name, spec, catalog)

    def delete_mcp_server(self, user_id: str, name: str) -> None:
        gateway_configs.delete_config(self.deps, user_id, name)

    def gateway_target(self, principal: Principal, name: str,
                       catalog: gateway_configs.Catalog) -> gateway_configs.GatewayTarget:
        """The config ``name`` of the agent's user, resolved for the agent's workspace (a secret)."""
        if principal.kind != "agent" or principal.workspace_id is None:
            raise PermissionDenied("the MCP gateway is for agent tokens (one workspace's)")
        gateway_configs.validate_name(name)
        workspace_id = principal.workspace_id
        with self.deps.sessions() as s:
            ws = s.get(Workspace, workspace_id)
            if ws is None or ws.status != "active":
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            user_id = ws.user_id
        return gateway_configs.resolve(self.deps, user_id, workspace_id, name,
                                       lambda database: self.agent_uri(workspace_id, database), catalog)

