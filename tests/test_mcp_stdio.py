"""MCP over stdio: the SDK's client spawning the real ``agentpg mcp`` console script; and round-trip figures."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import run_cli
from helpers import agent_db_uri, workspace_global_uri
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp_support import Tenants, http_session, live_server, ok, refused

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio




@asynccontextmanager
async def stdio_session(home: Path, token: str) -> AsyncIterator[ClientSession]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=str(home), AGENTPG_AGENT_TOKEN=token, AGENTPG_MCP_STATEMENT_TIMEOUT_S="1")
    params = StdioServerParameters(command=str(Path(sys.executable).with_name("agentpg")), args=["mcp"], env=env)
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def test_stdio_agent_shares_the_global_database(runtime: Runtime, agentpg_home: Path,
                                                      tenants: Tenants) -> None:
    async with stdio_session(agentpg_home, tenants.token_a) as a:
        assert {t.name for t in (await a.list_tools()).tools} == {
            "list_databases", "list_tables", "describe_table", "query", "explain", "execute", "checkpoint",
            "list_checkpoints", "restore"}
        await ok(a, "execute", database="global", sql="CREATE TABLE notes (id int, body text)")
        await ok(a, "execute", database="global", sql="INSERT INTO notes VALUES ($1, $2)", params=[1, "from stdio"])
        await ok(a, "execute", database="agent", sql="CREATE TABLE private_notes (id int)")
        assert "2 statements" in await refused(a, "query", database="global", sql="SELECT 1; DROP TABLE notes")
        assert "cancelled" in await refused(a, "query", database="global", sql="SELECT pg_sleep(5)")
        assert "Input should be 'global' or 'agent'" in await refused(a, "query", database="postgres", sql="SELECT 1")
    async with stdio_session(agentpg_home, tenants.token_b) as b:
        assert (await ok(b, "query", database="global", sql="SELECT body FROM notes"))["rows"] == [["from stdio"]]
        assert (await ok(b, "list_tables", database="agent"))["tables"] == []
    with psycopg.connect(workspace_global_uri(runtime, tenants.ws_b)) as conn:  # and as B's own role, directly
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (1,)


def test_stdio_refuses_bad_tokens(agentpg_home: Path, tenants: Tenants) -> None:
    cases = [("apg_g_wrong", f"unknown to the agentpg whose home is {agentpg_home}"),
             (tenants.user1_token, "agent token"), (None, "AGENTPG_AGENT_TOKEN")]
    with ThreadPoolExecutor(len(cases)) as pool:  # each start opens a runtime: run them side by side
        results = list(pool.map(lambda case: run_cli(agentpg_home, "mcp", timeout=60, env=(
            {"AGENTPG_AGENT_TOKEN": case[0]} if case[0] else None)), cases))
    for (_, expected), result in zip(cases, results, strict=True):
        assert result.returncode != 0 and expected in result.stderr and result.stdout == "", result.stderr
    assert results[-1].returncode == 2


async def _timed(call: Callable[[], Awaitable[object]], n: int) -> float:
    """Median milliseconds of ``n`` calls after two warm-up calls."""
    for _ in range(2):
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _raw_call(session: ClientSession, sql: str) -> Callable[[], Awaitable[object]]:
    """A tools/call request without the SDK client's per-call jsonschema check of the result (which
    re-validates the output schema itself each time and costs more than the call)."""
    request = types.CallToolRequest(params=types.CallToolRequestParams(
        name="query", arguments={"database": "agent", "sql": sql}))
    return lambda: session.send_request(request, types.CallToolResult)


async def test_round_trip_figures(runtime: Runtime, settings: Settings, agentpg_home: Path,
                                  tenants: Tenants) -> None:
    """Median ms of a small query: raw psycopg, MCP over HTTP and over stdio (printed with -s)."""
    n, sql = 20, "SELECT id, 'x' AS label FROM generate_series(1, 10) AS id"
    conn = await psycopg.AsyncConnection.connect(agent_db_uri(runtime, tenants.ws_c), autocommit=True)
    async with conn:
        raw = await _timed(lambda: conn.execute(sql), n)
    figures = {}
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as url:
        async with http_session(url, tenants.token_c) as s:
            figures["HTTP"] = (await _timed(lambda: ok(s, "query", database="agent", sql=sql), n),
                               await _timed(_raw_call(s, sql), n))
    async with stdio_session(agentpg_home, tenants.token_c) as s:
        figures["stdio"] = (await _timed(lambda: ok(s, "query", database="agent", sql=sql), n),
                            await _timed(_raw_call(s, sql), n))
    print(f"\nquery round trip, median of {n}: raw psycopg {raw:.2f} ms; " + "; ".join(
        f"MCP over {k} {v[0]:.2f} ms with the SDK client's call_tool, {v[1]:.2f} ms without its result check"
        for k, v in figures.items()))
    assert all(v[1] < 250 for v in figures.values())
