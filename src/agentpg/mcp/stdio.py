"""MCP over stdio for one agent: ``agentpg mcp --token T`` (or ``AGENTPG_AGENT_TOKEN``).

The process opens its own runtime attached to the agentpg ``agentpg serve`` set up (it creates no home and
starts no server: :func:`agentpg.app.runtime.attach_dsn` says what is missing), checks the token once
before it speaks MCP (a wrong token fails the start with a one-line error), and again on every tool call
(a success is remembered for 2 s), so revoking the token or deleting the workspace stops a running stdio
server's calls within 2 s. stdout carries the protocol only; logs go to stderr.

When stdin and stdout are pipes or sockets (how MCP clients start servers), the protocol is served by
:mod:`agentpg.mcp.jsonrpc`: plain JSON lines on asyncio pipe transports, several calls in flight,
cancellation, answers flushed on EOF. Anything else (a terminal, a file) uses the SDK's ``stdio_server``
and ``Server.run``; both run the same :class:`~agentpg.mcp.server.ToolCalls`.
"""

from __future__ import annotations

import os
import stat
import sys
from typing import Any

from mcp.server.stdio import stdio_server
from starlette.concurrency import run_in_threadpool

from agentpg.errors import PermissionDenied
from agentpg.mcp.jsonrpc import serve_pipes
from agentpg.mcp.server import ToolCalls, build_server
from agentpg.service import Principal, Service

_EOF_EXTRA_S = 3.0
"""On EOF, calls in flight get the statement timeout, its cancel grace and this much to finish."""


async def serve_stdio(service: Service, token: str) -> None:
    """Serve MCP on stdin/stdout until the client closes them. Raises ``Unauthenticated`` or
    ``PermissionDenied`` (not an agent token) before serving anything. The service's tenant access is
    attached (and closed) by the caller, the assembly (:mod:`agentpg.app.stdio`)."""

    async def identify(_request: Any) -> Principal:
        principal = service.tokens.cached(token)  # re-checked against the catalog at most every 2 s
        if principal is None:
            principal = await run_in_threadpool(service.tokens.authenticate, token)
        if principal.kind != "agent":
            raise PermissionDenied("agentpg mcp needs an agent token (one workspace's); admin and user tokens "
                                   "use the REST API")
        return principal

    await identify(None)
    limits = service.agents.limits()
    try:
        if _is_pipe(sys.stdin.fileno()) and _is_pipe(sys.stdout.fileno()):
            await serve_pipes(ToolCalls(service, identify),
                              drain_timeout_s=limits.statement_timeout_s + limits.cancel_grace_s + _EOF_EXTRA_S,
                              max_concurrent_calls=service.settings.mcp_max_concurrent_calls)
        else:
            server = build_server(service, identify)
            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())
    finally:
        await run_in_threadpool(service.audit_writer.close)  # write-behind: flush what is queued


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
