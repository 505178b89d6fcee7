"""The stdio JSON-RPC loop (agentpg.mcp.jsonrpc), spoken to in raw JSON lines: the real ``agentpg mcp`` over
asyncio subprocess pipes, and the loop itself on a socket pair for what needs a small line limit.

tests/test_mcp_stdio.py checks the same server with the SDK's client (protocol conformance); these check
what that client never sends: errors, negotiation, concurrency, cancellation and EOF.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import leakscan
import psycopg
import pytest
from mcp import types
from mcp.types.version import LATEST_HANDSHAKE_VERSION
from mcp_support import Tenants

from agentpg import __version__
from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import QueryLimits, TenantQueries
from agentpg.app.runtime import Runtime
from agentpg.mcp import tools
from agentpg.mcp.jsonrpc import JsonRpcSession
from agentpg.mcp.server import INSTRUCTIONS, ToolCalls
from agentpg.service import Service, TenantAccess
from agentpg.tokens import Principal

pytestmark = pytest.mark.anyio

Message = dict[str, Any]


class RawClient:
    """Newline-delimited JSON-RPC over a reader/writer pair; every line received goes to the leak scanner."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, message: Any) -> None:
        self.writer.write(message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n")
        await self.writer.drain()

    async def receive(self, timeout: float = 10) -> Message:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line.endswith(b"\n"), f"the server closed stdout early: {line!r}"
        leakscan.record("raw mcp stdout", line)
        message = json.loads(line)
        assert isinstance(message, dict) and message["jsonrpc"] == "2.0", message
        return message

    async def request(self, request_id: int | str, method: str, params: Any = None) -> Message:
        """Send a request; the next message received must answer it (so nothing stray came before)."""
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method,
                         **({} if params is None else {"params": params})})
        return await self.expect(request_id)

    async def expect(self, request_id: int | str | None) -> Message:
        message = await self.receive()
        assert message.get("id") == request_id, message
        return message

    async def call(self, request_id: int | str, sql: str) -> None:
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                         "params": {"name": "query", "arguments": {"database": "agent", "sql": sql}}})

    async def initialize(self, version: str = "2025-06-18") -> Message:
        result = await self.request(0, "initialize", {"protocolVersion": version, "capabilities": {},
                                                      "clientInfo": {"name": "raw", "version": "1"}})
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result


def error_code(message: Message) -> int:
    assert "result" not in message, message
    return int(message["error"]["code"])


@asynccontextmanager
async def agentpg_mcp(home: Path, token: str, statement_timeout_s: float) -> AsyncIterator[
        tuple[RawClient, asyncio.subprocess.Process]]:
    """The real ``agentpg mcp`` console script on pipes; its stderr is checked for leaks afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=str(home), AGENTPG_AGENT_TOKEN=token,
               AGENTPG_MCP_STATEMENT_TIMEOUT_S=str(statement_timeout_s))
    with tempfile.TemporaryFile() as stderr:
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("agentpg")), "mcp", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env, limit=2**22)
        assert process.stdin is not None and process.stdout is not None
        try:
            yield RawClient(process.stdout, process.stdin), process
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            stderr.seek(0)
            leakscan.record("raw mcp stderr", stderr.read())


def active_statements(admin: psycopg.Connection[tuple[object, ...]], marker: str) -> int:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
                        "AND pid <> pg_backend_pid()", (f"%{marker}%",)).fetchone()
    assert row is not None
    return int(str(row[0]))


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


async def test_lifecycle_errors_and_results(agentpg_home: Path, tenants: Tenants) -> None:
    async with agentpg_mcp(agentpg_home, tenants.token_a, 5) as (client, _):
        refused = await client.request(1, "tools/list")
        assert error_code(refused) == types.INVALID_REQUEST and "initialize" in refused["error"]["message"]
        assert (await client.request(2, "ping"))["result"] == {}  # allowed before initialize

        # An old version the SDK supports is echoed; an unknown one is answered with the latest.
        old = (await client.initialize("2024-11-05"))["result"]
        assert old == {"protocolVersion": "2024-11-05", "capabilities": {"tools": {"listChanged": False}},
                       "serverInfo": {"name": "agentpg", "version": __version__}, "instructions": INSTRUCTIONS}
        unknown = await client.request(3, "initialize", {"protocolVersion": "1999-01-01", "capabilities": {},
                                                         "clientInfo": {"name": "raw", "version": "1"}})
        assert unknown["result"]["protocolVersion"] == LATEST_HANDSHAKE_VERSION

        listed = (await client.request(4, "tools/list"))["result"]
        # The 2025 wire form: no resultType/ttlMs/cacheScope (2026-07-28 fields).
        assert listed == {"tools": [t.model_dump(by_alias=True, exclude_none=True, mode="json")
                                    for t in tools.tool_list()]}
        assert error_code(await client.request(5, "resources/list")) == types.METHOD_NOT_FOUND

        await client.send(b'{"jsonrpc": "2.0", "id": 6, "method": \n')
        assert error_code(await client.expect(None)) == types.PARSE_ERROR
        await client.send([{"jsonrpc": "2.0", "id": n, "method": "ping"} for n in (7, 8)])  # a batch
        assert error_code(await client.expect(None)) == types.INVALID_REQUEST
        await client.send("ping")
        assert error_code(await client.expect(None)) == types.INVALID_REQUEST
        await client.send({"jsonrpc": "2.0", "id": {"not": "an id"}, "method": "ping"})
        assert error_code(await client.expect(None)) == types.INVALID_REQUEST
        await client.send({"jsonrpc": "1.0", "id": 9, "method": "ping"})
        assert error_code(await client.expect(9)) == types.INVALID_REQUEST

        assert error_code(await client.request(10, "tools/call", {"arguments": {}})) == types.INVALID_PARAMS
        assert error_code(await client.request(11, "tools/call", {"name": "query", "arguments": [1]})) == \
            types.INVALID_PARAMS
        assert error_code(await client.request(12, "tools/call", ["query"])) == types.INVALID_PARAMS

        # Never answered: a client's response, notifications (known or not); the next answer is the ping's.
        await client.send({"jsonrpc": "2.0", "id": 99, "result": {}})
        await client.send({"jsonrpc": "2.0", "method": "notifications/whatever", "params": {"x": 1}})
        await client.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 12}})
        assert (await client.request(13, "ping"))["result"] == {}

        bad = (await client.request(14, "tools/call", {"name": "query", "arguments": {
            "database": "postgres", "sql": "SELECT 1"}}))["result"]
        assert bad["isError"] is True and "Input should be 'global' or 'agent'" in bad["content"][0]["text"]
        assert "structuredContent" not in bad

        await client.call(15, "SELECT 1 AS n, NULL::text AS t, 'é' AS accent")
        result = (await client.expect(15))["result"]
        assert result["isError"] is False
        structured = result["structuredContent"]
        # Exactly what the pydantic model (documented in docs/mcp.md) dumps, and what the SDK would send.
        assert structured == tools.StatementOutput.model_validate(structured).model_dump(mode="json", by_alias=True)
        assert list(structured) == list(tools.StatementOutput.model_fields)
        assert structured["rows"] == [[1, None, "é"]] and structured["row_count"] == 1
        assert types.CallToolResult.model_validate(result).model_dump(  # the 2025 form has no resultType
            by_alias=True, exclude_none=True, mode="json", exclude={"result_type"}) == result
        text = result["content"][0]["text"]
        assert text == f"1 row in {structured['duration_ms']:g} ms\ncolumns: n (int4), t (text), accent (text)\n" \
                       '[1,null,"é"]', text


async def test_concurrency_cancellation_and_eof(agentpg_home: Path, tenants: Tenants,
                                                admin: psycopg.Connection[tuple[object, ...]]) -> None:
    async with agentpg_mcp(agentpg_home, tenants.token_b, 10) as (client, process):
        await client.initialize()

        # Two calls in flight: the fast one, sent second, is answered first; ids match.
        await client.call("slow", "SELECT pg_sleep(0.5) AS slow")
        await client.call("fast", "SELECT 42 AS fast")
        first, second = await client.receive(), await client.receive()
        assert (first["id"], second["id"]) == ("fast", "slow"), (first, second)
        assert first["result"]["structuredContent"]["rows"] == [[42]]
        assert [c["name"] for c in second["result"]["structuredContent"]["columns"]] == ["slow"]

        # Cancelling a call in flight stops its statement in Postgres (pg_sleep(60) would outlive the wait below)
        # and it is never answered (checked at EOF below, where every pending answer has been written).
        marker = f"cancel_me_{uuid.uuid4().hex[:8]}"
        await client.call(20, f"SELECT pg_sleep(60) AS {marker}")
        await wait_until(lambda: active_statements(admin, marker) == 1, 5, "the statement runs")
        await client.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                           "params": {"requestId": 20, "reason": "the user changed their mind"}})
        assert (await client.request(21, "ping"))["result"] == {}
        # pg_sleep(60) ends well before its time only if cancelled (the wait is a hang guard, not a bound).
        await wait_until(lambda: active_statements(admin, marker) == 0, 20, "the statement is cancelled")

        # EOF with a call in flight: its answer is written before the process exits, and nothing else.
        await client.call(30, "SELECT pg_sleep(0.3) AS last_call")
        client.writer.close()
        rest = [await client.receive()]
        assert await client.reader.read() == b""
        assert [m["id"] for m in rest] == [30] and rest[0]["result"]["isError"] is False, rest
        assert await asyncio.wait_for(process.wait(), 15) == 0


async def test_overlong_lines_are_skipped_and_reading_goes_on(runtime: Runtime, tenants: Tenants) -> None:
    """The loop itself on a socket pair, with a 1 KiB line limit (the real one is 256 MiB)."""

    async def identify(_request: Any) -> Principal:
        raise AssertionError("no tool is called here")

    queries = TenantQueries(TenantPools(PoolLimits()), QueryLimits())
    server_end, client_end = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=server_end, limit=1024)
    session = JsonRpcSession(ToolCalls(_attached(runtime.service, queries), identify), server_reader, server_writer,
                             drain_timeout_s=1, max_line=1024)
    serving = asyncio.create_task(session.serve())
    client = RawClient(*await asyncio.open_connection(sock=client_end))
    try:
        # Over the limit with its newline already buffered; then one arriving in pieces (no newline buffered).
        await client.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping", "x": "a" * 3000}).encode()
                          + b"\n" + json.dumps({"jsonrpc": "2.0", "id": 2, "method": "ping"}).encode() + b"\n")
        assert error_code(await client.expect(None)) == types.INVALID_REQUEST
        assert (await client.expect(2))["result"] == {}
        await client.send(b'{"jsonrpc": "2.0", "id": 3, "method": "ping", "x": "')
        for _ in range(50):
            await client.send(b"b" * 4096)
        await client.send(b'"}\n')
        assert error_code(await client.expect(None)) == types.INVALID_REQUEST
        # The last message may lack its newline: it is still answered at EOF.
        await client.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "ping"}).encode())
        client.writer.write_eof()
        assert (await client.expect(4))["result"] == {}
        await asyncio.wait_for(serving, 5)
    finally:
        serving.cancel()
        client.writer.close()
        server_writer.close()
        await queries.close()


def _attached(service: Service, queries: TenantQueries) -> Service:
    """The service, reaching tenants through ``queries`` (this test's own limits)."""
    service.attach_tenant(TenantAccess.of(queries))
    return service
