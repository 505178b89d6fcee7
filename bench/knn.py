"""KNN search with pgvector through MCP ``query`` vs raw psycopg, on the same database and role.

    python bench/knn.py [--rows 100000] [--dim 384] [--calls 500]

One agent; its own agent database (default durable settings: fsync on) holds ``items(id, emb vector(dim))``
with ``rows`` random vectors and an HNSW index (vector_l2_ops, pgvector's defaults m=16,
ef_construction=64). The statement is ``SELECT id FROM items ORDER BY emb <-> $1::vector LIMIT 10`` with a
different bound query vector each call. Compared: the SDK client calling ``query`` over stdio
(``agentpg mcp``), and the baseline, the same statement and parameter on one persistent psycopg connection
with the agent's own URI. Reports p50/p95/p99 of each and the p50 overhead of MCP, plus load and index
build times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from mcp import ClientSession
from mcp.client.stdio import stdio_client
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).parent))
from _common import agentpg_stdio_params, percentiles, report, throwaway_runtime, write_json

SQL = "SELECT id FROM items ORDER BY emb <-> $1::vector LIMIT 10"


def query_vectors(n: int, dim: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)  # noqa: S311 - reproducible benchmark data, not a secret
    return [json.dumps([round(rng.random(), 6) for _ in range(dim)]) for _ in range(n)]


def load(admin_dsn: str, uri: str, rows: int, dim: int) -> dict[str, float]:
    """Fill ``items`` as the agent (it owns its agent database); build the index with room to do it in memory
    (as the admin: maintenance_work_mem is a setting agentpg keeps small for tenants)."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE items (id int PRIMARY KEY, emb vector({dim}))")
        started = time.perf_counter()
        conn.execute(f"INSERT INTO items SELECT g, (SELECT array_agg(random()) FROM generate_series(1, {dim}) d "
                     f"WHERE d > -g)::vector FROM generate_series(1, {rows}) g")  # per row: d > -g refers to g
        loaded = time.perf_counter() - started
    dbname = conninfo_to_dict(uri)["dbname"]
    with psycopg.connect(make_conninfo(admin_dsn, dbname=str(dbname)), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        conn.execute("CREATE INDEX items_emb ON items USING hnsw (emb vector_l2_ops)")
        indexed = time.perf_counter() - started
        conn.execute("ANALYZE items")
    return {"load_s": round(loaded, 1), "index_build_s": round(indexed, 1)}


def raw(uri: str, vectors: list[str]) -> list[float]:
    samples = []
    with psycopg.connect(uri, autocommit=True) as conn:
        for vector in vectors[:50]:
            conn.execute(SQL.replace("$1", "%s"), (vector,)).fetchall()
        for vector in vectors:
            started = time.perf_counter()
            rows = conn.execute(SQL.replace("$1", "%s"), (vector,)).fetchall()
            samples.append((time.perf_counter() - started) * 1000)
            assert len(rows) == 10
    return samples


async def over_stdio(home: Path, token: str, vectors: list[str]) -> list[float]:
    samples = []
    async with stdio_client(agentpg_stdio_params(home, token)) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        for vector in vectors[:50]:
            await session.call_tool("query", {"database": "agent", "sql": SQL, "params": [vector]})
        for vector in vectors:
            started = time.perf_counter()
            result = await session.call_tool("query", {"database": "agent", "sql": SQL, "params": [vector]})
            samples.append((time.perf_counter() - started) * 1000)
            assert not result.is_error and result.structured_content is not None, result.content
            assert len(result.structured_content["rows"]) == 10
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    from agentpg.tokens import Principal

    with throwaway_runtime() as rt:  # the default, durable settings
        svc = rt.service
        svc.register_user("bench")
        _, issued = svc.create_workspace_with_token("bench", "bench-agent")
        principal = Principal(kind="agent", token_id=issued.id, user_id="bench", workspace_id="bench-agent")
        uri = svc.agents.target(principal, "agent").uri
        build = load(rt.admin_dsn, uri, args.rows, args.dim)
        vectors = query_vectors(args.calls, args.dim)
        base = raw(uri, vectors)
        mcp = asyncio.run(over_stdio(rt.settings.home, issued.secret, vectors))
        base_after = raw(uri, vectors)
    results: dict[str, dict[str, float]] = {
        "raw psycopg (baseline)": percentiles(base + base_after),
        "MCP query over stdio": percentiles(mcp),
    }
    extra: dict[str, Any] = {
        "rows": args.rows, "dim": args.dim, **build, "fsync": "on",
        "p50_overhead_ms_over_raw": round(results["MCP query over stdio"]["p50"]
                                          - results["raw psycopg (baseline)"]["p50"], 3),
    }
    report("knn", results, extra)
    write_json("knn", {"results": results, **extra})


if __name__ == "__main__":
    main()
