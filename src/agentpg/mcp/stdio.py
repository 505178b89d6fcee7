"""MCP over stdio for one agent: ``agentpg mcp --token T`` (or ``AGENTPG_AGENT_TOKEN``).

The process opens its own runtime (so it works whether or not ``agentpg serve`` runs), checks the token once
before it speaks MCP (a wrong token fails the start with a one-line error), and again on every tool call,
so revoking the token or deleting the workspace stops a running stdio server's calls at once. stdout carries
the protocol only; logs go to stderr.
"""

from __future__ import annotations

from typing import Any

from mcp.server.stdio import stdio_server
from starlette.concurrency import run_in_threadpool

from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import TenantQueries
from agentpg.errors import PermissionDenied
from agentpg.mcp.server import build_server, limits_from
from agentpg.runtime import Runtime
from agentpg.tokens import Principal


async def serve_stdio(runtime: Runtime, token: str) -> None:
    """Serve MCP on stdin/stdout until the client closes them. Raises ``Unauthenticated`` or
    ``PermissionDenied`` (not an agent token) before serving anything."""
    service = runtime.service

    async def identify(_request: Any) -> Principal:
        principal = await run_in_threadpool(service.tokens.authenticate, token)
        if principal.kind != "agent":
            raise PermissionDenied("agentpg mcp needs an agent token (one workspace's); admin and user tokens "
                                   "use the REST API")
        return principal

    await identify(None)
    pools = TenantPools(PoolLimits(connect_timeout_s=runtime.settings.connect_timeout_s))
    queries = TenantQueries(pools, limits_from(runtime.settings))
    try:
        server = build_server(service, queries, identify)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await queries.close()
