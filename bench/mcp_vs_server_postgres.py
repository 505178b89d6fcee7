"""MCP ``query`` throughput: agentpg vs the npm ``@modelcontextprotocol/server-postgres``, and raw psycopg.

    python bench/mcp_vs_server_postgres.py [--calls 3000] [--rounds 3] [--no-http]

All on the same database as the same role (the agent's own role in its user's global database), calls one after
another, in one run:

- **stdio**: both servers driven by the same client, the official Python SDK 2.x ``Client`` (it compiles each
  tool's output-schema validator once; the 1.x ``ClientSession`` re-ran ``jsonschema`` on every call, a cost
  server-postgres, which declares no output schema, never paid). server-postgres speaks the 2025 handshake
  era only, so the like-for-like ratio is agentpg "legacy" over server-postgres; agentpg in the 2026-07-28 era
  is reported beside it. The npm server gets the role's URI as its command-line argument (never printed);
  agentpg's side is ``agentpg mcp`` with the agent's token.
- **HTTP**: ``agentpg serve``'s ``/mcp`` with the same SDK ``Client`` in both eras, against **raw psycopg**
  (one persistent connection, autocommit, fetchall): the figure the issue sets is the p50 added over raw.

Each round runs every case, alternating the order; the figures are the medians over rounds. Targets: stdio ≥
1.5x server-postgres; HTTP ≤ 1.5 ms p50 over raw psycopg (1-row SELECT).

The npm package is installed into bench/.node/ on first use (``npm install``; Node 18+ needed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import psycopg
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, agentpg_stdio_params, bench_agent, percentiles, report, throwaway_runtime, write_json

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


async def drive(client: Client, arguments: dict[str, Any], calls: int) -> dict[str, Any]:
    async with client:
        await client.list_tools()
        for _ in range(200):
            result = await client.call_tool("query", arguments)
            assert not result.is_error, result.content
        samples = []
        start = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.call_tool("query", arguments)
            samples.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
    return {"calls_per_s": calls / elapsed, **percentiles(samples)}


def over_stdio(params: StdioServerParameters, mode: str, arguments: dict[str, Any], calls: int) -> dict[str, Any]:
    with open(os.devnull, "w") as errlog:
        return asyncio.run(drive(Client(stdio_client(params, errlog=errlog), mode=mode), arguments, calls))  # type: ignore[arg-type]


def over_http(base_url: str, token: str, mode: str, arguments: dict[str, Any], calls: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            client = Client(streamable_http_client(f"{base_url}/mcp", http_client=http), mode=mode)  # type: ignore[arg-type]
            return await drive(client, arguments, calls)

    return asyncio.run(run())


def raw(uri: str, sql: str, calls: int) -> dict[str, Any]:
    with psycopg.connect(uri, autocommit=True) as conn:
        for _ in range(200):
            conn.execute(sql).fetchall()
        samples = []
        start = time.perf_counter()
        for _ in range(calls):
            t0 = time.perf_counter()
            conn.execute(sql).fetchall()
            samples.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
    return {"calls_per_s": calls / elapsed, **percentiles(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="stdio only (no agentpg serve)")
    parser.add_argument("--out", default="mcp_vs_server_postgres", help="results/<out>.json")
    parser.add_argument("--fsync", action="store_true", help="the embedded server with fsync on (agentpg's default)")
    args = parser.parse_args()
    entry = server_postgres_entry()
    runs: dict[str, list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    with throwaway_runtime(embedded_fsync=args.fsync) as rt:
        token, uri = bench_agent(rt)
        ours = agentpg_stdio_params(rt.settings.home, token)
        theirs = StdioServerParameters(command=shutil.which("node") or "node", args=[str(entry), uri])
        server = None if args.no_http else ServeProcess(rt.settings.home)
        try:
            if server is not None:
                server.wait_ready()
            for rnd in range(args.rounds):
                for name, sql in SQL.items():
                    mine = {"database": "global", "sql": sql}
                    cases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                        ("agentpg stdio legacy", partial(over_stdio, ours, "legacy", mine, args.calls)),
                        ("agentpg stdio 2026-07-28", partial(over_stdio, ours, "2026-07-28", mine, args.calls)),
                        ("server-postgres stdio", partial(over_stdio, theirs, "legacy", {"sql": sql}, args.calls)),
                        ("raw psycopg", partial(raw, uri, sql, args.calls))]
                    if server is not None:
                        cases += [(f"agentpg HTTP {era}", partial(over_http, server.base_url, token, era, mine,
                                                                  args.calls)) for era in ("legacy", "2026-07-28")]
                    for who, run in (cases if rnd % 2 == 0 else cases[::-1]):
                        runs.setdefault(f"{who}, {name}", []).append(run())
        finally:
            if server is not None:
                server.stop()
    results: dict[str, dict[str, float]] = {}
    throughput: dict[str, float] = {}
    for case, rows in runs.items():
        results[case] = {k: statistics.median(r[k] for r in rows) for k in ("n", "p50", "p95", "p99", "mean", "max")}
        throughput[case] = round(statistics.median(r["calls_per_s"] for r in rows), 1)
    ratio = {f"{era}, {name}": round(throughput[f"agentpg stdio {era}, {name}"]
                                     / throughput[f"server-postgres stdio, {name}"], 2)
             for name in SQL for era in ("legacy", "2026-07-28")}
    added = {f"{era}, {name}": round(results[f"agentpg HTTP {era}, {name}"]["p50"]
                                     - results[f"raw psycopg, {name}"]["p50"], 3)
             for name in SQL for era in ("legacy", "2026-07-28") if not args.no_http}
    extra = {"calls_per_s": throughput, "ratio_agentpg_stdio_over_server_postgres": ratio, "target_ratio": 1.5,
             "http_p50_ms_added_over_raw_psycopg": added, "target_http_added_ms": 1.5,
             "client": "mcp 2.x Client", "rounds": args.rounds, "calls_per_round": args.calls, "fsync": args.fsync,
             "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
             "all_rounds_calls_per_s": {k: [round(r["calls_per_s"], 1) for r in v] for k, v in runs.items()}}
    report("mcp_vs_server_postgres", results, extra)
    print("\ncalls/s: " + ", ".join(f"{k}: {v}" for k, v in throughput.items()))
    write_json(args.out, {"results": results, **extra})


if __name__ == "__main__":
    main()
