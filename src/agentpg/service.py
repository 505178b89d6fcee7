"""The one façade the edges call. REST, MCP and the CLI go through here, so they cannot drift apart."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agentpg import __version__
from agentpg.catalog.models import Operation, User, UserGlobalDatabase, Workspace, WorkspaceAgentDatabase
from agentpg.errors import InvalidInput, NotFound
from agentpg.lifecycle import reconcile as reconcile_mod
from agentpg.lifecycle import users, workspaces
from agentpg.lifecycle.deps import LifecycleDeps, validate_id
from agentpg.tokens import TokenStore
from agentpg.schemas import DatabaseInfo, StatusInfo, UserInfo, UserPage, WorkspaceInfo, WorkspacePage


def _db_info(rec: UserGlobalDatabase | WorkspaceAgentDatabase | None) -> DatabaseInfo | None:
    if rec is None:
        return None
    return DatabaseInfo(name=rec.database_name, status=rec.status,  # type: ignore[arg-type]
                        ownership_type=rec.ownership_type, provider=rec.provider,  # type: ignore[arg-type]
                        created_at=rec.created_at, current_period_cost_cents=rec.current_period_cost_cents)


class Service:
    """Users, workspaces and their databases. Methods raise :mod:`agentpg.errors` exceptions only."""

    def __init__(self, deps: LifecycleDeps, tokens: TokenStore, *, embedded: bool,
                 postgres_status: dict[str, object] | None = None):
        self.deps = deps
        self.tokens = tokens
        self._embedded = embedded
        self._postgres_status = postgres_status or {}

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
        users.delete_user(self.deps, user_id)

    # -- workspaces ----------------------------------------------------------------------------------

    def create_workspace(self, user_id: str, workspace_id: str, name: str | None = None) -> WorkspaceInfo:
        workspaces.create_workspace(self.deps, user_id, workspace_id, name)
        return self.get_workspace(workspace_id)

    def get_workspace(self, workspace_id: str, *, user_id: str | None = None) -> WorkspaceInfo:
        validate_id(workspace_id, "workspace id")
        with self.deps.sessions() as s:
            ws = s.get(Workspace, workspace_id)
            if ws is None or ws.status == "provisioning" or (user_id is not None and ws.user_id != user_id):
                raise NotFound(f"workspace {workspace_id!r} does not exist")
            return self._workspace_info(s, ws)

    def _workspace_info(self, s: Session, ws: Workspace) -> WorkspaceInfo:
        rec = s.scalars(select(WorkspaceAgentDatabase)
                        .where(WorkspaceAgentDatabase.workspace_id == ws.id)).one_or_none()
        return WorkspaceInfo(id=ws.id, user_id=ws.user_id, name=ws.name, status=ws.status,
                             created_at=ws.created_at, database=_db_info(rec))

    def list_workspaces(self, user_id: str | None = None, *, limit: int = 100,
                        cursor: str | None = None) -> WorkspacePage:
        with self.deps.sessions() as s:
            query = select(Workspace).where(Workspace.status != "provisioning").order_by(Workspace.id)
            if user_id is not None:
                validate_id(user_id, "user id")
                user = s.get(User, user_id)
                if user is None or user.status == "provisioning":
                    raise NotFound(f"user {user_id!r} does not exist")
                query = query.where(Workspace.user_id == user_id)
            if cursor:
                query = query.where(Workspace.id > cursor)
            rows = list(s.scalars(query.limit(limit + 1)))
            more = len(rows) > limit
            rows = rows[:limit]
            return WorkspacePage(items=[self._workspace_info(s, w) for w in rows],
                                 next_cursor=rows[-1].id if more and rows else None)

    def delete_workspace(self, workspace_id: str, *, user_id: str | None = None) -> None:
        workspaces.delete_workspace(self.deps, workspace_id, user_id=user_id)

    # -- operations ----------------------------------------------------------------------------------

    def reconcile(self, *, fix: bool = False) -> reconcile_mod.ReconcileReport:
        return reconcile_mod.reconcile(self.deps, fix=fix)

    def status(self) -> StatusInfo:
        with self.deps.sessions() as s:
            n_users = s.scalar(select(func.count()).select_from(User)) or 0
            n_ws = s.scalar(select(func.count()).select_from(Workspace)) or 0
            n_ops = s.scalar(select(func.count()).select_from(Operation).where(Operation.state == "pending")) or 0
        version = self._postgres_status.get("version")
        return StatusInfo(version=__version__, postgres="embedded" if self._embedded else "external",
                          postgres_running=bool(self._postgres_status.get("running", True)),
                          postgres_version=str(version) if version else None, catalog="ok",
                          users=n_users, workspaces=n_ws, pending_operations=n_ops)

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
