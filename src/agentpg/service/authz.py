"""Who may do what: the tenant rules every edge applies, written once.

* a user token reaches only its own user; another user's resource is "not found" (404), exactly as a
  missing one, so a token cannot probe which ids exist. Scope is checked before anything else about the
  resource, and only then may a call be refused for needing the admin token (403);
* the admin token reaches everything; agent tokens reach the agent tools only (MCP).

:class:`Caller` (``service.caller(principal)``) is the service seen by one authenticated person (the REST
API's bearer, the console's session): the same scoped calls for both edges, so the console cannot drift
from the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentpg.access.audit import AuditFilter, AuditPage
from agentpg.access.permissions import GlobalDbPermissions, GlobalDbPermissionsSet
from agentpg.errors import NotFound, PermissionDenied
from agentpg.schemas import UsageReport, UserInfo, UserPage, WorkspaceInfo, WorkspacePage
from agentpg.service.tenant import HeldConnections
from agentpg.tokens import IssuedToken, Principal

if TYPE_CHECKING:
    from agentpg.service.core import Service


def not_an_agent(principal: Principal) -> Principal:
    """``PermissionDenied`` for an agent token: agents reach MCP only."""
    if principal.kind == "agent":
        raise PermissionDenied("agent tokens reach only the MCP endpoint; the REST API needs the admin token "
                               "or a user token")
    return principal


def own_user(principal: Principal, user_id: str) -> None:
    """A user token on another user's resources: "not found", exactly as for an id that does not exist."""
    if not principal.is_admin and principal.user_id != user_id:
        raise NotFound(f"user {user_id!r} does not exist")


def require_admin(principal: Principal, what: str) -> None:
    if not principal.is_admin:
        raise PermissionDenied(f"{what} needs the admin token")


def user_scope(principal: Principal) -> str | None:
    """The ``user_id=`` a service call is scoped to: none for the admin, the token's user otherwise."""
    return None if principal.is_admin else principal.user_id


class Caller:
    """The service's user and workspace calls on behalf of one person, each after the rules above.
    Raises what the service raises, plus ``NotFound``/``PermissionDenied`` from the rules."""

    def __init__(self, service: Service, principal: Principal) -> None:
        self._service = service
        self.principal = not_an_agent(principal)

    def _own(self, user_id: str) -> None:
        own_user(self.principal, user_id)

    # -- users ---------------------------------------------------------------------------------------

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> UserPage:
        require_admin(self.principal, "listing users")
        return self._service.list_users(limit=limit, cursor=cursor)

    def register_user(self, user_id: str, email: str | None = None) -> UserInfo:
        require_admin(self.principal, "registering a user")
        return self._service.register_user(user_id, email)

    def get_user(self, user_id: str) -> UserInfo:
        self._own(user_id)
        return self._service.get_user(user_id)

    def check_delete_user(self, user_id: str) -> HeldConnections:
        """The checks of :meth:`delete_user` (``NotFound`` first), and the connections to let go after it."""
        self._own(user_id)
        require_admin(self.principal, "deleting a user")
        self._service.get_user(user_id)
        return self._service.held_connections(user_id)

    def delete_user(self, user_id: str) -> bool:
        """As :meth:`Service.delete_user` (whether a purge of the backups was scheduled)."""
        self._own(user_id)
        require_admin(self.principal, "deleting a user")
        return self._service.delete_user(user_id)

    def usage(self, user_id: str) -> UsageReport:
        self._own(user_id)
        return self._service.usage(user_id)

    def list_audit(self, user_id: str, *, workspace_id: str | None = None, limit: int = 100,
                   cursor: str | None = None, where: AuditFilter | None = None) -> AuditPage:
        self._own(user_id)
        return self._service.list_audit(user_id, workspace_id=workspace_id, limit=limit, cursor=cursor, where=where)

    # -- tokens --------------------------------------------------------------------------------------

    def issue_user_token(self, user_id: str, name: str | None = None) -> IssuedToken:
        self._own(user_id)
        require_admin(self.principal, "issuing a user token")
        return self._service.issue_user_token(user_id, name)

    def issue_agent_token(self, user_id: str | None, workspace_id: str, name: str | None = None) -> IssuedToken:
        """For ``user_id``'s workspace, or (``None``) the caller's user's (any user's for the admin)."""
        return self._service.issue_agent_token(workspace_id, user_id=self._workspace_scope(user_id), name=name)

    def revoke_token(self, token_id: str) -> None:
        """A user token may revoke its own user's tokens (agent tokens included)."""
        self._service.revoke_token(token_id, user_id=user_scope(self.principal))

    # -- workspaces ----------------------------------------------------------------------------------

    def _workspace_scope(self, user_id: str | None) -> str | None:
        """Whose workspace a call names: ``user_id``'s (workspace ids are per user), else the caller's."""
        if user_id is None:
            return user_scope(self.principal)
        self._own(user_id)
        return user_id

    def list_workspaces(self, user_id: str, *, limit: int = 100, cursor: str | None = None) -> WorkspacePage:
        self._own(user_id)
        return self._service.list_workspaces(user_id, limit=limit, cursor=cursor)

    def get_workspace(self, user_id: str | None, workspace_id: str) -> WorkspaceInfo:
        return self._service.get_workspace(workspace_id, user_id=self._workspace_scope(user_id))

    def create_workspace_with_token(self, user_id: str, workspace_id: str,
                                    name: str | None = None) -> tuple[WorkspaceInfo, IssuedToken]:
        self._own(user_id)
        return self._service.create_workspace_with_token(user_id, workspace_id, name)

    def check_delete_workspace(self, user_id: str | None, workspace_id: str) -> tuple[str, HeldConnections]:
        """The workspace's user (``NotFound`` first) and the connections to let go after the delete."""
        info = self.get_workspace(user_id, workspace_id)
        return info.user_id, self._service.held_connections(info.user_id, workspace_id)

    def delete_workspace(self, owner: str, workspace_id: str) -> None:
        """After :meth:`check_delete_workspace` (``owner`` is what it returned)."""
        self._own(owner)
        self._service.delete_workspace(workspace_id, user_id=owner)

    def get_agent_permissions(self, user_id: str | None, workspace_id: str) -> GlobalDbPermissions:
        return self._service.get_agent_permissions(workspace_id, user_id=self._workspace_scope(user_id))

    def set_agent_permissions(self, user_id: str | None, workspace_id: str,
                              permissions: GlobalDbPermissions) -> GlobalDbPermissionsSet:
        return self._service.set_agent_permissions(workspace_id, permissions,
                                                   user_id=self._workspace_scope(user_id))
