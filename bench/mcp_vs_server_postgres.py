"""MCP ``query`` throughput over stdio: agentpg vs the npm ``@modelcontextprotocol/server-postgres``.

    python bench/mcp_vs_server_postgres.py [--calls 3000] [--rounds 3]

Both servers run over stdio and are driven by the same client (the official Python SDK's ``ClientSession``),
calls one after another, on the same database as the same role: the agent's own role in its user's global
database. The npm server gets that role's connection URI, resolved in this process (it takes it only as a
command-line argument; it is never printed). agentpg's side is ``agentpg mcp`` with the agent's token. Each
round runs both, alternating which goes first; the figures are the medians over rounds.

The npm package is installed into bench/.node/ on first use (``npm install``; Node 18+ needed).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

sys.path.insert(0, str(Path(__file__).parent))
from _common import agentpg_stdio_params, bench_agent, percentiles, report, throwaway_runtime, write_json

NODE_DIR = Path(__file__).parent / ".node"
PACKAGE = "@modelcontextprotocol/server-postgres"
SQL = {"1 row": "SELECT id, name, price FROM items WHERE id = 42",
       "100 rows": "SELECT id, name, price FROM items ORDER BY id LIMIT 100"}


def server_postgres_entry() -> Path:
    entry = NODE_DIR / "node_modules" / PACKAGE / "dist" / "index.js"
    if not entry.exists():
        if shutil.which("npm") is None:
            raise SystemExit("npm is needed to install " + PACKAGE)
        NODE_DIR.mkdir(exist_ok=True)
        if not (NODE_DIR / "package.json").exists():
            (NODE_DIR / "package.json").write_text('{"private": true}\n')
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", PACKAGE], cwd=NODE_DIR, check=True,
                       stdout=subprocess.DEVNULL)
    return entry


async def drive(params: StdioServerParameters, arguments: dict[str, Any], calls: int) -> dict[str, Any]:
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await session.list_tools()
        for _ in range(200):
            result = await session.call_tool("query", arguments)
            assert not result.is_error, result.content
        samples = []
        start = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            await session.call_tool("query", arguments)
            samples.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
    return {"calls_per_s": calls / elapsed, **percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    entry = server_postgres_entry()
    runs: dict[str, list[dict[str, Any]]] = {}
    with throwaway_runtime(embedded_fsync=False) as rt:
        token, uri = bench_agent(rt)
        ours = agentpg_stdio_params(rt.settings.home, token)
        theirs = StdioServerParameters(command=shutil.which("node") or "node", args=[str(entry), uri])
        for rnd in range(args.rounds):
            for name, sql in SQL.items():
                order = [("agentpg", ours, {"database": "global", "sql": sql}),
                         ("server-postgres", theirs, {"sql": sql})]
                for who, params, arguments in (order if rnd % 2 == 0 else order[::-1]):
                    runs.setdefault(f"{who}, {name}", []).append(asyncio.run(drive(params, arguments, args.calls)))
    results: dict[str, dict[str, float]] = {}
    throughput: dict[str, float] = {}
    for case, rows in runs.items():
        results[case] = {k: statistics.median(r[k] for r in rows) for k in ("n", "p50", "p95", "p99", "mean", "max")}
        throughput[case] = round(statistics.median(r["calls_per_s"] for r in rows), 1)
    ratio = {name: round(throughput[f"agentpg, {name}"] / throughput[f"server-postgres, {name}"], 2) for name in SQL}
    extra = {"calls_per_s": throughput, "ratio_agentpg_over_server_postgres": ratio, "target_ratio": 1.0,
             "rounds": args.rounds, "calls_per_round": args.calls,
             "all_rounds_calls_per_s": {k: [round(r["calls_per_s"], 1) for r in v] for k, v in runs.items()}}
    report("mcp_vs_server_postgres", results, extra)
    print("\ncalls/s: " + ", ".join(f"{k}: {v}" for k, v in throughput.items()))
    write_json("mcp_vs_server_postgres", {"results": results, **extra})


if __name__ == "__main__":
    main()
