"""The gateway over stdio for one agent: ``agentpg mcp --token T --server NAME``.

Like ``agentpg mcp``: its own runtime, the token checked before speaking MCP (and on every request), stdout
for the protocol only. The server name must be one of the user's configs or a built-in default.
"""

from __future__ import annotations

from typing import Any

from mcp.server.stdio import stdio_server
from starlette.concurrency import run_in_threadpool

from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import TenantQueries
from agentpg.errors import PermissionDenied
from agentpg.gateway.proxy import Gateway, build_gateway_server
from agentpg.mcp.server import limits_from
from agentpg.runtime import Runtime
from agentpg.tokens import Principal


async def serve_gateway_stdio(runtime: Runtime, token: str, name: str) -> None:
    """Relay MCP server ``name`` on stdin/stdout until the client closes them. Raises ``Unauthenticated``,
    ``PermissionDenied`` or ``NotFound`` (no such config) before serving anything."""
    service = runtime.service

    async def principal() -> Principal:
        found = await run_in_threadpool(service.tokens.authenticate, token)
        if found.kind != "agent":
            raise PermissionDenied("agentpg mcp --server needs an agent token (one workspace's)")
        return found

    async def identify(_request: Any) -> tuple[Principal, str]:
        return await principal(), name

    queries = TenantQueries(TenantPools(PoolLimits(connect_timeout_s=runtime.settings.connect_timeout_s)),
                            limits_from(runtime.settings), terminate=service.reaper.terminate)
    gateway = Gateway(service, runtime.settings, queries)
    try:
        await gateway.target(await principal(), name)
    except BaseException:
        await queries.close()
        raise
    try:
        server = build_gateway_server(gateway, identify)
        async with gateway.children.run(), stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await queries.close()
