"""Control for density.py: the same API measurement repeated over time on a server whose database count
does NOT change.

    python bench/density_drift.py [--points 6] [--pause 40] [--requests 1000] [--rounds 3]

density.py measures at 10 databases about 30 s after `agentpg serve` starts and at 3,000 some minutes later,
so a p99 that drifts with time or traffic alone would look like a cost of density. This script registers
4 users (the same table as density.py's first user), then measures exactly as density.py does (GET a
random user, POST a 10-row REST query; --rounds rounds of --requests each, medians) at --points moments
--pause seconds apart, creating nothing in between. Writes bench/results/density_drift.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, report, throwaway_runtime, write_json
from density import measure_rounds

from agentpg.app.runtime import admin_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--pause", type=float, default=40.0)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    curve: list[dict[str, float]] = []
    with throwaway_runtime(embedded_fsync=False) as rt:
        svc = rt.service
        users = [f"d{i:05d}" for i in range(4)]
        for uid in users:
            svc.register_user(uid)
        with psycopg.connect(svc.uris.platform(users[0]), autocommit=True) as conn:
            conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name FROM generate_series(1, 100) g")
            conn.execute("ALTER TABLE items ADD PRIMARY KEY (id)")
        server = ServeProcess(rt.settings.home)
        server.wait_ready()
        started = time.monotonic()
        try:
            headers = {"Authorization": f"Bearer {admin_token(rt.settings)}"}
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
                for point in range(args.points):
                    if point:
                        time.sleep(args.pause)
                    merged, _ = measure_rounds(client, users, args.requests, args.rounds)
                    at = round(time.monotonic() - started)
                    for case, row in merged.items():
                        results[f"{case} @ t={at}s"] = row
                    curve.append({"t_s": at, **{f"{k} p99": v["p99"] for k, v in merged.items()},
                                  **{f"{k} p50": v["p50"] for k, v in merged.items()}})
                    print(f"[drift] {curve[-1]}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    first = curve[0]
    extra = {"databases": 4, "curve": curve,
             "max_p99_ratio_vs_first": {k: round(max(c[f"{k} p99"] for c in curve) / first[f"{k} p99"], 2)
                                        for k in ("GET /api/users/{id}", "POST global-database/query (10 rows)")}}
    report("density_drift", results, extra)
    write_json("density_drift", {"results": results, **extra})


if __name__ == "__main__":
    main()
