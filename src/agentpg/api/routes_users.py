"""Users, workspaces, tokens and env vars: the platform's provisioning routes.

Sync handlers (FastAPI runs them in its thread pool) because the service below is sync; the few that must
also close tenant pools are async and hand the service call to the thread pool themselves.
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Body, Path, Query, Request, Response, status
from starlette.concurrency import run_in_threadpool

from agentpg.api.auth import Auth, own_user
from agentpg.api.context import AppContext, Ctx
from agentpg.api.errors import problems
from agentpg.api.models import EnvValue, TokenOut, WorkspaceCreated
from agentpg.service import (
    ENV_NAME_PATTERN,
    ID_PATTERN,
    EnvVarInfo,
    EnvVarList,
    IssuedToken,
    Principal,
    TokenCreate,
    UserCreate,
    UserInfo,
    UserPage,
    WorkspaceCreate,
    WorkspaceInfo,
    WorkspacePage,
    client_configs,
    public_workspace_id,
)

router = APIRouter(prefix="/api")

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
WorkspaceId = Annotated[str, Path(description="The platform's id for the workspace.", max_length=128)]
PageLimit = Annotated[int, Query(ge=1, le=500, description="Items per page.")]
Cursor = Annotated[str | None, Query(pattern=ID_PATTERN, description="`next_cursor` of the previous page.")]
EnvName = Annotated[str, Path(pattern=ENV_NAME_PATTERN, description="Upper-case letters, digits and _.")]


def _token_out(issued: IssuedToken, name: str | None) -> TokenOut:
    return TokenOut(id=issued.id, kind=issued.kind, token=issued.secret,  # type: ignore[arg-type]
                    user_id=issued.user_id, name=name,
                    workspace_id=public_workspace_id(issued.workspace_id) if issued.workspace_id else None,
                    created_at=issued.created_at)


# -- users ----------------------------------------------------------------------------------------------


@router.post("/users", status_code=status.HTTP_201_CREATED, tags=["users"], responses=problems(409, 502, 503))
def register_user(body: UserCreate, principal: Auth, ctx: Ctx) -> UserInfo:
    """Register a user and create its global database (admin only). Fails whole, leaving nothing behind."""
    caller = ctx.service.caller(principal)
    with ctx.metrics.provisioning_timer("register_user"):
        return caller.register_user(body.id, body.email)


@router.get("/users", tags=["users"])
def list_users(principal: Auth, ctx: Ctx, limit: PageLimit = 100, cursor: Cursor = None) -> UserPage:
    """All users by id, a page at a time (admin only)."""
    return ctx.service.caller(principal).list_users(limit=limit, cursor=cursor)


@router.get("/users/{user_id}", tags=["users"])
async def get_user(user_id: UserId, principal: Auth, ctx: Ctx) -> UserInfo:
    """A user and its global database's public info."""
    # Async with one explicit hop: for a sync route FastAPI also validates the answer in its thread pool,
    # a second hop (~0.1-0.3 ms) for a model that validates in microseconds.
    return await run_in_threadpool(ctx.service.caller(principal).get_user, user_id)


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"],
               responses=problems(409, 502, 503))
async def delete_user(user_id: UserId, principal: Auth, ctx: Ctx) -> Response:
    """Delete a user, its global database and every workspace with its agent database (admin only). With
    ``AGENTPG_BACKUP_PURGE_ON_USER_DELETE=rebase`` the answer carries ``Agentpg-Backup-Purge: scheduled``: the
    backups are rebased in the background (docs/undo.md, "Deleting a user")."""
    caller = ctx.service.caller(principal)
    held = await run_in_threadpool(caller.check_delete_user, user_id)  # NotFound/403 before any work
    with ctx.metrics.provisioning_timer("delete_user"):
        purge = await run_in_threadpool(caller.delete_user, user_id)
    await ctx.service.forget_connections(held)  # the drop terminated them; the pools let go too
    headers = {"Agentpg-Backup-Purge": "scheduled"} if purge else None
    return Response(status_code=status.HTTP_204_NO_CONTENT, headers=headers)


@router.post("/users/{user_id}/tokens", status_code=status.HTTP_201_CREATED, tags=["tokens"])
def issue_user_token(user_id: UserId, principal: Auth, ctx: Ctx,
                     body: Annotated[TokenCreate | None, Body()] = None) -> TokenOut:
    """Issue a user token (admin only): it reaches this user's routes and nothing else. Shown once."""
    name = body.name if body else None
    return _token_out(ctx.service.caller(principal).issue_user_token(user_id, name), name)


# -- workspaces -----------------------------------------------------------------------------------------


@router.post("/users/{user_id}/workspaces", status_code=status.HTTP_201_CREATED, tags=["workspaces"],
             responses=problems(409, 502, 503))
def create_workspace(user_id: UserId, body: WorkspaceCreate, principal: Auth, ctx: Ctx,
                     request: Request) -> WorkspaceCreated:
    """Create a workspace with its agent database; the answer carries its first agent token, shown once,
    and the MCP client configurations (HTTP and stdio) with that token filled in."""
    caller = ctx.service.caller(principal)
    with ctx.metrics.provisioning_timer("create_workspace"):
        info, issued = caller.create_workspace_with_token(user_id, body.id, body.name)
    base = ctx.settings.public_url or str(request.base_url)
    configs = client_configs(ctx.settings, base, issued.secret)
    return WorkspaceCreated(**info.model_dump(), agent_token=_token_out(issued, None), mcp_config=configs)


@router.get("/users/{user_id}/workspaces", tags=["workspaces"])
def list_workspaces(user_id: UserId, principal: Auth, ctx: Ctx, limit: PageLimit = 100,
                    cursor: Cursor = None) -> WorkspacePage:
    """The user's workspaces by id, a page at a time."""
    return ctx.service.caller(principal).list_workspaces(user_id, limit=limit, cursor=cursor)


# Workspace ids are per user (agentpg.lifecycle.workspace_ids): /api/workspaces/{id} is the workspace of the
# caller's user for a user token, and for the admin token the one workspace any user has by that id (409 when
# two users have one). /api/users/{user_id}/workspaces/{id} names the user, for the admin token's sake.


@router.get("/workspaces/{workspace_id}", tags=["workspaces"], responses=problems(409))
def get_workspace(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> WorkspaceInfo:
    """A workspace and its agent database's public info."""
    return ctx.service.caller(principal).get_workspace(None, workspace_id)


@router.get("/users/{user_id}/workspaces/{workspace_id}", tags=["workspaces"])
def get_user_workspace(user_id: UserId, workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> WorkspaceInfo:
    """The user's workspace ``workspace_id`` (the same as ``GET /api/workspaces/{id}``, naming the user)."""
    return ctx.service.caller(principal).get_workspace(user_id, workspace_id)


async def _delete_workspace(ctx: AppContext, principal: Principal, user_id: str | None,
                            workspace_id: str) -> Response:
    caller = ctx.service.caller(principal)
    owner, held = await run_in_threadpool(caller.check_delete_workspace, user_id, workspace_id)
    with ctx.metrics.provisioning_timer("delete_workspace"):
        await run_in_threadpool(caller.delete_workspace, owner, workspace_id)
    await ctx.service.forget_connections(held)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/workspaces/{workspace_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["workspaces"],
               responses=problems(409, 502, 503))
async def delete_workspace(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> Response:
    """Delete a workspace, its agent database and its role in the global database; its tokens stop working."""
    return await _delete_workspace(ctx, principal, None, workspace_id)


@router.delete("/users/{user_id}/workspaces/{workspace_id}", status_code=status.HTTP_204_NO_CONTENT,
               tags=["workspaces"], responses=problems(409, 502, 503))
async def delete_user_workspace(user_id: UserId, workspace_id: WorkspaceId, principal: Auth, ctx: Ctx) -> Response:
    """Delete the user's workspace ``workspace_id`` (``DELETE /api/workspaces/{id}``, naming the user)."""
    return await _delete_workspace(ctx, principal, user_id, workspace_id)


@router.post("/workspaces/{workspace_id}/tokens", status_code=status.HTTP_201_CREATED, tags=["tokens"],
             responses=problems(409))
def issue_agent_token(workspace_id: WorkspaceId, principal: Auth, ctx: Ctx,
                      body: Annotated[TokenCreate | None, Body()] = None) -> TokenOut:
    """Issue another agent token for the workspace (for MCP only). Shown once."""
    name = body.name if body else None
    return _token_out(ctx.service.caller(principal).issue_agent_token(None, workspace_id, name), name)


@router.post("/users/{user_id}/workspaces/{workspace_id}/tokens", status_code=status.HTTP_201_CREATED,
             tags=["tokens"], responses=problems(409))
def issue_user_workspace_agent_token(user_id: UserId, workspace_id: WorkspaceId, principal: Auth, ctx: Ctx,
                                     body: Annotated[TokenCreate | None, Body()] = None) -> TokenOut:
    """Issue another agent token for the user's workspace (``POST /api/workspaces/{id}/tokens``, naming
    the user). Shown once."""
    name = body.name if body else None
    return _token_out(ctx.service.caller(principal).issue_agent_token(user_id, workspace_id, name), name)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["tokens"])
def revoke_token(token_id: UUID, principal: Auth, ctx: Ctx) -> Response:
    """Revoke a token at once. A user token may revoke its own user's tokens (agent tokens included)."""
    ctx.service.caller(principal).revoke_token(str(token_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- env vars -------------------------------------------------------------------------------------------


@router.get("/users/{user_id}/env", tags=["env"])
def list_env(user_id: UserId, principal: Auth, ctx: Ctx) -> EnvVarList:
    """Names of the user's env vars (and its workspaces'), never values. Managed ones are flagged."""
    own_user(principal, user_id)
    return ctx.service.list_env(user_id)


@router.put("/users/{user_id}/env/{name}", tags=["env"], responses={201: {"model": EnvVarInfo,
                                                                         "description": "Created."}})
def put_env(user_id: UserId, name: EnvName, body: EnvValue, principal: Auth, ctx: Ctx,
            response: Response) -> EnvVarInfo:
    """Create (201) or replace (200) one of the user's env vars; the value is sealed and never shown again.
    ``GLOBAL_DB_URL`` and ``AGENT_DB_URL`` are managed by agentpg: 403."""
    own_user(principal, user_id)
    info, created = ctx.service.put_env(user_id, name, body.value)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return info


@router.delete("/users/{user_id}/env/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["env"])
def delete_env(user_id: UserId, name: EnvName, principal: Auth, ctx: Ctx) -> Response:
    """Delete one of the user's env vars. ``GLOBAL_DB_URL`` and ``AGENT_DB_URL`` are managed by agentpg: 403."""
    own_user(principal, user_id)
    ctx.service.delete_env(user_id, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
