"""MCP over stdio for one agent: ``agentpg mcp --token T`` (or ``AGENTPG_AGENT_TOKEN``).

The process opens its own runtime (so it works whether or not ``agentpg serve`` runs), checks the token once
before it speaks MCP (a wrong token fails the start with a one-line error), and again on every tool call
(a success is remembered for 2 s), so revoking the token or deleting the workspace stops a running stdio
server's calls within 2 s. stdout carries the protocol only; logs go to stderr.

When stdin and stdout are pipes or sockets (how MCP clients start servers), the transport is
:func:`pipe_stdio`: asyncio reads and writes the pipes directly, where the SDK's ``stdio_server`` hands every
line read and every write and flush to a worker thread (three thread round trips per call). Anything else
(a terminal, a file) uses the SDK's.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
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
        principal = service.tokens.cached(token)  # re-checked against the catalog at most every 2 s
        if principal is None:
            principal = await run_in_threadpool(service.tokens.authenticate, token)
        if principal.kind != "agent":
            raise PermissionDenied("agentpg mcp needs an agent token (one workspace's); admin and user tokens "
                                   "use the REST API")
        return principal

    await identify(None)
    pools = TenantPools(PoolLimits.from_settings(runtime.settings))
    queries = TenantQueries(pools, limits_from(runtime.settings))
    try:
        server = build_server(service, queries, identify)
        async with _transport() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await run_in_threadpool(service.audit_writer.close)  # write-behind: flush what is queued
        await queries.close()


Streams = tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _transport() -> AbstractAsyncContextManager[Streams]:
    if _is_pipe(sys.stdin.fileno()) and _is_pipe(sys.stdout.fileno()):
        return pipe_stdio()
    return stdio_server()


@asynccontextmanager
async def pipe_stdio(max_line: int = 256 * 2**20) -> AsyncIterator[Streams]:
    """The SDK's stdio transport (newline-delimited JSON-RPC on stdin/stdout), on asyncio pipe transports."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=max_line)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    w_transport, w_protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    writer = asyncio.StreamWriter(w_transport, w_protocol, None, loop)
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def stdin_reader() -> None:
        async with read_writer:
            while True:
                try:
                    line = await reader.readline()
                except ValueError as exc:  # a line longer than max_line: refused like a malformed one
                    await read_writer.send(exc)
                    continue
                if not line:
                    return
                try:
                    message = types.JSONRPCMessage.model_validate_json(line)
                except Exception as exc:
                    await read_writer.send(exc)
                    continue
                await read_writer.send(SessionMessage(message))

    async def stdout_writer() -> None:
        async with write_reader:
            async for session_message in write_reader:
                data = session_message.message.model_dump_json(by_alias=True, exclude_none=True)
                writer.write(data.encode() + b"\n")
                await writer.drain()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stdin_reader)
            tg.start_soon(stdout_writer)
            yield read_stream, write_stream
    finally:
        w_transport.close()
