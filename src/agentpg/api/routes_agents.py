"""The platform's side of agents: their permissions on the global database, the audit log, the MCP config.

Same auth rules as every REST route (:mod:`agentpg.api.auth`): the admin token, or the owning user's token
(another user's workspace is 404). Sync handlers: the service below is sync, FastAPI runs them in a thread.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from agentpg.api.auth import Auth, own_user, user_scope
from agentpg.api.context import Ctx
from agentpg.api.errors import problems
from agentpg.service import ID_PATTERN, AuditPage, GlobalDbPermissions, GlobalDbPermissionsSet, McpTools, McpToolsChoice

router = APIRouter(prefix="/api")

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
WorkspaceId = Annotated[str, Path(description="The platform's id for the workspace.", max_length=128)]


@router.get("/workspaces/{workspace_id}/global-database-permissions", tags=["agents"], responses=problems(409))
def get_global_database_permissions(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> GlobalDbPermissions:
    """What this workspace's agent may do in its user's global database."""
    return ctx.service.get_agent_permissions(workspace_id, user_id=user_scope(principal))


@router.put("/workspaces/{workspace_id}/global-database-permissions", tags=["agents"],
            responses=problems(409, 502, 503))
def put_global_database_permissions(workspace_id: WorkspaceId, body: GlobalDbPermissions, principal: Auth,
                                    ctx: Ctx) -> GlobalDbPermissionsSet:
    """Set what this workspace's agent may do in its user's global database; its Postgres role's grants
    change at once (the next statement it runs already sees them).

    ``can_drop_tables`` means co-owning the schema (Postgres lets only owners drop or alter), so it needs
    ``can_read``, ``can_write`` and ``can_create_tables`` and no ``allowed_tables`` (422 otherwise).
    ``allowed_tables`` limits reads and writes to tables of those names in schema ``public``; it matches by
    name, so names no table has yet are accepted (an agent may create them later) and listed in
    ``missing_tables`` with a ``warning``. 409 if the user's global database was brought by the platform (no
    per-agent roles there).
    """
    return ctx.service.set_agent_permissions(workspace_id, body, user_id=user_scope(principal))


# The same, naming the user: for the admin token when two users have a workspace of that id (workspace ids
# are per user; /api/workspaces/{id} answers 409 then).


@router.get("/users/{user_id}/workspaces/{workspace_id}/global-database-permissions", tags=["agents"])
def get_user_workspace_permissions(user_id: UserId, workspace_id: WorkspaceId, principal: Auth,
                                   ctx: Ctx) -> GlobalDbPermissions:
    """``GET /api/workspaces/{id}/global-database-permissions`` for the user's workspace ``workspace_id``."""
    return ctx.service.caller(principal).get_agent_permissions(user_id, workspace_id)


@router.put("/users/{user_id}/workspaces/{workspace_id}/global-database-permissions", tags=["agents"],
            responses=problems(409, 502, 503))
def put_user_workspace_permissions(user_id: UserId, workspace_id: WorkspaceId, body: GlobalDbPermissions,
                                   principal: Auth, ctx: Ctx) -> GlobalDbPermissionsSet:
    """``PUT /api/workspaces/{id}/global-database-permissions`` for the user's workspace ``workspace_id``."""
    return ctx.service.caller(principal).set_agent_permissions(user_id, workspace_id, body)


@router.get("/workspaces/{workspace_id}/mcp-tools", tags=["agents"], responses=problems(409))
def get_mcp_tools(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> McpTools:
    """The MCP tools this workspace's agent is offered (all of them unless a choice was stored)."""
    return ctx.service.get_mcp_tools(workspace_id, user_id=user_scope(principal))


@router.put("/workspaces/{workspace_id}/mcp-tools", tags=["agents"], responses=problems(409))
def put_mcp_tools(workspace_id: WorkspaceId, body: McpToolsChoice, principal: Auth, ctx: Ctx) -> McpTools:
    """Choose the MCP tools this workspace's agent is offered: its ``tools/list`` shows only these and a
    call of any other is a tool error, from its next request (within 2 s for other ``serve`` processes).
    ``{"tools": null}`` offers every tool again. 422 names unknown tools and the valid ones."""
    return ctx.service.set_mcp_tools(workspace_id, body.tools, user_id=user_scope(principal))


@router.get("/users/{user_id}/workspaces/{workspace_id}/mcp-tools", tags=["agents"])
def get_user_workspace_mcp_tools(user_id: UserId, workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> McpTools:
    """``GET /api/workspaces/{id}/mcp-tools`` for the user's workspace ``workspace_id``."""
    own_user(principal, user_id)
    return ctx.service.get_mcp_tools(workspace_id, user_id=user_id)


@router.put("/users/{user_id}/workspaces/{workspace_id}/mcp-tools", tags=["agents"])
def put_user_workspace_mcp_tools(user_id: UserId, workspace_id: WorkspaceId, body: McpToolsChoice,
                                 principal: Auth, ctx: Ctx) -> McpTools:
    """``PUT /api/workspaces/{id}/mcp-tools`` for the user's workspace ``workspace_id``."""
    own_user(principal, user_id)
    return ctx.service.set_mcp_tools(workspace_id, body.tools, user_id=user_id)


@router.get("/users/{user_id}/audit", tags=["agents"])
def list_audit(user_id: UserId, principal: Auth, ctx: Ctx,
               workspace_id: Annotated[str | None, Query(pattern=ID_PATTERN,
                                                         description="Only this workspace's calls.")] = None,
               limit: Annotated[int, Query(ge=1, le=500, description="Entries per page.")] = 100,
               cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,19}$",
                                                   description="`next_cursor` of the previous page.")] = None,
               ) -> AuditPage:
    """The user's agents' MCP calls, newest first: workspace, database, tool, statement fingerprint and
    normalised text (no literal values), rows, duration and outcome."""
    return ctx.service.caller(principal).list_audit(user_id, workspace_id=workspace_id, limit=limit, cursor=cursor)


@router.get("/workspaces/{workspace_id}/mcp-config", tags=["agents"], responses=problems(409))
def mcp_config(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx, request: Request) -> dict[str, Any]:
    """The MCP client configurations that reach this workspace's databases, each a whole ``mcpServers``
    document to paste: ``http`` (streamable HTTP; also at the top level as ``mcpServers``) and ``stdio`` (the
    absolute ``agentpg`` command and the environment ``agentpg mcp`` needs, AGENTPG_HOME included). The token
    is a placeholder (``<AGENT_TOKEN>``): the workspace's first token came with its creation; issue another
    with ``POST /api/workspaces/{id}/tokens``."""
    base = ctx.settings.public_url or str(request.base_url)
    return ctx.service.mcp_config(workspace_id, base, user_id=user_scope(principal))


@router.get("/users/{user_id}/workspaces/{workspace_id}/mcp-config", tags=["agents"])
def user_workspace_mcp_config(user_id: UserId, workspace_id: WorkspaceId, principal: Auth, ctx: Ctx,
                              request: Request) -> dict[str, Any]:
    """``GET /api/workspaces/{id}/mcp-config`` for the user's workspace ``workspace_id``."""
    own_user(principal, user_id)
    base = ctx.settings.public_url or str(request.base_url)
    return ctx.service.mcp_config(workspace_id, base, user_id=user_id)
