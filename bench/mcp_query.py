"""MCP ``query`` round trip vs raw psycopg, on the same database and the same role.

    python bench/mcp_query.py [--calls 1000]

One agent of one user; the agent's own role in the user's global database; a 10,000-row table ``items``.
Two statements: a 1-row SELECT (by primary key) and a 100-row SELECT. For each: the SDK client calling
``query`` over stdio (``agentpg mcp``) and over streamable HTTP (``agentpg serve``), one session each, calls
one after another; and the baseline, the same SELECT on one persistent psycopg connection with the agent's
own URI (autocommit, fetchall). Reports p50/p95/p99 and the p50 overhead of each MCP path over the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import psycopg
from mcp import ClientSession
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, agentpg_stdio_params, bench_agent, percentiles, report, throwaway_runtime, write_json

STATEMENTS = {"1 row": "SELECT id, name, price FROM items WHERE id = 42",
              "100 rows": "SELECT id, name, price FROM items ORDER BY id LIMIT 100"}


async def timed_calls(session: ClientSession, sql: str, calls: int) -> list[float]:
    args = {"database": "global", "sql": sql}
    for _ in range(min(100, calls)):
        result = await session.call_tool("query", args)
        assert not result.is_error, result.content
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        result = await session.call_tool("query", args)
        samples.append((time.perf_counter() - start) * 1000)
    assert not result.is_error and result.structured_content is not None, result
    return samples


async def over_stdio(home: Path, token: str, calls: int) -> dict[str, list[float]]:
    async with stdio_client(agentpg_stdio_params(home, token)) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        return {name: await timed_calls(session, sql, calls) for name, sql in STATEMENTS.items()}


async def over_http(base_url: str, token: str, calls: int) -> dict[str, list[float]]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client, \
            streamable_http_client(f"{base_url}/mcp", http_client=client) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        return {name: await timed_calls(session, sql, calls) for name, sql in STATEMENTS.items()}


def raw(uri: str, calls: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with psycopg.connect(uri, autocommit=True) as conn:
        for name, sql in STATEMENTS.items():
            for _ in range(min(100, calls)):
                conn.execute(sql).fetchall()
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                conn.execute(sql).fetchall()
                samples.append((time.perf_counter() - start) * 1000)
            out[name] = samples
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with throwaway_runtime(embedded_fsync=False) as rt:
        token, uri = bench_agent(rt)
        base = raw(uri, args.calls)
        stdio = asyncio.run(over_stdio(rt.settings.home, token, args.calls))
        server = ServeProcess(rt.settings.home)
        try:
            server.wait_ready()
            http = asyncio.run(over_http(server.base_url, token, args.calls))
        finally:
            server.stop()
        base_after = raw(uri, args.calls)  # the baseline again, to see drift
    overhead: dict[str, Any] = {}
    for name in STATEMENTS:
        results[f"raw psycopg, {name} (baseline)"] = percentiles(base[name] + base_after[name])
        results[f"MCP query over stdio, {name}"] = percentiles(stdio[name])
        results[f"MCP query over HTTP, {name}"] = percentiles(http[name])
        for transport in ("stdio", "HTTP"):
            overhead[f"{transport}, {name}"] = round(
                results[f"MCP query over {transport}, {name}"]["p50"]
                - results[f"raw psycopg, {name} (baseline)"]["p50"], 3)
    extra = {"p50_overhead_ms_over_raw": overhead, "target_p50_overhead_ms": 2.0}
    report("mcp_query", results, extra)
    write_json("mcp_query", {"results": results, **extra})


if __name__ == "__main__":
    main()
