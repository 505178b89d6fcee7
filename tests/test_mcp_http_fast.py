"""The hot path of /mcp (agentpg.mcp.http_fast) over real HTTP: what it answers itself, what it hands to the
SDK unchanged, and cancellation of an in-flight call, which must stop the statement in Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp import types
from mcp_support import INIT, MCP_HEADERS, Tenants, http_session, live_server

from agentpg.mcp import tools
from agentpg.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})) as url:
        yield url


def _call(sql: str, request_id: int | str = 1, database: str = "agent") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
            "params": {"name": "query", "arguments": {"database": database, "sql": sql}}}


async def _post(client: httpx.AsyncClient, url: str, token: str, body: Any, **headers: str) -> httpx.Response:
    return await client.post(f"{url}/mcp", json=body,
                             headers={**MCP_HEADERS, "Authorization": f"Bearer {token}", **headers})


async def test_hot_requests_answer_like_the_sdk(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        pong = await _post(client, base_url, tenants.token_a, {"jsonrpc": "2.0", "id": "p-1", "method": "ping"})
        assert pong.status_code == 200 and pong.json() == {"jsonrpc": "2.0", "id": "p-1", "result": {}}
        listed = await _post(client, base_url, tenants.token_a, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        parsed = types.ListToolsResult.model_validate(listed.json()["result"])
        assert [t.name for t in parsed.tools] == [t.name for t in tools.tool_list()]
        answered = await _post(client, base_url, tenants.token_a, _call("SELECT 41 + 1 AS answer", 3))
        result = types.CallToolResult.model_validate(answered.json()["result"])
        assert answered.json()["id"] == 3 and not result.isError
        assert result.structuredContent is not None and result.structuredContent["rows"] == [[42]]
        refused = await _post(client, base_url, tenants.token_a, _call("DROP TABLE nothing_here", 4))
        assert refused.status_code == 200 and refused.json()["result"]["isError"] is True
    # The SDK's client parses what the hot path sends (and the initialize it hands on) as its own.
    async with http_session(base_url, tenants.token_a) as session:
        assert (await session.call_tool("query", {"database": "agent", "sql": "SELECT 'x' AS y"})).structuredContent
        await session.send_ping()


async def test_everything_else_is_the_sdks_answer(base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        opened = await _post(client, base_url, tenants.token_a, INIT)  # handed on, body replayed
        assert opened.status_code == 200 and opened.json()["result"]["serverInfo"]["name"] == "agentpg"
        old = await _post(client, base_url, tenants.token_a, _call("SELECT 1"), **{"Mcp-Protocol-Version": "1999"})
        assert old.status_code == 400 and "Unsupported protocol version" in old.text
        wrong_accept = await client.post(f"{base_url}/mcp", json=_call("SELECT 1"), headers={
            "Authorization": f"Bearer {tenants.token_a}", "Content-Type": "application/json",
            "Accept": "text/html"})
        assert wrong_accept.status_code == 406
        garbled = await client.post(f"{base_url}/mcp", content=b'{"jsonrpc": "2.0", "id": 1, "method": ',
                                    headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"})
        assert garbled.status_code == 400 and garbled.json()["error"]["code"] == types.PARSE_ERROR
        bad_params = await _post(client, base_url, tenants.token_a, {
            "jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "query", "arguments": [1]}})
        assert bad_params.status_code in (200, 400) and "error" in bad_params.json()
        unknown = await _post(client, base_url, tenants.token_a, {"jsonrpc": "2.0", "id": 6, "method": "nope/x"})
        # The SDK's answer (it validates the method against its request union: "invalid params").
        assert unknown.json()["error"]["code"] in (types.METHOD_NOT_FOUND, types.INVALID_PARAMS)


async def _sleeping_backends(runtime: Runtime) -> int:
    def count() -> int:
        import psycopg

        with psycopg.connect(runtime.admin_dsn, autocommit=True) as conn:
            # LIKE: agentpg sends a query wrapped in its row-size check (access.query.bounded_statement).
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%(SELECT pg_sleep(30)%' "
                               "AND pid <> pg_backend_pid() "
                               "AND state = 'active'").fetchone()
        return int(row[0]) if row else 0

    return await asyncio.to_thread(count)


async def test_cancel_stops_the_call_and_its_statement(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        slow = asyncio.create_task(_post(client, base_url, tenants.token_a, _call("SELECT pg_sleep(30)", "slow-1")))
        for _ in range(100):  # until the statement runs in Postgres
            if await _sleeping_backends(runtime):
                break
            await asyncio.sleep(0.05)
        assert await _sleeping_backends(runtime) == 1
        # Another agent cannot cancel it (request ids are per caller), and an unknown id is ignored.
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "slow-1"}}
        assert (await _post(client, base_url, tenants.token_b, cancel)).status_code == 202
        await asyncio.sleep(0.3)
        assert not slow.done() and await _sleeping_backends(runtime) == 1
        assert (await _post(client, base_url, tenants.token_a, cancel)).status_code == 202
        answer = await asyncio.wait_for(slow, 60)  # a hang guard; -32800 below proves the cancel
        assert answer.status_code == 200 and answer.json()["error"]["code"] == -32800
        for _ in range(100):
            if not await _sleeping_backends(runtime):
                break
            await asyncio.sleep(0.05)
        assert await _sleeping_backends(runtime) == 0  # cancelled in Postgres, not just abandoned
        after = await _post(client, base_url, tenants.token_a, _call("SELECT 1 AS fine", 9))
        assert after.json()["result"]["structuredContent"]["rows"] == [[1]]
