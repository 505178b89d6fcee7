"""An agent on the **mcp 1.x** SDK (run by tests/test_mcp_eras.py with a venv holding mcp==1.30.0, never
imported by the suite): connects to agentpg over streamable HTTP or stdio, lists the tools, runs a query
and a refused statement, pings, and prints what it saw as one JSON line on stdout.

Usage: ``python mcp1_client.py http <url> <token>`` or ``python mcp1_client.py stdio <agentpg> <home> <token>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client


async def exercise(session: ClientSession) -> dict[str, Any]:
    init = await session.initialize()
    listed = await session.list_tools()
    answered = await session.call_tool("query", {"database": "agent", "sql": "SELECT 41 + 1 AS answer"})
    refused = await session.call_tool("query", {"database": "agent", "sql": "DROP TABLE nothing_here"})
    await session.send_ping()
    return {"protocol_version": init.protocolVersion, "server": init.serverInfo.name,
            "tools": sorted(t.name for t in listed.tools), "rows": (answered.structuredContent or {}).get("rows"),
            "answered_error": answered.isError, "refused_error": refused.isError}


async def main(argv: list[str]) -> dict[str, Any]:
    if argv[0] == "http":
        url, token = argv[1], argv[2]
        async with streamablehttp_client(url, headers={"Authorization": f"Bearer {token}"},
                                         timeout=30) as (read, write, _), ClientSession(read, write) as session:
            return await exercise(session)
    agentpg, home, token = argv[1], argv[2], argv[3]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=home, AGENTPG_AGENT_TOKEN=token)
    params = StdioServerParameters(command=agentpg, args=["mcp"], env=env)
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            return await exercise(session)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1:]))))
