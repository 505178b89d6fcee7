"""Fair sharing (issue 18): the same load with the connection governor and without it, on max_connections = 100.

    python bench/fair_sharing.py [--users 30 --workspaces 10 --sessions 1000 --clients 2 --victim-s 15
                                  --interval-ms 20 --modes governor,off --out fair_sharing]

Setup once (embedded server on the durable defaults, fsync on, ``max_connections = 100``; users x workspaces
registered through the REST API with the admin token; a table ``t`` in every agent's database and the
cancel-swallowing ``stubborn()`` in the attacker's), then the home is copied so that each mode runs on its
own fresh server and ``agentpg serve`` (``AGENTPG_GOVERNOR_ENABLED`` true / false, statement timeout 2 s,
temp_file_limit 16 MB). Per mode: **noisy neighbour** (a victim agent's steady small calls, alone, then while
another user's agents run cancel-swallowing loops, huge values, temp-file spills and a connection flood;
afterwards, the attacker's backends still running) and **scale** (``--sessions`` concurrent MCP sessions of a
write, a read and a write over all agents; every acknowledged write looked up as the server's admin). MCP over
HTTP with the official SDK client, as bench/mcp_query.py. Also: serve's VmRSS/VmHWM per phase, the server's
client backends (sampled), connections it refused (its log), the governor's /metrics. bench/README.md
("Fair sharing") describes the method and the figures. Writes ``bench/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import httpx2
import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, report, write_json
from _fair_probes import (
    BackendSampler,
    DirectProbe,
    PgLog,
    cpu_classifier,
    governor_metrics,
    lag_between,
    loop_lag_buckets,
    memory,
    running_backends,
    serve_pids,
)
from _fair_scale import scale
from _mcp_agent import SAMPLES, call, http_client, kind_of_exc, mcp_session
from _proc_cpu import CpuAccount

from agentpg.embedded import EmbeddedPostgres

STUBBORN = """CREATE FUNCTION stubborn() RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  LOOP
    BEGIN
      PERFORM pg_sleep(0.05);
    EXCEPTION WHEN query_canceled THEN
      NULL;
    END;
  END LOOP;
END $$"""
#: (kind, database, statement, sessions per attacker agent): 16 in all, the per-token limit of calls in flight.
ATTACKS = [("stubborn", "agent", "SELECT stubborn()", 2),
           ("huge value", "global", "SELECT repeat('x', 200000000)", 2),
           ("temp spill", "agent", "SELECT count(*) FROM (SELECT g FROM generate_series(1, 2000000) g "
                                   "ORDER BY g DESC) s", 2),
           ("flood", "agent", "SELECT pg_sleep(0.05)", 5),
           ("flood", "global", "SELECT pg_sleep(0.05)", 5)]
#: Not in the default mix (it alone uses the 16 calls): CPU-heavy writes that commit all the time, so a demoted
#: user's backends often hold the server's shared write locks (WAL insertion, ProcArrayLock at commit) that
#: every other user's commit needs too: the priority inversion a demotion must not turn into a stall.
COMMITS = ("commits", "agent", "INSERT INTO t SELECT md5(g::text || random()), g FROM generate_series(1, 2000) g", 16)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- setup: users and workspaces through REST, tables through MCP -------------------------------------------


async def register(base_url: str, admin: str, users: int, workspaces: int, at_once: int) -> tuple[
        list[dict[str, Any]], list[str], dict[str, Any]]:
    """Users ``fs-uNN`` with workspaces ``fs-uNN-wMM`` (admin token; ``at_once`` requests at a time). Returns the agents
    (user index, workspace, token, database name), the users' global database names, and the timings."""
    agents: list[dict[str, Any]] = []
    global_dbs: list[str] = [""] * users
    user_ms: list[float] = []
    ws_ms: list[float] = []
    gate = asyncio.Semaphore(at_once)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {admin}"},
                                 timeout=120) as client:

        async def post(path: str, body: dict[str, Any], into: list[float]) -> dict[str, Any]:
            async with gate:
                started = time.perf_counter()
                answer = await client.post(path, json=body)
                into.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
            return dict(answer.json())

        async def one_user(u: int) -> None:
            global_dbs[u] = (await post("/api/users", {"id": f"fs-u{u:02d}"}, user_ms))["global_database"]["name"]

        async def one_workspace(u: int, w: int) -> None:
            ws = f"fs-u{u:02d}-w{w:02d}"
            made = await post(f"/api/users/fs-u{u:02d}/workspaces", {"id": ws}, ws_ms)
            agents.append({"user": u, "ws": ws, "token": made["agent_token"]["token"], "db": made["database"]["name"]})

        started = time.perf_counter()
        await asyncio.gather(*(one_user(u) for u in range(users)))
        await asyncio.gather(*(one_workspace(u, w) for w in range(workspaces) for u in range(users)))
        wall = time.perf_counter() - started
    agents.sort(key=lambda a: (a["user"], a["ws"]))
    return agents, global_dbs, {"wall_s": round(wall, 1), "users": percentiles(user_ms),
                                "workspaces": percentiles(ws_ms)}


def make_tables(admin_dsn: str, agents: list[dict[str, Any]], attacker: int) -> None:
    """``t`` (and the attacker's ``stubborn()``) in every agent's database, made by its owner role as the
    server's admin (setting up through MCP ran into the governor's connect failures: README, Fair sharing)."""
    for agent in agents:
        with psycopg.connect(make_conninfo(admin_dsn, dbname=agent["db"]), autocommit=True) as conn:
            row = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                               "WHERE datname = current_database()").fetchone()
            assert row is not None
            conn.execute(pgsql.SQL("SET ROLE {}").format(pgsql.Identifier(row[0])))
            conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int NOT NULL)")
            conn.execute("GRANT ALL ON t TO PUBLIC")
            if agent["user"] == attacker:
                conn.execute(STUBBORN)


# -- the victim and the attacker ------------------------------------------------------------------------------


async def victim(base_url: str, token: str, seconds: float, interval_ms: float, tag: str,
                 start_at: float | None = None, by_op: dict[str, list[float]] | None = None
                 ) -> tuple[list[float], Counter[str], list[str]]:
    """One call every ``interval_ms`` (not overlapping: a late call makes the next one start at once); ``by_op``
    gets the latencies of the writes (``execute``, a commit: fsync'd) and of the reads (``query``) apart."""
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    acked: list[str] = []
    async with http_client(token) as client, mcp_session(base_url, client) as s:
        await call(s, "query", "agent", "SELECT 1")  # the pool's connection and the SDK's tools/list
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        began = time.perf_counter()
        i = 0
        while time.perf_counter() - began < seconds:
            due = began + i * interval_ms / 1000
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            key = f"{tag}-{i}"
            if i % 2 == 0:
                kind, ms = await call(s, "execute", "agent", "INSERT INTO t VALUES ($1, $2)", [key, i])
            else:
                kind, ms = await call(s, "query", "agent", "SELECT v FROM t WHERE k = $1", [f"{tag}-{i - 1}"])
            if kind == "ok":
                latencies.append(ms)
                if by_op is not None:
                    by_op.setdefault("execute" if i % 2 == 0 else "query", []).append(ms)
                if i % 2 == 0:
                    acked.append(key)
            else:
                failures[kind] += 1
            i += 1
    return latencies, failures, acked


def _attacker_process(base_url: str, tokens: list[str], start_at: float, stop_at: float, conn: Any,
                      kinds: frozenset[str], nice: int) -> None:
    if nice:  # the attacker's own client stands in for another machine: keep its CPU off the victim's path
        os.nice(nice)
    outcomes: dict[str, Counter[str]] = {}
    latencies: list[float] = []

    async def attack(kind: str, database: str, sql: str, client: httpx2.AsyncClient) -> None:
        counts = outcomes.setdefault(kind, Counter())
        await asyncio.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            try:
                async with mcp_session(base_url, client) as s:
                    while time.time() < stop_at:
                        got, ms = await call(s, "execute" if kind == "commits" else "query", database, sql)
                        counts[got] += 1
                        latencies.append(ms)
                        if got.startswith("client: "):
                            break
            except Exception as exc:  # a session that failed to open or broke: count it, open another
                counts["session: " + kind_of_exc(exc)] += 1
                await asyncio.sleep(0.1)

    async def run() -> None:
        clients = [http_client(t) for t in tokens]
        try:
            await asyncio.wait_for(asyncio.gather(*(
                attack(kind, db, sql, c) for c in clients
                for kind, db, sql, n in [*ATTACKS, COMMITS] if kind in kinds for _ in range(n))),
                stop_at - time.time() + 60)
        finally:
            for c in clients:
                await c.aclose()

    asyncio.run(run())
    conn.send(({k: dict(v) for k, v in outcomes.items()}, len(latencies), SAMPLES))
    conn.close()






def noisy_neighbour(base_url: str, serve_pid: int, agents: list[dict[str, Any]], dbs: list[str], admin_dsn: str,
                    args: argparse.Namespace, mode: str, admin: str
                    ) -> tuple[dict[str, Any], dict[str, list[float]]]:
    token = next(a["token"] for a in agents if a["user"] == 0)
    lag_start = loop_lag_buckets(base_url, admin)
    log("  victim alone")
    quiet_ops: dict[str, list[float]] = {}
    loaded_ops: dict[str, list[float]] = {}
    victim_db = next(a["db"] for a in agents if a["user"] == 0)
    quiet_account = CpuAccount(cpu_classifier(serve_pid, 0, dbs, victim_db))
    quiet_account.start()
    quiet, quiet_fail, acked_q = asyncio.run(victim(base_url, token, args.victim_s, args.interval_ms, f"q-{mode}",
                                                    by_op=quiet_ops))
    quiet_cpu = quiet_account.stop()
    lag_quiet = loop_lag_buckets(base_url, admin)
    attackers = [a["token"] for a in agents if a["user"] == 1]
    start_at = time.time() + 3  # the attacker's process is up
    stop_at = start_at + 2 + args.victim_s
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_attacker_process, args=(base_url, attackers, start_at, stop_at, child,
                                                       frozenset(args.attacks.split(",")), args.attacker_nice))
    proc.start()
    log("  victim under attack")
    probe = DirectProbe(make_conninfo(admin_dsn, dbname=victim_db))
    probe.start()
    account = CpuAccount(cpu_classifier(serve_pid, proc.pid or 0, dbs, victim_db), start_at=start_at + 2)
    account.start()
    loaded, loaded_fail, acked_l = asyncio.run(victim(base_url, token, args.victim_s, args.interval_ms,
                                                      f"l-{mode}", start_at=start_at + 2, by_op=loaded_ops))
    cpu = account.stop()
    lag_loaded = loop_lag_buckets(base_url, admin)  # the attacker's head start and tail included
    probed = probe.stop()
    outcomes, attacker_calls, samples = parent.recv()
    proc.join()
    returned = time.time()
    at_once = running_backends(admin_dsn, dbs)
    time.sleep(3)
    later = running_backends(admin_dsn, dbs)
    acked = acked_q + acked_l
    with psycopg.connect(make_conninfo(admin_dsn, dbname=victim_db), autocommit=True) as conn:
        present = {r[0] for r in conn.execute("SELECT k FROM t WHERE k = ANY(%s)", [acked])}
    qp, lp = percentiles(quiet), percentiles(loaded)
    doc = {"victim_quiet": qp, "victim_loaded": lp, "direct_probe_loaded": percentiles(probed),
           "p50_ratio": round(lp["p50"] / qp["p50"], 2), "p99_ratio": round(lp["p99"] / qp["p99"], 2),
           "victim_failures_quiet": dict(quiet_fail), "victim_failures_loaded": dict(loaded_fail),
           "victim_messages": {k: SAMPLES.get(k, "") for k in {*quiet_fail, *loaded_fail}},
           "victim_writes_acked": len(acked), "victim_writes_missing": len(set(acked) - present),
           "victim_by_op": {f"{phase} {op}": percentiles(values) for phase, ops in
                            (("quiet", quiet_ops), ("under attack", loaded_ops)) for op, values in ops.items()},
           "cpu_s_quiet": quiet_cpu, "run_queue_wait_s_quiet": quiet_account.waits,
           "cpu_s_under_attack": cpu, "run_queue_wait_s_under_attack": account.waits,
           "serve_loop_lag_quiet": lag_between(lag_start, lag_quiet),
           "serve_loop_lag_under_attack": lag_between(lag_quiet, lag_loaded),
           "attacker_calls": attacker_calls, "attacker_outcomes": outcomes,
           "attacker_messages": samples,
           "attacker_backends_after": {"at_once": at_once, "after_3_s": later},
           "attacker_returned_s_after_stop": round(returned - stop_at, 1)}
    return doc, {"quiet": quiet, "loaded": loaded, "probe": probed}


# -- setup once, then one fresh server per mode --------------------------------------------------------------

#: serve's settings in every mode (besides AGENTPG_GOVERNOR_ENABLED); ServeProcess adds no rate limit, no warm pool.
SERVE_ENV = {"AGENTPG_EMBEDDED_MAX_CONNECTIONS": "100", "AGENTPG_MCP_STATEMENT_TIMEOUT_S": "2",
             "AGENTPG_TENANT_TEMP_FILE_LIMIT_MB": "16"}


def embedded(home: Path) -> tuple[EmbeddedPostgres, str]:
    """The home's embedded server (durable: fsync on), started; its admin DSN (a secret: never printed)."""
    server = EmbeddedPostgres(home, fsync=True, extra_conf={"max_connections": "100"})
    return server, server.ensure_running().dsn("postgres")


def setup(home: Path, admin: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Registration through serve's REST API and the tables through MCP, on a fresh server in ``home``."""
    server_pg, admin_dsn = embedded(home)
    try:
        server = ServeProcess(home, {**SERVE_ENV, "AGENTPG_ADMIN_TOKEN": admin})
        try:
            server.wait_ready()
            log(f"registering {args.users} x {args.workspaces}")
            agents, global_dbs, doc = asyncio.run(
                register(server.base_url, admin, args.users, args.workspaces, args.register_at_once))
            log(f"registered in {doc['wall_s']} s; tables")
            started = time.perf_counter()
            make_tables(admin_dsn, agents, attacker=1)
            doc["tables_s"] = round(time.perf_counter() - started, 1)
        finally:
            server.stop()
    finally:
        server_pg.stop()
    return agents, global_dbs, doc


def run_mode(mode: str, home: Path, admin: str, agents: list[dict[str, Any]], global_dbs: list[str],
             args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    governed = mode.startswith("governor")
    env = {**SERVE_ENV, "AGENTPG_GOVERNOR_ENABLED": str(governed).lower(), "AGENTPG_ADMIN_TOKEN": admin}
    if mode.startswith("governor-cap"):  # e.g. governor-cap1: AGENTPG_GOVERNOR_USER_CAP=1
        env["AGENTPG_GOVERNOR_USER_CAP"] = mode.removeprefix("governor-cap")
    if mode == "governor-nocpu":  # the CPU shares off (lifecycle/cpu_shares.py), to see what they change
        env["AGENTPG_CPU_DEMOTED_NICE"] = "0"
    if mode == "governor-idle":  # a demoted user's group in the kernel's idle class (AGENTPG_CPU_DEMOTED_IDLE)
        env["AGENTPG_CPU_DEMOTED_IDLE"] = "true"
    if mode == "governor-servenice0":  # serve keeps its priority (AGENTPG_SERVE_NICE=0)
        env["AGENTPG_SERVE_NICE"] = "0"
    if mode == "governor-nogroups":  # CPU shares by renicing each backend (no per-user control groups)
        env["AGENTPG_CPU_GROUPS"] = "false"
    if mode.startswith("governor-nice"):  # e.g. governor-nice19: demoted users' backends at nice 19
        env["AGENTPG_CPU_DEMOTED_NICE"] = mode.removeprefix("governor-nice")
    doc: dict[str, Any] = {"settings": {k: v for k, v in env.items() if k != "AGENTPG_ADMIN_TOKEN"}}
    rows: dict[str, dict[str, float]] = {}
    server_pg, admin_dsn = embedded(home)
    try:
        pglog = PgLog(server_pg.log_file)
        server = ServeProcess(home, env)
        try:
            server.wait_ready()
            pid = server.process.pid
            doc["serve_pids"] = serve_pids(pid)
            doc["memory"] = {"after_start": memory(pid)}
            pglog.refused_since()
            attacker_dbs = [a["db"] for a in agents if a["user"] == 1] + [global_dbs[1]]
            log(f"[{mode}] noisy neighbour")
            sampler = BackendSampler(admin_dsn)
            sampler.start()
            doc["noisy"], _ = noisy_neighbour(server.base_url, pid, agents, attacker_dbs, admin_dsn, args, mode,
                                              admin)
            doc["noisy"]["backends"] = sampler.stop()
            doc["noisy"]["server_refused_connections"] = pglog.refused_since()
            doc["memory"]["after_noisy"] = memory(pid)
            if governed:
                doc["noisy"]["governor_metrics"] = asyncio.run(governor_metrics(server.base_url, admin))
            rows[f"[{mode}] victim quiet"] = doc["noisy"]["victim_quiet"]
            rows[f"[{mode}] victim under attack"] = doc["noisy"]["victim_loaded"]
            rows[f"[{mode}] same read, straight to PostgreSQL"] = doc["noisy"]["direct_probe_loaded"]
            if not args.sessions:
                doc["scale"] = None
                return doc, rows
            log(f"[{mode}] scale: {args.sessions} sessions")
            sampler = BackendSampler(admin_dsn)
            sampler.start()
            doc["scale"], _ = scale(server.base_url, agents, admin_dsn, args)
            doc["scale"]["backends"] = sampler.stop()
            doc["scale"]["server_refused_connections"] = pglog.refused_since()
            doc["memory"]["after_scale"] = memory(pid, reset=False)
            if doc["scale"]["ok_latency_ms"]:
                rows[f"[{mode}] scale: ok calls"] = doc["scale"]["ok_latency_ms"]
            if doc["scale"]["busy_wait_ms"]:
                rows[f"[{mode}] scale: busy answers"] = doc["scale"]["busy_wait_ms"]
            if governed:
                doc["governor_metrics"] = asyncio.run(governor_metrics(server.base_url, admin))
            doc["serve_exit_code"] = server.process.poll()
        finally:
            server.stop()
    finally:
        server_pg.stop()
    return doc, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--workspaces", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=2, help="client processes for the scale phase")
    parser.add_argument("--register-at-once", type=int, default=8, help="registration requests at a time")
    parser.add_argument("--scale-cap-s", type=float, default=120.0)
    parser.add_argument("--victim-s", type=float, default=15.0)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--modes", default="governor,off",
                        help="comma-separated: governor, off, governor-capN (AGENTPG_GOVERNOR_USER_CAP=N), "
                             "governor-nocpu (AGENTPG_CPU_DEMOTED_NICE=0), governor-niceN (=N), "
                             "governor-nogroups (AGENTPG_CPU_GROUPS=false), "
                             "governor-servenice0 (AGENTPG_SERVE_NICE=0), "
                             "governor-idle (AGENTPG_CPU_DEMOTED_IDLE=true)")
    parser.add_argument("--attacks", default=",".join(dict.fromkeys(kind for kind, *_ in ATTACKS)),
                        help="which of the attacker's kinds run (comma-separated), to tell their effects apart; "
                             "'commits' (not in the default) runs CPU-heavy committing writes")
    parser.add_argument("--attacker-nice", type=int, default=0,
                        help="nice the attacker's client process (on 2 cores its CPU slows the victim's client)")
    parser.add_argument("--out", default="fair_sharing")
    args = parser.parse_args()
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    modes: dict[str, Any] = {}
    results: dict[str, dict[str, float]] = {}
    admin = "apg_a_" + secrets.token_urlsafe(32)
    base = Path(tempfile.mkdtemp(prefix="agentpg-bench-fair-", dir="/tmp"))
    base.chmod(0o711)
    try:
        homes = {mode: base / mode for mode in args.modes.split(",")}
        first = next(iter(homes.values()))
        first.mkdir()
        first.chmod(0o711)
        agents, global_dbs, registration = setup(first, admin, args)
        copied = time.perf_counter()
        for home in homes.values():  # the same registered state for every mode, each on its own server
            if home != first:
                subprocess.run(["cp", "-a", str(first), str(home)], check=True)
        registration["copy_s"] = round(time.perf_counter() - copied, 1)
        for mode, home in homes.items():
            modes[mode], rows = run_mode(mode, home, admin, agents, global_dbs, args)
            results.update(rows)
    finally:  # ~5 GB of durable files: removed in the background (ext4 discards make it take minutes here)
        subprocess.Popen(["rm", "-rf", str(base)], start_new_session=True)
    extra: dict[str, Any] = {"setup": registration, "modes": modes, "loadavg_at_start": load_before,
                             "wall_s": round(time.perf_counter() - started, 1), "args": vars(args)}
    report("fair_sharing", results, extra)
    print()
    for mode, doc in modes.items():
        s, n = doc["scale"], doc["noisy"]
        if s is not None:
            print(f"[{mode}] scale: {s['calls_ok']} ok, {s['busy_answers']} busy, failures {s['failures_by_kind']}, "
                  f"sessions {s['sessions_by_outcome']}, {s['ok_calls_per_s']} ok calls/s in {s['wall_s']} s, "
                  f"writes missing {s['writes_missing']}/{s['writes_acked']}, backends {s['backends']}, "
                  f"refused by the server {s['server_refused_connections']}")
        print(f"[{mode}] noisy: victim p50 {n['victim_quiet']['p50']} -> {n['victim_loaded']['p50']} ms "
              f"(x{n['p50_ratio']}), p99 {n['victim_quiet']['p99']} -> {n['victim_loaded']['p99']} ms "
              f"(x{n['p99_ratio']}), failures {n['victim_failures_loaded']}, attacker backends running after "
              f"{n['attacker_backends_after']}")
        print(f"[{mode}] CPU seconds while the victim ran alone: {n['cpu_s_quiet']}")
        print(f"[{mode}] CPU seconds while the victim ran under attack: {n['cpu_s_under_attack']}")
        print(f"[{mode}] seconds runnable but waiting for a core, same window: {n['run_queue_wait_s_under_attack']}")
        print(f"[{mode}] serve's event-loop lag, quiet: {n['serve_loop_lag_quiet']}; under attack: "
              f"{n['serve_loop_lag_under_attack']}")
        for name, p in n["victim_by_op"].items():
            print(f"[{mode}] victim {name}: p50 {p['p50']} ms, p99 {p['p99']} ms ({p['n']} calls)")
        print(f"[{mode}] serve memory: {doc['memory']}")
    write_json(args.out, {"benchmark": "fair_sharing", "results": results, **extra})


if __name__ == "__main__":
    main()
