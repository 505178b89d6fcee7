"""Density: N users x (1 global + 2 agent databases) on one embedded server, with `agentpg serve` running.

    python bench/density.py [--users 1000] [--requests 300] [--rounds 3]

Registers users and workspaces one after another (warm pool off: every database is a real CREATE DATABASE)
and measures, once at 10 databases and again at the end, the API's latency on the same server:
``GET /api/users/{id}`` (a random existing user: catalog lookups) and ``POST …/global-database/query``
(10 rows of a small table in one user's global database: token auth, catalog, tenant pool, READ ONLY read).
Also reports ``agentpg serve``'s RSS at both points and the disk per tenant (du of the server's data
directory, and the sum of pg_database_size over tenant databases, divided by the number of users).
Each point measures ``--rounds`` times (a few seconds apart) and reports the median of each percentile over
the rounds, with every round's p99 alongside: one round's p99 on a shared 2-core machine moves with whatever
else ran in that second, and building 3,000 databases three times would take half an hour. Each point
starts with a ``CHECKPOINT`` of the server, so it measures the API at that many databases rather than the
write-back of the burst of CREATE DATABASE that made them; and this (client) process's garbage collector is
paused during each round, since its own heap grows with every database it made.
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
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, report, throwaway_runtime

from agentpg.runtime import admin_token

OUT = Path(__file__).parent / "results"


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out else 0


def measure_rounds(client: httpx.Client, user_ids: list[str], requests: int,
                   rounds: int) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Median over ``rounds`` of each percentile, and each round's p99 per case."""
    runs = []
    for _ in range(rounds):
        # This process also made every database through the service, so its heap grows with N and a full
        # collection during a round would be the client's pause, not the API's: collect first, then keep
        # the collector out of the measured requests.
        gc.collect()
        gc.disable()
        try:
            runs.append(measure(client, user_ids, requests))
        finally:
            gc.enable()
        time.sleep(2)
    merged = {case: {k: (round(statistics.median(r[case][k] for r in runs), 3) if k != "n" else
                         sum(r[case]["n"] for r in runs)) for k in runs[0][case]} for case in runs[0]}
    return merged, {case: [r[case]["p99"] for r in runs] for case in runs[0]}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds per checkpoint (medians)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy (must be installed) records `agentpg serve` during each checkpoint's rounds "
                             "into results/density-profile-<dbs>.txt (raw stacks)")
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    with throwaway_runtime(embedded_fsync=False) as rt:
        svc = rt.service
        server = ServeProcess(rt.settings.home)
        server.wait_ready()
        headers = {"Authorization": f"Bearer {admin_token(rt.settings)}"}
        results: dict[str, dict[str, float]] = {}
        curve: list[dict[str, float]] = []
        users: list[str] = []
        n_dbs = 0
        reg_ms: list[float] = []
        start_all = time.perf_counter()
        checkpoints = sorted({10, 300, 1000, 2000, 3 * args.users} | {3 * args.users})
        try:
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
                for i in range(args.users):
                    uid = f"d{i:05d}"
                    for step in range(3):
                        t0 = time.perf_counter()
                        if step == 0:
                            svc.register_user(uid)
                            users.append(uid)
                            if i == 0:
                                with psycopg.connect(svc.platform_uri(uid), autocommit=True) as conn:
                                    conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name "
                                                 "FROM generate_series(1, 100) g")
                                    conn.execute("ALTER TABLE items ADD PRIMARY KEY (id)")
                        else:
                            svc.create_workspace(uid, f"{uid}-w{step}")
                        reg_ms.append((time.perf_counter() - t0) * 1000)
                        n_dbs += 1
                        if n_dbs in checkpoints:
                            # Creating databases leaves the server with WAL and dirty buffers to write back;
                            # a checkpoint first, so each point measures the API at that many databases,
                            # not the write-back of the burst that made them (the first point has none).
                            with psycopg.connect(rt.admin_dsn, autocommit=True) as admin:
                                admin.execute("CHECKPOINT")
                            os.sync()  # and the kernel's write-back of it (the server runs with fsync off)
                            slow_before = server_slow_counts(client)
                            spy = start_profile(server, n_dbs) if args.profile else None
                            m, round_p99 = measure_rounds(client, users, args.requests, args.rounds)
                            if spy is not None:
                                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                                spy.wait(timeout=60)
                            server_slow = {k: v - slow_before.get(k, 0) for k, v in server_slow_counts(client).items()}
                            rss = server.rss_mb()
                            for case, row in m.items():
                                results[f"{case} @ {n_dbs} DBs"] = row
                            curve.append({"dbs": n_dbs, "rss_mb": round(rss, 1), "server_side_over": server_slow,
                                          **{f"{k} p99 per round": v for k, v in round_p99.items()},
                                          **{f"{k} p99": v["p99"] for k, v in m.items()},
                                          **{f"{k} p50": v["p50"] for k, v in m.items()}})
                            print(f"[density] {n_dbs} DBs, {time.perf_counter() - start_all:.0f}s, "
                                  f"rss {rss:.0f} MB, {json.dumps(curve[-1])}", file=sys.stderr, flush=True)
            rss_end = server.rss_mb()
        finally:
            server.stop()
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
        "p99_ratio_end_vs_10": {k: round(last[f"{k} p99"] / first[f"{k} p99"], 2)
                                for k in ("GET /api/users/{id}", "POST global-database/query (10 rows)")},
        "curve": curve,
    }
    report("density", results, extra)
    (OUT / "density.json").write_text(json.dumps({"results": results, **extra}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [c["dbs"] for c in curve]
        for k in ("GET /api/users/{id}", "POST global-database/query (10 rows)"):
            ax.plot(xs, [c[f"{k} p99"] for c in curve], marker="o", label=f"{k} p99")
        ax.set_xscale("log")
        ax.set_xlabel("databases on the server")
        ax.set_ylabel("ms")
        ax2 = ax.twinx()
        ax2.plot(xs, [c["rss_mb"] for c in curve], color="grey", linestyle="--", label="serve RSS (MB)")
        ax2.set_ylabel("RSS MB")
        ax.legend(loc="upper left")
        ax.set_title("density: API p99 and RSS vs databases")
        fig.tight_layout()
        fig.savefig(OUT / "density.png", dpi=110)
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
