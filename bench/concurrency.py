"""Concurrent agents: throughput and p99 of MCP ``query`` at 1, 10, 50, 200 concurrent sessions over HTTP.

    python bench/concurrency.py [--levels 1,10,50,200] [--seconds 10] [--clients 2] [--rounds 3]

One user with as many workspaces (agents) as the highest level; every session is a different agent (its
own token, its own Postgres role) calling ``query`` (a 1-row SELECT on a 10,000-row table in the user's
global database) over streamable HTTP, back to back, for --seconds. The client is a thin MCP client (httpx,
JSON-RPC over streamable HTTP: initialize, notifications/initialized, tools/call; JSON responses), spread
over --clients processes, so the client's own cost stays small next to the server's on a 2-core machine.
The baseline, measured in the same run: the same SELECT over raw psycopg with the same number of concurrent
connections (one per agent role, each its own thread). Each level runs --rounds times; the figures are the
medians over rounds (every round's calls/s and p99 are kept in the JSON).
Writes bench/results/concurrency.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, report, throwaway_runtime, write_json

from agentpg.tokens import Principal

SQL = "SELECT id, name, price FROM items WHERE id = 42"
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def _session(base_url: str, token: str, seconds: float, start_at: float, out: list[float],
                   errors: list[int]) -> None:
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        r = await client.post("/mcp", json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}})
        r.raise_for_status()
        sid = r.headers.get("mcp-session-id")  # only a stateful server issues one
        client.headers.update({"Mcp-Protocol-Version": "2025-06-18"})
        if sid is not None:
            client.headers["Mcp-Session-Id"] = sid
        await client.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "query", "arguments": {"database": "global", "sql": SQL}}}
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.time() + seconds
        while time.time() < end:
            t0 = time.perf_counter()
            r = await client.post("/mcp", json=body)
            elapsed = (time.perf_counter() - t0) * 1000
            if r.status_code != 200 or r.json().get("result", {}).get("isError"):
                errors.append(1)
            else:
                out.append(elapsed)
        if sid is not None:
            await client.delete("/mcp")


def _client_process(base_url: str, tokens: list[str], seconds: float, start_at: float, conn: Any) -> None:
    samples: list[float] = []
    errors: list[int] = []

    async def run() -> None:
        await asyncio.gather(*(_session(base_url, t, seconds, start_at, samples, errors) for t in tokens))

    asyncio.run(run())
    conn.send((samples, len(errors)))
    conn.close()


def mcp_level(base_url: str, tokens: list[str], seconds: float, clients: int) -> tuple[list[float], int]:
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3 + len(tokens) * 0.02  # every session initialised before the clock starts
    groups = [tokens[i::clients] for i in range(clients) if tokens[i::clients]]
    procs, pipes = [], []
    for group in groups:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_client_process, args=(base_url, group, seconds, start_at, child))
        p.start()
        procs.append(p)
        pipes.append(parent)
    samples: list[float] = []
    errors = 0
    for parent, p in zip(pipes, procs, strict=True):
        got, errs = parent.recv()
        samples += got
        errors += errs
        p.join()
    return samples, errors


def raw_level(uris: list[str], seconds: float) -> list[float]:
    samples: list[float] = []
    lock = threading.Lock()
    conns = [psycopg.connect(u, autocommit=True) for u in uris]
    barrier = threading.Barrier(len(conns))

    def worker(conn: psycopg.Connection[Any]) -> None:
        local = []
        barrier.wait()
        end = time.time() + seconds
        while time.time() < end:
            t0 = time.perf_counter()
            conn.execute(SQL).fetchall()
            local.append((time.perf_counter() - t0) * 1000)
        with lock:
            samples.extend(local)

    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,10,50,200")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--pool-size", type=int, default=1, help="AGENTPG_TENANT_POOL_MAX_SIZE of the server")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    results: dict[str, dict[str, float]] = {}
    curve: list[dict[str, Any]] = []
    with throwaway_runtime(embedded_fsync=False) as rt:
        svc = rt.service
        svc.register_user("conc")
        tokens, uris = [], []
        for i in range(max(levels)):
            _, issued = svc.create_workspace_with_token("conc", f"conc-a{i:03d}")
            tokens.append(issued.secret)
            uris.append(svc.agents.target(Principal(kind="agent", token_id=issued.id, user_id="conc",
                                                   workspace_id=f"conc-a{i:03d}"), "global").uri)
        with psycopg.connect(uris[0], autocommit=True) as conn:
            conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price float8)")
            conn.execute("INSERT INTO items SELECT g, 'item ' || g, g * 1.5 FROM generate_series(1, 10000) g")
        raws = {n: raw_level(uris[:n], min(args.seconds, 5.0)) for n in levels}  # before serve holds connections
        # One pooled connection per agent: each session calls one at a time, and the default (5 per agent)
        # would let 200 agents ask for more than the embedded server's max_connections (400).
        server = ServeProcess(rt.settings.home, {"AGENTPG_TENANT_POOL_MAX_SIZE": str(args.pool_size)})
        try:
            server.wait_ready()
            for n in levels:
                rounds = [mcp_level(server.base_url, tokens[:n], args.seconds, args.clients)
                          for _ in range(args.rounds)]
                per_round = [percentiles(samples) for samples, _ in rounds]
                rates = [round(len(samples) / args.seconds, 1) for samples, _ in rounds]
                errors = sum(e for _, e in rounds)
                raw = raws[n]
                row = {k: round(statistics.median(r[k] for r in per_round), 3) for k in per_round[0]}
                results[f"MCP query, {n} sessions"] = row
                results[f"raw psycopg, {n} connections (baseline)"] = percentiles(raw)
                curve.append({"sessions": n, "calls_per_s": statistics.median(rates),
                              "calls_per_s_per_round": rates, "p99_ms_per_round": [r["p99"] for r in per_round],
                              "p50_ms": row["p50"], "p99_ms": row["p99"], "errors": errors,
                              "raw_calls_per_s": round(len(raw) / min(args.seconds, 5.0), 1),
                              "raw_p99_ms": results[f"raw psycopg, {n} connections (baseline)"]["p99"]})
                print(f"[concurrency] {json.dumps(curve[-1])}", file=sys.stderr, flush=True)
            rss = server.rss_mb()
        finally:
            server.stop()
    extra = {"curve": curve, "serve_rss_mb": round(rss, 1), "seconds_per_level": args.seconds, "rounds": args.rounds,
             "client_processes": args.clients, "tenant_pool_max_size": args.pool_size}
    report("concurrency", results, extra)
    print("\n" + "\n".join(f"{c['sessions']:>4} sessions: {c['calls_per_s']:>8} calls/s  p99 {c['p99_ms']} ms  "
                           f"errors {c['errors']}  (raw psycopg {c['raw_calls_per_s']} q/s)" for c in curve))
    path = write_json("concurrency", {"results": results, **extra})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [c["sessions"] for c in curve]
        ax.plot(xs, [c["calls_per_s"] for c in curve], marker="o", label="MCP calls/s")
        ax.set_xscale("log")
        ax.set_xlabel("concurrent MCP sessions (one agent each)")
        ax.set_ylabel("calls/s")
        ax2 = ax.twinx()
        ax2.plot(xs, [c["p99_ms"] for c in curve], marker="s", color="tab:red", label="p99 ms")
        ax2.set_ylabel("p99 ms")
        fig.legend(loc="upper center", ncol=2)
        ax.set_title("MCP query over HTTP: throughput and p99 vs concurrent agents", fontsize=9)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
