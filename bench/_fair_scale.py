"""fair_sharing.py's scale phase: ``--sessions`` concurrent MCP sessions (a write, a read, a write each) over all
agents from ``--clients`` processes, then every acknowledged write looked up as the server's admin."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from collections import Counter
from typing import Any

import httpx2
import psycopg
from _common import percentiles
from _mcp_agent import SAMPLES, call, http_client, kind_of_exc, mcp_session
from psycopg.conninfo import make_conninfo


def _scale_process(base_url: str, work: list[tuple[int, int, str]], start_at: float, cap_s: float,
                   conn: Any) -> None:
    calls: list[tuple[str, float]] = []
    acked: list[tuple[int, str]] = []
    sessions: Counter[str] = Counter()
    clients: dict[int, httpx2.AsyncClient] = {}

    async def session(n: int, agent: int, client: httpx2.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        try:
            async with mcp_session(base_url, client) as s:
                for step, tool in enumerate(("execute", "query", "execute")):
                    key = f"s{n}-{step}"
                    if tool == "execute":
                        got = await call(s, tool, "agent", "INSERT INTO t VALUES ($1, $2)", [key, n])
                    else:
                        got = await call(s, tool, "agent", "SELECT count(*) FROM t")
                    calls.append(got)
                    if got[0] == "ok" and tool == "execute":
                        acked.append((agent, key))
                    if got[0].startswith("client: "):
                        sessions["broken"] += 1
                        return
            sessions["completed"] += 1
        except Exception as exc:
            sessions[kind_of_exc(exc)] += 1

    async def run() -> float:
        for _, agent, token in work:
            if agent not in clients:
                clients[agent] = http_client(token)
        try:
            await asyncio.wait_for(asyncio.gather(*(session(n, a, clients[a]) for n, a, _ in work)), cap_s)
        except TimeoutError:
            sessions["unfinished at the cap"] += len(work) - sum(sessions.values())
        finally:
            ended = time.time()
            for c in clients.values():
                await c.aclose()
        return ended

    ended = asyncio.run(run())
    conn.send((calls, acked, dict(sessions), ended, SAMPLES))
    conn.close()


def scale(base_url: str, agents: list[dict[str, Any]], admin_dsn: str, args: argparse.Namespace) -> tuple[
        dict[str, Any], list[float]]:
    work = [(n, n % len(agents), agents[n % len(agents)]["token"]) for n in range(args.sessions)]
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 4
    procs, pipes = [], []
    for i in range(args.clients):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_scale_process, args=(base_url, work[i::args.clients], start_at, args.scale_cap_s,
                                                     child))
        p.start()
        procs.append(p)
        pipes.append(parent)
    calls: list[tuple[str, float]] = []
    acked: list[tuple[int, str]] = []
    sessions: Counter[str] = Counter()
    samples: dict[str, str] = {}
    ended = start_at
    for parent, p in zip(pipes, procs, strict=True):
        c, a, s, e, m = parent.recv()
        for kind, message in m.items():
            samples.setdefault(kind, message)
        calls += c
        acked += a
        sessions.update(s)
        ended = max(ended, e)
        p.join()
    wall = ended - start_at
    by_agent: dict[int, list[str]] = {}
    for agent, key in acked:
        by_agent.setdefault(agent, []).append(key)
    missing = 0
    for agent, keys in by_agent.items():
        with psycopg.connect(make_conninfo(admin_dsn, dbname=agents[agent]["db"]), autocommit=True) as conn:
            present = {r[0] for r in conn.execute("SELECT k FROM t WHERE k = ANY(%s)", [keys])}
        missing += len(set(keys) - present)
    kinds = Counter(k for k, _ in calls)
    ok = [ms for k, ms in calls if k == "ok"]
    busy = [ms for k, ms in calls if k.startswith("busy")]
    doc = {"sessions": args.sessions, "calls_planned": 3 * args.sessions, "calls_answered": len(calls),
           "calls_ok": len(ok), "busy_answers": len(busy),
           "failures_by_kind": {k: v for k, v in kinds.items() if k != "ok" and not k.startswith("busy")},
           "busy_by_kind": {k: v for k, v in kinds.items() if k.startswith("busy")},
           "sessions_by_outcome": dict(sessions), "wall_s": round(wall, 1),
           "ok_calls_per_s": round(len(ok) / wall, 1) if wall > 0 else 0,
           "ok_latency_ms": percentiles(ok) if len(ok) > 1 else {},
           "busy_wait_ms": percentiles(busy) if len(busy) > 1 else {},
           "writes_acked": len(acked), "writes_missing": missing, "messages": samples}
    return doc, ok
