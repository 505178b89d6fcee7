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
from agentpg.access.audit import AuditFilter, AuditPage
from agentpg.access.guard import Reaper
from agentpg.access.permissions import GlobalDbPermissions, GlobalDbPermissionsSet, PermissionRefused
from agentpg.catalog.models import (
    Operation,
    User,
    UserGlobalDatabase,
    Workspace,
    WorkspaceAgentDatabase,
)
from agentpg.crypto import SealContext
from agentpg.errors import AgentpgError, Conflict, InvalidInput, NotFound, PermissionDenied
from agentpg.lifecycle import reconcile as reconcile_mod
from agentpg.lifecycle import users, workspace_ids, workspaces
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.schemas import DatabaseInfo, StatusInfo, UsageReport, UserInfo, UserPage, WorkspaceInfo, WorkspacePage
from agentpg.service import gateway_configs
from agentpg.service.admin import Admin
from agentpg.service.agents import AgentCalls
from agentpg.service.authz import Caller
from agentpg.service.background import Background
from agentpg.service.oauth.service import OAuthService
from agentpg.service.reader import Reader
from agentpg.service.statements import Statements
from agentpg.service.tenant import HeldConnections, NotStarted, TenantAccess
from agentpg.service.tool_choice import AGENT_TOOLS, McpTools, ToolChoice
from agentpg.service.undo import UndoService
from agentpg.service.uris import Uris
from agentpg.settings import Settings
from agentpg.tokens import IssuedToken, Principal, TokenInfo, TokenStore
from agentpg.usage import history as usage_history_mod
from agentpg.usage import report as usage_report_mod
from agentpg.usage.budgets import SyncReport, UsagePolicy, sync_usage

log = logging.getLogger(__name__)
_COOKIE = SealContext("explorer_session", "cookie", "token")


def _db_info(rec: UserGlobalDatabase | WorkspaceAgentDatabase | None) -> DatabaseInfo | None:
    if rec is None:
        return None
    return DatabaseInfo(name=rec.database_name, status=rec.status,  # type: ignore[arg-type]
                        ownership_type=rec.ownership_type, provider=rec.provider,  # type: ignore[arg-type]
                        created_at=rec.created_at, current_period_cost_cents=rec.current_period_cost_cents)


def _user_info(user: User, rec: UserGlobalDatabase | None) -> UserInfo:
    return UserInfo(id=user.id, email=user.email, status=user.status, created_at=user.created_at,
                    global_database=_db_info(rec))


class Service:
    """Users, workspaces and their databases. Methods raise :mod:`agentpg.errors` exceptions only.

    Composed of parts, each an object with its own collaborators: ``agents`` (what an agent runs, its
    permissions and audit), ``reader`` (the platform's and the console's reads), ``undo`` (checkpoints and
    restores), ``tool_choice`` (which MCP tools a workspace offers), ``background`` (restores answered 202).
    Users, workspaces, tokens, env and usage are this class's own methods. The tenant connections are
    attached by the assembly (:meth:`attach_tenant`); connection strings never leave the service.
    """

    def __init__(self, deps: LifecycleDeps, tokens: TokenStore, *, embedded: bool,
                 postgres_status: dict[str, object] | None = None, usage_policy: UsagePolicy | None = None,
                 reaper: Reaper | None = None, settings: Settings | None = None):
        self.deps = deps
        self.settings = settings or Settings()
        """The settings the service was built with (edges read public URL, limits and names from here)."""
        self.reaper = reaper or Reaper()
        """Terminates tenant backends the edges gave up on (as agentpg's admin on the servers it manages)."""
        self.usage_policy = usage_policy or UsagePolicy()
        self.tokens = tokens
        self._embedded = embedded
        self._postgres_status = postgres_status or {}
        # Hot-path cache (see agentpg.access.cache: 2 s, dropped at once by any change made by this service)
        # and the audit log's write-behind queue.
        self.audit_writer = audit_log.AuditWriter(deps.sessions)
        self._tenant: TenantAccess | None = None
        self.statements = Statements()
        """Every statement text parsed once (classification and audit text), for agents and the SQL box."""
        self.tool_choice = ToolChoice(deps)
        """Which MCP tools each workspace's agent is offered (issue 20)."""
        self.uris = Uris(deps, find_workspace=self._find_workspace, get_user=self.get_user)
        """Tenant connection strings (secrets): for the service's own parts only."""
        self.oauth = OAuthService(deps)
        """The OAuth authorization server remote MCP clients sign in through (issue 20; docs/mcp.md)."""
        self.undo = UndoService(deps, resolve=self._workspace_catalog_id,
                                read_only=lambda user_id: self.write_block_reason(user_id) is not None)
        self.agents = AgentCalls(deps, audit_writer=self.audit_writer, undo=self.undo, tool_choice=self.tool_choice,
                                 statements=self.statements, tenant=self.tenant, get_workspace=self.get_workspace,
                                 platform_uri=self.uris.platform, write_block_reason=self.write_block_reason)
        """What an agent (one workspace's token) runs on its two databases (MCP and the gateway call it)."""
        self.reader = Reader(self)
        """The platform's and the console's reads of tenant databases, named, never by URI."""
        self.background = Background()
        """Restores answered 202 run here (the assembly drains it before the tenant access closes)."""
        self.admin = Admin(deps, self.settings)
        """The operator's maintenance: the warm pool, the key ring."""

    def caller(self, principal: Principal) -> Caller:
        """The service on behalf of one person (REST bearer or console session), under the tenant rules
        (:mod:`agentpg.service.authz`); ``PermissionDenied`` for an agent token."""
        return Caller(self, principal)

    # -- the console's session cookie ------------------------------------------------------------------

    def seal_cookie(self, text: str) -> str:
        """``text`` sealed with the key ring for a browser cookie (bound to that use: it opens nowhere else)."""
        return self.deps.keyring.seal(text, _COOKIE)

    def open_cookie(self, value: str) -> str:
        """What :meth:`seal_cookie` sealed; ``SecretError`` when tampered with or sealed by a foreign key."""
        return self.deps.keyring.open(value, _COOKIE)

    # -- tenant connections (opened by the assembly on the serving event loop) -------------------------

    def attach_tenant(self, access: TenantAccess | None) -> None:
        """Use ``access`` for every tenant connection from now on (``None``: detach, before closing it)."""
        self._tenant = access

    def tenant(self) -> TenantAccess:
        """The attached tenant access; :class:`NotStarted` (503) before the assembly attached one."""
        if self._tenant is None:
            raise NotStarted("agentpg is starting; retry in a moment")
        return self._tenant

    def own_backend_pids(self) -> set[int]:
        """The server pids of the tenant connections this process's pools hold (empty before the tenant access
        is attached): what the session bounds leave to agentpg's own timeouts."""
        tenant = self._tenant
        return tenant.pools.backend_pids() if tenant is not None else set()

    def held_connections(self, user_id: str, workspace_id: str | None = None) -> HeldConnections:
        """The pooled sessions on a user's databases (all, or one workspace's), named before a drop (a
        dropped database cannot be looked up after it)."""
        return HeldConnections(self.uris.databases(user_id, workspace_id))

    def held_after_restore(self, user_id: str, workspace_id: str | None) -> HeldConnections:
        """Every session agentpg may pool on one database that a restore in place just replaced."""
        return HeldConnections(self.uris.restored_database(user_id, workspace_id))

    async def forget_connections(self, held: HeldConnections) -> None:
        """Close those pooled sessions, so no pool keeps a session on a database that is gone or replaced."""
        if self._tenant is None:
            return
        for uri in held._uris:
            await self._tenant.pools.forget(uri)

    # -- what the agents part answers for the REST side ------------------------------------------------

    def get_agent_permissions(self, workspace_id: str, *, user_id: str | None = None) -> GlobalDbPermissions:
        return self.agents.get_agent_permissions(workspace_id, user_id=user_id)

    def set_agent_permissions(self, workspace_id: str, permissions: GlobalDbPermissions, *,
                              user_id: str | None = None) -> GlobalDbPermissionsSet:
        return self.agents.set_agent_permissions(workspace_id, permissions, user_id=user_id)

    def list_audit(self, user_id: str, *, workspace_id: str | None = None, limit: int = 100,
                   cursor: str | None = None, where: AuditFilter | None = None) -> AuditPage:
        return self.agents.list_audit(user_id, workspace_id=workspace_id, limit=limit, cursor=cursor, where=where)

    def mcp_config(self, workspace_id: str, base_url: str, *, user_id: str | None = None) -> dict[str, object]:
        return self.agents.mcp_config(workspace_id, base_url, self.settings, user_id=user_id)

    def _workspace_catalog_id(self, user_id: str, workspace_id: str) -> str:
        """The catalog's id of ``user_id``'s workspace ``workspace_id`` (NotFound for another user's)."""
        with self.deps.sessions() as s:
            return self._find_workspace(s, workspace_id, user_id).id

    # -- users ---------------------------------------------------------------------------------------

    def register_user(self, user_id: str, email: str | None = None, database_url: str | None = None) -> UserInfo:
        users.register_user(self.deps, user_id, email, database_url)
        return self.get_user(user_id)

    def get_user(self, user_id: str) -> UserInfo:
        """The user and its global database's public info: one autocommit catalog statement (issue 22)."""
        validate_id(user_id, "user id")
        row = users.read_user(self.deps, user_id)
        if row is None or row.status == "provisioning":
            raise NotFound(f"user {user_id!r} does not exist")
        database = None if row.database_name is None else DatabaseInfo(
            name=row.database_name, status=row.database_status, ownership_type=row.ownership_type,
            provider=row.provider, created_at=row.database_created_at,
            current_period_cost_cents=row.current_period_cost_cents)
        return UserInfo(id=row.id, email=row.email, status=row.status, created_at=row.created_at,
                        global_database=database)

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> UserPage:
        rows = users.list_users(self.deps, limit=limit + 1, after=cursor)  # one statement for the page
        more = len(rows) > limit
        rows = rows[:limit]
        return UserPage(items=[_user_info(u, rec) for u, rec in rows],
                        next_cursor=rows[-1][0].id if more and rows else None)

    def delete_user(self, user_id: str) -> bool:
        """Delete the user and its databases. Returns whether a purge of the backups (a rebase,
        ``AGENTPG_BACKUP_PURGE_ON_USER_DELETE=rebase``; docs/undo.md) was scheduled: ``serve``'s next archiving
        round does it, in the background."""
        try:
            return users.delete_user(self.deps, user_id,
                                     rebase_backups=self.settings.backup_purge_on_user_delete == "rebase")
        finally:
            self.deps.invalidation.bump()

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
            self.deps.invalidation.bump()

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
        window = self.deps.provider.restorable_from(None)
        return StatusInfo(version=__version__, postgres="embedded" if self._embedded else "external",
                          postgres_running=bool(self._postgres_status.get("running", True)),
                          postgres_version=str(version) if version else None, catalog="ok",
                          users=n_users, workspaces=n_ws, pending_operations=n_ops,
                          extensions=extensions["installed"], extensions_missing=extensions["missing"],
                          backups_restorable_from=window[1] if window else None)

    # -- tenant connection strings (secrets: for the access layer only, never for an edge to show) ------

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
            self.deps.invalidation.bump()

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
            self.deps.invalidation.bump()
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
            async with self.agents.audited(principal, name):  # recorded like every call: refused, tool_disabled
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
                                       lambda database: self.uris.agent(workspace_id, database), catalog)

