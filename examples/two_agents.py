"""Two agents of one user, through the official MCP client (the ``mcp`` SDK), against a running agentpg.

    AGENT_A_TOKEN=apg_g_… AGENT_B_TOKEN=apg_g_… python3 examples/two_agents.py http://127.0.0.1:8080

Agent A creates ``customers`` in the user's global database and fills it, and keeps a private table in its
own agent database; agent B, another workspace of the same user, reads A's ``customers`` at once but
cannot see A's agent database. Tokens come from the environment (an argument would show in ``ps``); the
URL is agentpg serve's (``AGENTPG_PUBLIC_URL`` when set). Exits non-zero if any step does not behave so.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client, types
from mcp.client.streamable_http import streamable_http_client


@asynccontextmanager
async def agent(base_url: str, token: str) -> AsyncIterator[Client]:
    """An MCP client over streamable HTTP as the agent holding ``token`` (the SDK 2.x ``Client``: it asks
    ``server/discover`` and speaks protocol 2026-07-28 with agentpg)."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http, \
            Client(streamable_http_client(base_url.rstrip("/") + "/mcp", http_client=http)) as client:
        yield client


async def call(session: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool; its structured result, or exit with the tool's error."""
    result = await session.call_tool(tool, arguments)
    text = "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))
    if result.is_error or result.structured_content is None:
        sys.exit(f"{tool} failed: {text}")
    return result.structured_content


async def main(base_url: str) -> None:
    token_a, token_b = os.environ.get("AGENT_A_TOKEN"), os.environ.get("AGENT_B_TOKEN")
    if not token_a or not token_b:
        sys.exit("set AGENT_A_TOKEN and AGENT_B_TOKEN to the agent tokens of two workspaces of one user")

    async with agent(base_url, token_a) as a:
        tools = sorted(t.name for t in (await a.list_tools()).tools)
        print(f"agent A sees the tools {', '.join(tools)}")
        await call(a, "execute", database="global",
                   sql="CREATE TABLE IF NOT EXISTS customers (id int PRIMARY KEY, name text NOT NULL, plan text)")
        for row in ([1, "Ada", "pro"], [2, "Grace", "free"], [3, "Linus", "pro"]):
            await call(a, "execute", database="global",
                       sql="INSERT INTO customers VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING", params=row)
        await call(a, "execute", database="agent", sql="CREATE TABLE IF NOT EXISTS scratch (note text)")
        await call(a, "execute", database="agent", sql="INSERT INTO scratch VALUES ($1)", params=["A only"])
        print("agent A created customers (global database, 3 rows) and scratch (its own agent database)")

    async with agent(base_url, token_b) as b:
        rows = (await call(b, "query", database="global", sql="SELECT name, plan FROM customers ORDER BY id"))["rows"]
        print(f"agent B reads A's customers: {json.dumps(rows)}")
        mine = [t["name"] for t in (await call(b, "list_tables", database="agent"))["tables"]]
        print(f"agent B's own agent database has: {mine or 'no tables'} (A's scratch is not there)")
        if len(rows) != 3 or "scratch" in mine:
            sys.exit("unexpected: B should read 3 customers and not see A's scratch table")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"))
