"""A user's MCP server configs for the gateway (docs/gateway.md): ``{command, args, env}`` of stdio servers
with ``${NAME}`` placeholders, resolved only when agentpg spawns the server for one of the user's agents.

Same auth rules as every REST route: the admin token, or the user's own token (another user's is 404).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from agentpg.api.auth import Auth, own_user
from agentpg.api.context import Ctx
from agentpg.api.errors import problems
from agentpg.gateway.configs import NAME_PATTERN, McpServerInfo, McpServerList, McpServerSpec

router = APIRouter(prefix="/api")

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]
ServerName = Annotated[str, Path(pattern=NAME_PATTERN, description="a-z 0-9 . _ -, at most 64.")]


@router.get("/users/{user_id}/mcp-servers", tags=["mcp-servers"])
def list_mcp_servers(user_id: UserId, principal: Auth, ctx: Ctx) -> McpServerList:
    """The user's MCP server configs and the built-in defaults (``postgres-global``, ``postgres-agent``:
    agentpg's own MCP server). Placeholders are shown as written, never resolved; env values other than
    placeholders are write-only (``<hidden>``)."""
    own_user(principal, user_id)
    return ctx.service.list_mcp_servers(user_id)


@router.put("/users/{user_id}/mcp-servers/{name}", tags=["mcp-servers"],
            responses={201: {"model": McpServerInfo, "description": "Created."}, **problems(409)})
def put_mcp_server(user_id: UserId, name: ServerName, body: McpServerSpec, principal: Auth, ctx: Ctx,
                   response: Response) -> McpServerInfo:
    """Create (201) or replace (200) a config. 422 for a command outside the operator's allow-list
    (``AGENTPG_GATEWAY_ALLOWED_COMMANDS``) or a ``${NAME}`` that is not one of the user's env vars
    (``GLOBAL_DB_URL`` and ``AGENT_DB_URL`` always are). Stored sealed; agents reach it at
    ``/mcp/servers/{name}`` or with ``agentpg mcp --server NAME``. A running server picks the change up on
    its next call."""
    own_user(principal, user_id)
    info, created = ctx.service.put_mcp_server(user_id, name, body,
                                               list(ctx.runtime.settings.gateway_allowed_commands))
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return info


@router.delete("/users/{user_id}/mcp-servers/{name}", status_code=status.HTTP_204_NO_CONTENT,
               tags=["mcp-servers"], responses=problems(409))
def delete_mcp_server(user_id: UserId, name: ServerName, principal: Auth, ctx: Ctx) -> Response:
    """Delete a config (a built-in default cannot be deleted: 409; a config of that name overrides it)."""
    own_user(principal, user_id)
    ctx.service.delete_mcp_server(user_id, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
