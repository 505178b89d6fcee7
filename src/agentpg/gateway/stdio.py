"""The gateway over stdio for one agent: ``agentpg mcp --token T --server NAME``.

Like ``agentpg mcp``: its own runtime, the token checked before speaking MCP (and on every request), stdout
for the protocol only. The server name must be one of the user's configs or a built-in default.
"""

from __future__ import annotations

from typing import Any

from mcp.server.stdio import stdio_server
from starlette.concurrency import run_in_threadpool

from agentpg.errors import PermissionDenied
from agentpg.gateway.proxy import Gateway, ToolsServer, build_gateway_server
from agentpg.service import Principal, Service


async def serve_gateway_stdio(service: Service, token: str, name: str, tools_server: ToolsServer) -> None:
    """Relay MCP server ``name`` on stdin/stdout until the client closes them. Raises ``Unauthenticated``,
    ``PermissionDenied`` or ``NotFound`` (no such config) before serving anything. The service's tenant
    access is attached by the caller (the assembly, :mod:`agentpg.app.stdio`)."""

    async def principal() -> Principal:
        found = await run_in_threadpool(service.tokens.authenticate, token)
        if found.kind != "agent":
            raise PermissionDenied("agentpg mcp --server needs an agent token (one workspace's)")
        return found

    async def identify(_request: Any) -> tuple[Principal, str]:
        return await principal(), name

    gateway = Gateway(service, service.settings, tools_server)
    await gateway.target(await principal(), name)
    server = build_gateway_server(gateway, identify)
    async with gateway.children.run(), stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())
