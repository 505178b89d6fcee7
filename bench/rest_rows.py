"""REST rows endpoint (100 rows per page) vs a raw psycopg loop on the same database and role.

    python bench/rest_rows.py [--requests 500] [--concurrency 8]

Both sides read the same 100 rows of a 10,000-row table. agentpg's side goes through real HTTP (uvicorn),
token auth, table/column validation against the catalog, a READ ONLY transaction and JSON encoding; the
baseline is the same SELECT over one persistent psycopg connection.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, report, throwaway_runtime, write_json

from agentpg.app.runtime import admin_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    with throwaway_runtime(embedded_fsync=False) as rt:
        svc = rt.service
        svc.register_user("bench")
        uri = svc.uris.platform("bench")
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name, now() AS created_at, "
                         "(g * 1.5)::numeric AS price FROM generate_series(1, 10000) g")
            conn.execute("ALTER TABLE items ADD PRIMARY KEY (id)")
            conn.execute("ANALYZE items")
        server = ServeProcess(rt.settings.home)
        server.wait_ready()
        headers = {"Authorization": f"Bearer {admin_token(rt.settings)}"}
        body = {"table": "items", "limit": 100, "offset": 0}  # primary-key order by default
        results: dict[str, dict[str, float]] = {}
        throughput: dict[str, float] = {}
        try:
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as client:
                for _ in range(20):
                    assert client.post("/api/users/bench/global-database/query", json=body).status_code == 200
                samples = []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    client.post("/api/users/bench/global-database/query", json=body)
                    samples.append((time.perf_counter() - start) * 1000)
                results["agentpg REST query (100 rows), sequential"] = percentiles(samples)

            def burst(_: int) -> None:
                with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as c:
                    for _ in range(args.requests // args.concurrency):
                        c.post("/api/users/bench/global-database/query", json=body)

            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(burst, range(args.concurrency)))
            throughput["agentpg REST req/s"] = round(args.requests / (time.perf_counter() - start), 1)
            rss = server.rss_mb()
        finally:
            server.stop()
        with psycopg.connect(uri, autocommit=True) as conn:
            samples = []
            for _ in range(args.requests):
                start = time.perf_counter()
                conn.execute("SELECT * FROM items ORDER BY id LIMIT 100 OFFSET 0").fetchall()
                samples.append((time.perf_counter() - start) * 1000)
            results["raw psycopg SELECT (100 rows) (baseline)"] = percentiles(samples)
            start = time.perf_counter()
            for _ in range(args.requests):
                conn.execute("SELECT * FROM items ORDER BY id LIMIT 100 OFFSET 0").fetchall()
            throughput["raw psycopg req/s (one connection)"] = round(args.requests / (time.perf_counter() - start), 1)
    extra = {"throughput": throughput, "serve_rss_mb": round(rss, 1), "concurrency": args.concurrency}
    report("rest_rows", results, extra)
    write_json("rest_rows", {"results": results, **extra})


if __name__ == "__main__":
    main()
