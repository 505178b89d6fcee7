"""A platform's day (issue 22): a steady mixed load on a fresh ``agentpg serve`` (fsync on), stepped up until
routes leave their goals.

    python bench/platform_day.py [--users 20 --rates 5,10,20,40 --step-s 60 --out platform_day]

Setup: ``--users`` users with two workspaces each, through REST; a table ``notes`` in every global database
(through MCP, as an agent). Then, for each offered rate in ``--rates`` (requests/s, all routes together),
``--step-s`` seconds of open-loop load (Poisson arrivals, so a slow answer does not slow the arrivals, as with
real users) in this mix:

    registration (POST /api/users) 4 % · workspace created 4 % · workspace deleted 3 % · REST user (GET) 12 %
    REST rows (POST …/global-database/query, 100 rows) 15 % · MCP query (1 row) 40 % · MCP execute (INSERT) 22 %

while ``serve`` also runs its usage sync every 15 s and its warm pool refills (base 8). MCP calls are
single streamable-HTTP POSTs (stateless, protocol 2025-06-18, no session), REST calls carry the admin token.
Reports each route's p50/p99 per rate, the throughput achieved, errors, and per route the first rate at
which its p99 left its goal; draws p99 against the offered rate (``bench/results/<out>.png`` with
matplotlib, from the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, pyplot, report, write_json

from agentpg.embedded import EmbeddedPostgres
from agentpg.settings import Settings

MIX: dict[str, float] = {"register": 0.04, "workspace_create": 0.04, "workspace_delete": 0.03, "rest_user": 0.12,
                         "rest_rows": 0.15, "mcp_query": 0.40, "mcp_execute": 0.22}
GOAL_P99_MS: dict[str, float] = {
    "register": 40.0,  # issue 22: registration p99 <= 40 ms
    "workspace_create": 100.0, "workspace_delete": 200.0,  # a new database's roles and grants; a drop
    "rest_user": 10.0, "rest_rows": 50.0,
    "mcp_query": 20.0, "mcp_execute": 30.0,
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "MCP-Protocol-Version": "2025-06-18"}


class Day:
    def __init__(self, api: httpx.AsyncClient, agents: list[tuple[str, str]], users: list[str]) -> None:
        self.api = api
        self.agents = agents  # (user, agent token)
        self.users = users
        self.spare: list[tuple[str, str]] = []  # (user, workspace) made during the run, to delete
        self.ids = itertools.count()
        self.samples: dict[str, list[float]] = {route: [] for route in MIX}
        self.errors: dict[str, int] = {route: 0 for route in MIX}

    async def mcp(self, token: str, name: str, arguments: dict[str, Any]) -> None:
        body = {"jsonrpc": "2.0", "id": next(self.ids), "method": "tools/call",
                "params": {"name": name, "arguments": arguments}}
        r = await self.api.post("/mcp", json=body, headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"})
        answer = r.json()
        if r.status_code != 200 or "error" in answer or answer.get("result", {}).get("isError"):
            raise RuntimeError(json.dumps(answer)[:200])

    async def call(self, route: str, rng: random.Random) -> None:
        n = next(self.ids)
        user, token = rng.choice(self.agents)
        if route == "register":
            r = await self.api.post("/api/users", json={"id": f"day-{n}"})
            ok = r.status_code == 201
        elif route == "workspace_create":
            owner = rng.choice(self.users)
            r = await self.api.post(f"/api/users/{owner}/workspaces", json={"id": f"dw-{n}"})
            ok = r.status_code == 201
            if ok:
                self.spare.append((owner, f"dw-{n}"))
        elif route == "workspace_delete":
            if not self.spare:
                return
            owner, ws = self.spare.pop(0)
            r = await self.api.delete(f"/api/users/{owner}/workspaces/{ws}")
            ok = r.status_code == 204
        elif route == "rest_user":
            r = await self.api.get(f"/api/users/{user}")
            ok = r.status_code == 200
        elif route == "rest_rows":
            r = await self.api.post(f"/api/users/{user}/global-database/query", json={"table": "notes", "limit": 100})
            ok = r.status_code == 200
        elif route == "mcp_query":
            await self.mcp(token, "query", {"database": "global", "sql": "SELECT id, body FROM notes WHERE id = 1"})
            ok = True
        else:
            await self.mcp(token, "execute", {"database": "global", "sql": "INSERT INTO notes (body) VALUES ($1)",
                                              "params": [f"note {n}"]})
            ok = True
        if not ok:
            raise RuntimeError(f"{route}: HTTP {r.status_code} {r.text[:200]}")

    async def timed(self, route: str, rng: random.Random) -> None:
        start = time.perf_counter()
        try:
            await self.call(route, rng)
        except Exception:
            self.errors[route] += 1
            return
        self.samples[route].append((time.perf_counter() - start) * 1000)


async def setup(api: httpx.AsyncClient, users: int) -> tuple[list[tuple[str, str]], list[str]]:
    agents: list[tuple[str, str]] = []
    names = [f"org-{i}" for i in range(users)]
    for user in names:
        assert (await api.post("/api/users", json={"id": user})).status_code == 201
        for w in range(2):
            r = await api.post(f"/api/users/{user}/workspaces", json={"id": f"{user}-a{w}"})
            assert r.status_code == 201, r.text
            agents.append((user, r.json()["agent_token"]["token"]))
    day = Day(api, agents, names)
    for _user, token in agents[::2]:  # the first agent of each user makes the shared table
        await day.mcp(token, "execute", {"database": "global", "sql": "CREATE TABLE notes (id serial PRIMARY KEY, "
                                                                      "body text NOT NULL)"})
        await day.mcp(token, "execute", {"database": "global", "sql": "INSERT INTO notes (body) SELECT 'seed ' || g "
                                                                      "FROM generate_series(1, 500) g"})
    return agents, names


async def step(day: Day, rate: float, seconds: float, rng: random.Random) -> float:
    routes, weights = list(MIX), list(MIX.values())
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    next_at = start
    sent = 0
    while next_at - start < seconds:
        next_at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        task = asyncio.create_task(day.timed(rng.choices(routes, weights)[0], rng))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    return sent / (time.perf_counter() - start)


async def run(base_url: str, token: str, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60,
                                 limits=limits) as api:
        agents, users = await setup(api, args.users)
        rng = random.Random(22)  # noqa: S311 - a reproducible load, not a secret
        levels: list[dict[str, Any]] = []
        for rate in args.rates:
            day = Day(api, agents, users)
            achieved = await step(day, rate, args.step_s, rng)
            levels.append({"offered_per_s": rate, "achieved_per_s": round(achieved, 2), "errors": day.errors,
                           "routes": {r: percentiles(s) for r, s in day.samples.items() if len(s) >= 2}})
            print(f"rate {rate}/s: {sum(len(s) for s in day.samples.values())} calls, errors {day.errors}",
                  file=sys.stderr, flush=True)
        return {"levels": levels}


def plot(levels: list[dict[str, Any]], out: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rates = [lv["offered_per_s"] for lv in levels]
    for route in MIX:
        ys = [lv["routes"].get(route, {}).get("p99") for lv in levels]
        ax.plot(rates, ys, marker="o", label=f"{route} (goal {GOAL_P99_MS[route]:g} ms)")
    ax.set_xlabel("offered load, requests/s (all routes)")
    ax.set_ylabel("p99 latency, ms (log)")
    ax.set_yscale("log")
    ax.set_title("agentpg: a platform's day, fsync on")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(__file__).parent / "results" / f"{out}.png"
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[5.0, 10.0, 20.0, 40.0])
    parser.add_argument("--step-s", type=float, default=60.0)
    parser.add_argument("--out", default="platform_day")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="agentpg-bench-", dir="/tmp"))
    home.chmod(0o711)
    serve = ServeProcess(home, {"AGENTPG_WARM_POOL_SIZE": "8", "AGENTPG_USAGE_SYNC_INTERVAL_S": "15"})
    try:
        serve.wait_ready(timeout=120)
        token = (home / "admin-token").read_text().strip()
        doc = asyncio.run(run(serve.base_url, token, args))
    finally:
        serve.stop()
        try:
            EmbeddedPostgres(home, os_user=Settings(home=home).postgres_os_user).stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
    levels = doc["levels"]
    breaks = {}
    for route, goal in GOAL_P99_MS.items():
        over = [lv["offered_per_s"] for lv in levels if lv["routes"].get(route, {}).get("p99", 0) > goal]
        breaks[route] = over[0] if over else None
    results = {f"{route} @ {lv['offered_per_s']:g}/s": lv["routes"][route]
               for lv in levels for route in MIX if route in lv["routes"]}
    extra = {"fsync": "on (default)", "mix": MIX, "goal_p99_ms": GOAL_P99_MS, "p99_leaves_goal_at_per_s": breaks,
             "level_summary": [{k: v for k, v in lv.items() if k != "routes"} for lv in levels]}
    report("platform_day", results, extra)
    write_json(args.out, {"benchmark": "platform_day", **doc, **extra})
    plot(levels, args.out)


if __name__ == "__main__":
    main()
