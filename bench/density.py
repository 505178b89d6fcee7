"""Density: N users x (1 global + 2 agent databases) on one embedded server, with `agentpg serve` running.

    python bench/density.py [--users 1000] [--requests 300] [--rounds 3]

Registers users and workspaces one after another (warm pool off: every database is a real CREATE DATABASE)
and measures, at 10, 300, 1,000, 2,000 and 3N databases, the API's latency on that server:
``GET /api/users/{id}`` (a random existing user: catalog lookups) and ``POST …/global-database/query``
(10 rows of a small table in one user's global database: token auth, catalog, tenant pool, READ ONLY read).

The baseline is a **reference server with 10 databases** (its own embedded server and ``agentpg serve``, set
up the same way) measured in the same minutes: each point runs ``--rounds`` rounds on each server,
alternately, and reports the median of each percentile over the rounds. A p99 compared with one taken
minutes earlier moves with the VM by up to a third on its own (``density_drift.py``); one taken seconds
apart does not. While one server is measured, the other's autovacuum is switched off (``ALTER SYSTEM`` and a
reload), so each is measured with only its own background work, which is what grows with the number of
databases (autovacuum's worker starts; their rate on the machine is recorded per point). The big server's
p99 at 10 databases minutes earlier is reported too (``vs_itself_at_10``), as the older form of the figure.

Each point starts with a ``CHECKPOINT`` of the big server, so it measures the API at that many databases
rather than the write-back of the burst of CREATE DATABASE that made them; and this (client) process's
garbage collector is paused during each round, since its own heap grows with every database it made.
Also reports ``agentpg serve``'s RSS at each point and the disk per tenant (du of the server's data
directory, and the sum of pg_database_size over tenant databases, divided by the number of users).
Writes bench/results/density.json and a PNG of p99 against the number of databases.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, pyplot, report, throwaway_runtime

from agentpg.app.runtime import Runtime, admin_token
from agentpg.service import Service

OUT = Path(__file__).parent / "results"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out else 0


def measure_round(client: httpx.Client, user_ids: list[str], requests: int) -> dict[str, dict[str, float]]:
    """One round of :func:`measure` with this process's garbage collector kept out of it."""
    # This process also made every database through the service, so its heap grows with N and a full
    # collection during a round would be the client's pause, not the API's: collect first, then keep
    # the collector out of the measured requests.
    gc.collect()
    gc.disable()
    try:
        return measure(client, user_ids, requests)
    finally:
        gc.enable()


def merge_rounds(runs: list[dict[str, dict[str, float]]]) -> tuple[dict[str, dict[str, float]],
                                                                    dict[str, list[float]]]:
    """Median over the rounds of each percentile, and each round's p99 per case."""
    merged = {case: {k: (round(statistics.median(r[case][k] for r in runs), 3) if k != "n" else
                         sum(r[case]["n"] for r in runs)) for k in runs[0][case]} for case in runs[0]}
    return merged, {case: [r[case]["p99"] for r in runs] for case in runs[0]}


def measure_rounds(client: httpx.Client, user_ids: list[str], requests: int,
                   rounds: int) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """``rounds`` rounds a few seconds apart on one server: see :func:`merge_rounds`."""
    runs = []
    for _ in range(rounds):
        runs.append(measure_round(client, user_ids, requests))
        time.sleep(2)
    return merge_rounds(runs)


@dataclass
class Side:
    """One server of the comparison: its ``agentpg serve``, a client of it, the users to GET, its admin DSN."""

    name: str
    server: ServeProcess
    client: httpx.Client
    users: list[str]
    admin_dsn: str
    autovacuum: bool = True
    runs: list[dict[str, dict[str, float]]] = field(default_factory=list)
    starts_per_s: list[float] = field(default_factory=list)

    def set_autovacuum(self, on: bool) -> bool:
        """Switch this server's autovacuum launcher on (its configuration again) or off; True if it changed."""
        if on == self.autovacuum:
            return False
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET autovacuum" if on else "ALTER SYSTEM SET autovacuum = off")
            conn.execute("SELECT pg_reload_conf()")
        self.autovacuum = on
        return True


def process_starts() -> int:
    """Processes started on the machine since boot (``/proc/stat``): autovacuum workers show up here."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def measure_alternately(sides: list[Side], requests: int, rounds: int) -> None:
    """``rounds`` rounds on each side, alternating (ABBA…), each with only the measured side's autovacuum on;
    appends to each side's ``runs`` and ``starts_per_s``. Leaves every side's autovacuum on."""
    for side in sides:
        side.runs, side.starts_per_s = [], []
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            changed = [other.set_autovacuum(False) for other in sides if other is not side]
            if side.set_autovacuum(True) or any(changed):
                time.sleep(3)  # the launcher exits, or starts and spreads its schedule over the naptime
            starts, t0 = process_starts(), time.monotonic()
            side.runs.append(measure_round(side.client, side.users, requests))
            side.starts_per_s.append(round((process_starts() - starts) / (time.monotonic() - t0), 2))
            time.sleep(2)
    for side in sides:
        side.set_autovacuum(True)


def measure(client: httpx.Client, user_ids: list[str], requests: int) -> dict[str, dict[str, float]]:
    get_samples, query_samples = [], []
    body = {"table": "items", "limit": 10}
    for _ in range(20):  # warm-up: pools, caches
        client.get(f"/api/users/{user_ids[0]}")
        client.post(f"/api/users/{user_ids[0]}/global-database/query", json=body)
    for _ in range(requests):
        uid = random.choice(user_ids)  # noqa: S311 - not a secret
        start = time.perf_counter()
        r = client.get(f"/api/users/{uid}")
        get_samples.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, r.text
        start = time.perf_counter()
        r = client.post(f"/api/users/{user_ids[0]}/global-database/query", json=body)
        query_samples.append((time.perf_counter() - start) * 1000)
        assert r.status_code == 200, r.text
    return {"GET /api/users/{id}": percentiles(get_samples),
            "POST global-database/query (10 rows)": percentiles(query_samples)}


def server_slow_counts(client: httpx.Client) -> dict[str, float]:
    """From serve's own /metrics: how many requests of the two measured routes took longer than 5 and 10 ms
    inside the server (the histogram's buckets), to tell a slower server from a slower client or network."""
    text = client.get("/metrics").text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("agentpg_http_request_duration_seconds_"):
            continue
        name, _, value = line.rpartition(" ")
        route = "query" if "global-database/query" in name else "get_user" if 'route="/api/users/{user_id}"' in name \
            else None
        if route is None:
            continue
        if name.startswith("agentpg_http_request_duration_seconds_count"):
            counts[f"{route} total"] = counts.get(f"{route} total", 0) + float(value)
        for bound in ("0.005", "0.01"):
            if f'le="{bound}"' in name:
                key = f"{route} >{float(bound) * 1000:g}ms"
                counts[key] = counts.get(key, 0) - float(value)
    for route in ("query", "get_user"):
        for bound in ("5", "10"):
            if f"{route} >{bound}ms" in counts:
                counts[f"{route} >{bound}ms"] += counts.get(f"{route} total", 0)
    return counts


def start_profile(server: ServeProcess, n_dbs: int) -> subprocess.Popen[bytes] | None:
    import shutil

    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("[density] --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(server.process.pid), "--rate", "200", "--format", "raw",
                             "--output", str(OUT / f"density-profile-{n_dbs}.txt"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


CASES = ("GET /api/users/{id}", "POST global-database/query (10 rows)")


def add_database(svc: Service, uid: str, step: int, *, first: bool) -> None:
    """The next database of user ``uid``: step 0 registers it (global database; the very first user's gets
    the table the query case reads), steps 1 and 2 create a workspace (agent database)."""
    if step:
        svc.create_workspace(uid, f"{uid}-w{step}")
        return
    svc.register_user(uid)
    if first:
        with psycopg.connect(svc.uris.platform(uid), autocommit=True) as conn:
            conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name FROM generate_series(1, 100) g")
            conn.execute("ALTER TABLE items ADD PRIMARY KEY (id)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds per server and point (medians)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy (must be installed) records `agentpg serve` during each checkpoint's rounds "
                             "into results/density-profile-<dbs>.txt (raw stacks)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    with throwaway_runtime(embedded_fsync=False) as rt, throwaway_runtime(embedded_fsync=False) as ref_rt:
        svc = rt.service
        ref_users: list[str] = []
        for n in range(10):  # the reference: 10 databases, laid out as the big server's first 10
            add_database(ref_rt.service, f"r{n // 3:05d}", n % 3, first=n == 0)
            ref_users += [f"r{n // 3:05d}"] if n % 3 == 0 else []
        server, ref_server = ServeProcess(rt.settings.home), ServeProcess(ref_rt.settings.home)
        server.wait_ready()
        ref_server.wait_ready()
        results: dict[str, dict[str, float]] = {}
        curve: list[dict[str, Any]] = []
        users: list[str] = []
        n_dbs = 0
        reg_ms: list[float] = []
        start_all = time.perf_counter()
        checkpoints = sorted({10, 300, 1000, 2000, 3 * args.users} | {3 * args.users})
        try:
            with httpx.Client(base_url=server.base_url, headers=_auth(rt), timeout=60) as client, \
                    httpx.Client(base_url=ref_server.base_url, headers=_auth(ref_rt), timeout=60) as ref_client:
                big = Side("big", server, client, users, rt.admin_dsn)
                ref = Side("reference", ref_server, ref_client, ref_users, ref_rt.admin_dsn)
                for i in range(args.users):
                    uid = f"d{i:05d}"
                    for step in range(3):
                        t0 = time.perf_counter()
                        add_database(svc, uid, step, first=i == 0)
                        users += [uid] if step == 0 else []
                        reg_ms.append((time.perf_counter() - t0) * 1000)
                        n_dbs += 1
                        if n_dbs not in checkpoints:
                            continue
                        # Creating databases leaves the server with WAL and dirty buffers to write back; a
                        # checkpoint first, so each point measures the API at that many databases, not the
                        # write-back of the burst that made them (the first point has none).
                        with psycopg.connect(rt.admin_dsn, autocommit=True) as admin:
                            admin.execute("CHECKPOINT")
                        os.sync()  # and the kernel's write-back of it (the server runs with fsync off)
                        slow_before = server_slow_counts(client)
                        spy = start_profile(server, n_dbs) if args.profile else None
                        measure_alternately([big, ref], args.requests, args.rounds)
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                            spy.wait(timeout=60)
                        server_slow = {k: v - slow_before.get(k, 0) for k, v in server_slow_counts(client).items()}
                        m, round_p99 = merge_rounds(big.runs)
                        rm, ref_round_p99 = merge_rounds(ref.runs)
                        rss = server.rss_mb()
                        for case in CASES:
                            results[f"{case} @ {n_dbs} DBs"] = m[case]
                            results[f"{case} @ reference (10 DBs), beside {n_dbs}"] = rm[case]
                        curve.append({
                            "dbs": n_dbs, "rss_mb": round(rss, 1), "server_side_over": server_slow,
                            "process_starts_per_s": {"big": big.starts_per_s, "reference": ref.starts_per_s},
                            **{f"{k} p99 per round": round_p99[k] for k in CASES},
                            **{f"{k} reference p99 per round": ref_round_p99[k] for k in CASES},
                            **{f"{k} p99": m[k]["p99"] for k in CASES},
                            **{f"{k} p50": m[k]["p50"] for k in CASES},
                            **{f"{k} reference p99": rm[k]["p99"] for k in CASES},
                            **{f"{k} reference p50": rm[k]["p50"] for k in CASES},
                            **{f"{k} p99 vs reference": round(m[k]["p99"] / rm[k]["p99"], 2) for k in CASES}})
                        print(f"[density] {n_dbs} DBs, {time.perf_counter() - start_all:.0f}s, "
                              f"rss {rss:.0f} MB, {json.dumps(curve[-1])}", file=sys.stderr, flush=True)
            rss_end = server.rss_mb()
        finally:
            server.stop()
            ref_server.stop()
        with psycopg.connect(rt.admin_dsn, autocommit=True) as conn:
            tenant_bytes = conn.execute("SELECT coalesce(sum(pg_database_size(datname)), 0), count(*) "
                                        "FROM pg_database WHERE datname LIKE 'apg\\_%'").fetchone()
        data_bytes = du_bytes(rt.settings.home)
    first, last = curve[0], curve[-1]
    extra = {
        "users": args.users, "databases": n_dbs, "rounds_per_checkpoint": args.rounds,
        "serve_rss_mb_end": round(rss_end, 1),
        "serve_rss_mb_at_10": first["rss_mb"],
        "tenant_db_count": int(tenant_bytes[1]) if tenant_bytes else 0,
        "disk_per_tenant_mb_du": round(data_bytes / args.users / 2**20, 2),
        "disk_per_tenant_mb_pg_database_size": round(
            int(tenant_bytes[0] if tenant_bytes else 0) / args.users / 2**20, 2),
        "home_du_mb": round(data_bytes / 2**20, 1),
        "registration_ms": percentiles(reg_ms),
        "p99_ratio_vs_reference": {k: last[f"{k} p99 vs reference"] for k in CASES},
        "p99_ratio_vs_itself_at_10": {k: round(last[f"{k} p99"] / first[f"{k} p99"], 2) for k in CASES},
        "curve": curve,
    }
    report("density", results, extra)
    (OUT / "density.json").write_text(json.dumps({"results": results, **extra}, indent=2))
    plot(curve)


def _auth(rt: Runtime) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token(rt.settings)}"}


def plot(curve: list[dict[str, Any]]) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [c["dbs"] for c in curve]
    for k, color in zip(CASES, ("tab:blue", "tab:orange"), strict=True):
        ax.plot(xs, [c[f"{k} p99"] for c in curve], marker="o", color=color, label=f"{k} p99")
        ax.plot(xs, [c[f"{k} reference p99"] for c in curve], marker="x", linestyle=":", color=color,
                label="  same minutes, 10-DB reference")
    ax.set_xscale("log")
    ax.set_xlabel("databases on the server")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    rss = [c["rss_mb"] for c in curve]
    ax2.plot(xs, rss, color="grey", linestyle="--", label="serve RSS (MB)")
    ax2.set_ylabel("serve RSS MB (grey, dashed)")
    ax2.set_ylim(0, max(rss) * 1.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("density: API p99 and RSS vs databases")
    fig.tight_layout()
    fig.savefig(OUT / "density.png", dpi=110)


if __name__ == "__main__":
    main()
