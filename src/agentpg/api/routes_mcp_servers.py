"""A user's MCP server configs for the gateway (docs/gateway.md): ``{server, params}``, one of the servers
the operator's catalog (``AGENTPG_GATEWAY_CATALOG``) approves and the params that entry declares. The user
never sends a command; the entry's placeholders are resolved only when agentpg spawns the server (sandboxed)
for one of the user's agents.

Same auth rules as every REST route: the admin token, or the user's own token (another user's is 404).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from agentpg.api.auth import Auth, own_user
from agentpg.api.context import Ctx
from agentpg.api.errors import problems
from agentpg.service import NAME_PATTERN, McpServerInfo, McpServerList, McpServerSpec
from agentpg.service.gateway_catalog import Catalog, load_catalog

router = APIRouter(prefix="/api")

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
ServerName = Annotated[str, Path(pattern=NAME_PATTERN, description="a-z 0-9 . _ -, at most 64.")]


def _catalog(ctx: Ctx) -> Catalog:
    settings = ctx.settings
    return load_catalog(settings.gateway_catalog, settings.home)


@router.get("/users/{user_id}/mcp-servers", tags=["mcp-servers"])
def list_mcp_servers(user_id: UserId, principal: Auth, ctx: Ctx) -> McpServerList:
    """The user's MCP server configs and the built-in defaults (``postgres-global``, ``postgres-agent``:
    agentpg's own MCP server). Secret params are write-only (``<hidden>``). ``kind: refused`` marks a config
    that will not run (stored in the old command form, or no longer valid for the catalog), with why."""
    own_user(principal, user_id)
    return ctx.service.list_mcp_servers(user_id, _catalog(ctx))


@router.put("/users/{user_id}/mcp-servers/{name}", tags=["mcp-servers"],
            responses={201: {"model": McpServerInfo, "description": "Created."}, **problems(409)})
def put_mcp_server(user_id: UserId, name: ServerName, body: McpServerSpec, principal: Auth, ctx: Ctx,
                   response: Response) -> McpServerInfo:
    """Create (201) or replace (200) a config. 422 for a server that is not in the operator's catalog, a
    param the entry does not declare, a missing one, or a value that does not match the entry's pattern
    (the message names what is allowed); any other field (``command``, ``args``, ``env``) is 422 too. Stored
    sealed; agents reach it at ``/mcp/servers/{name}`` or with ``agentpg mcp --server NAME``, where it runs
    sandboxed. A running server picks the change up on its next call."""
    own_user(principal, user_id)
    info, created = ctx.service.put_mcp_server(user_id, name, body, _catalog(ctx))
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return info


@router.delete("/users/{user_id}/mcp-servers/{name}", status_code=status.HTTP_204_NO_CONTENT,
               tags=["mcp-servers"], responses=problems(409))
def delete_mcp_server(user_id: UserId, name: ServerName, principal: Auth, ctx: Ctx) -> Response:
    """Delete a config (a built-in default cannot be deleted: 409; a config of that name overrides it)."""
    own_user(principal, user_id)
    ctx.service.delete_mcp_server(user_id, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
