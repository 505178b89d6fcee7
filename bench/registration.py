"""Registration latency: agentpg (warm pool / cold) vs a plain CREATE DATABASE + role on the same server.

    python bench/registration.py [--users 200] [--fsync]

Each case registers --users users one after another (the latency a sign-up page waits for). The baseline is
what a hand-rolled platform does at minimum: CREATE ROLE with a password, CREATE DATABASE owned by it.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from _common import percentiles, report, throwaway_runtime, write_json

from agentpg.lifecycle.warm import fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--fsync", action="store_true", help="run the server with fsync on (slower, real)")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with throwaway_runtime(embedded_fsync=args.fsync) as rt:
        svc = rt.service
        baseline: list[float] = []
        with psycopg.connect(rt.admin_dsn, autocommit=True) as conn:
            for i in range(args.users):
                name = f"baseline_{i}"
                start = time.perf_counter()
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(secrets.token_urlsafe(24))))
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
                baseline.append((time.perf_counter() - start) * 1000)
        results["plain CREATE DATABASE + role (baseline)"] = percentiles(baseline)

        cold: list[float] = []
        for i in range(args.users):
            start = time.perf_counter()
            svc.register_user(f"cold-{i}")
            cold.append((time.perf_counter() - start) * 1000)
        results["agentpg register, warm pool empty"] = percentiles(cold)

        fill_start = time.perf_counter()
        fill(svc.deps, args.users)
        fill_s = time.perf_counter() - fill_start
        warm: list[float] = []
        for i in range(args.users):
            start = time.perf_counter()
            svc.register_user(f"warm-{i}")
            warm.append((time.perf_counter() - start) * 1000)
        results["agentpg register, warm pool"] = percentiles(warm)
    speedup = results["plain CREATE DATABASE + role (baseline)"]["p50"] / results["agentpg register, warm pool"]["p50"]
    extra = {"fsync": args.fsync, "warm_pool_refill_per_s": round(args.users / fill_s, 1),
             "speedup_p50_warm_vs_baseline": round(speedup, 1)}
    report("registration", results, extra)
    write_json("registration", {"results": results, **extra})


if __name__ == "__main__":
    main()
