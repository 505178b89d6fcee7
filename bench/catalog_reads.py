"""Catalog reads and the REST rows page (issue 22 item 2), on the default durable settings (fsync on).

    python bench/catalog_reads.py [--requests 2000] [--rows-requests 1000] [--concurrency 8] [--out NAME]

1. ``GET /api/users/{id}`` to ``agentpg serve`` over HTTP (a bare keep-alive ``http.client``, the admin
   token): the client's percentiles, and **the server's own time** for that route: the mean of its
   Prometheus histogram (``agentpg_http_request_duration_seconds``, read from ``/metrics`` before and after).
   Baseline in the same run: a raw psycopg loop of the one catalog statement such a read needs (autocommit).
2. In process, the same read two ways: ``Service.get_user`` as the service does it, and the one-statement
   read ``agentpg.lifecycle.users.find_user`` (when the tree has it), each shaped into a ``UserInfo``.
3. The REST rows page (100 rows of 10,000, primary-key order, with its count): sequential percentiles and
   the rate with ``--concurrency`` clients, against the raw psycopg loop's rate (the same SELECT on one
   connection, same database and role). Target: at least half the raw rate. The same rate again with
   ``"count": "none"`` (no count of the table; when the tree has that option), and **the floor**: the raw
   loop's SELECT served by a bare ASGI app on uvicorn and psycopg's async pool (``_bare_rows_app.py``: no
   framework, no auth, no transaction), with the same clients. What the floor leaves of the raw rate is what
   Python HTTP on this machine allows any implementation of the page.

Works on the tree before issue 22 too (``agentpg.runtime``), so one script gives "before" and "after".
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, report, throwaway_runtime, write_json

try:
    from agentpg.app.runtime import admin_token
except ImportError:  # the tree before the restructuring
    from agentpg.runtime import admin_token  # type: ignore[no-redef,import-not-found]

_ROUTE_USER = "/api/users/{user_id}"
_ROUTE_ROWS = "/api/users/{user_id}/global-database/query"
_HISTOGRAM = re.compile(r'^agentpg_http_request_duration_seconds_(sum|count)\{method="(\w+)",route="([^"]+)"\} (\S+)$',
                        re.MULTILINE)


def _server_totals(port: int) -> dict[tuple[str, str], list[float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    totals: dict[tuple[str, str], list[float]] = {}
    for kind, method, route, value in _HISTOGRAM.findall(text):
        totals.setdefault((method, route), [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return totals


def _server_mean_ms(before: dict[tuple[str, str], list[float]], after: dict[tuple[str, str], list[float]],
                    method: str, route: str) -> float:
    b, a = before.get((method, route), [0.0, 0.0]), after[(method, route)]
    return round((a[0] - b[0]) / (a[1] - b[1]) * 1000, 3)


def _timed(fn: Any, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _http(port: int, token: str, rows_path: str = "/api/users/bench/global-database/query",
          count: str | None = None) -> tuple[Any, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"table": "items", "limit": 100, "offset": 0, **({"count": count} if count else {})})

    def get_user() -> None:
        conn.request("GET", "/api/users/bench", headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    def rows() -> None:
        conn.request("POST", rows_path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200 and len(json.loads(data)["rows"]) == 100, response.status

    return get_user, rows


def _rate(make_rows: Any, concurrency: int, requests: int) -> float:
    """Requests per second of ``concurrency`` threads, each on its own keep-alive connection."""

    def burst(_: int) -> None:
        rows_here = make_rows()
        for _ in range(requests // concurrency):
            rows_here()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(burst, range(concurrency)))
    return round(requests // concurrency * concurrency / (time.perf_counter() - start), 1)


def _floor_rate(uri: str, concurrency: int, requests: int) -> float:
    """The bare app's rate (see the module docstring); its DSN goes through its environment only."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = {**os.environ, "BARE_ROWS_DSN": uri}
    app = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_bare_rows_app.py")), str(port)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or app.poll() is not None:
                    raise RuntimeError("the bare rows app did not start") from None
                time.sleep(0.1)
        _, warm = _http(port, "-", rows_path="/rows")
        for _ in range(200):
            warm()
        _rate(lambda: _http(port, "-", rows_path="/rows")[1], concurrency, concurrency * 25)  # as above
        return _rate(lambda: _http(port, "-", rows_path="/rows")[1], concurrency, requests)
    finally:
        app.terminate()
        app.wait(30)


def _in_process(rt: Any, n: int) -> dict[str, dict[str, float]]:
    svc = rt.service
    out = {"in process: Service.get_user (as served)": percentiles(_timed(lambda: svc.get_user("bench"), n))}
    from agentpg.lifecycle import users

    find_user = getattr(users, "find_user", None)
    if find_user is not None:
        from agentpg.schemas import DatabaseInfo, UserInfo

        def one_statement() -> UserInfo:
            found = find_user(svc.deps, "bench")
            assert found is not None
            user, rec = found
            db = None if rec is None else DatabaseInfo(
                name=rec.database_name, status=rec.status, ownership_type=rec.ownership_type, provider=rec.provider,
                created_at=rec.created_at, current_period_cost_cents=rec.current_period_cost_cents)
            return UserInfo(id=user.id, email=user.email, status=user.status, created_at=user.created_at,
                            global_database=db)

        assert one_statement() == svc.get_user("bench")
        out["in process: users.find_user (one statement)"] = percentiles(_timed(one_statement, n))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rows-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="catalog_reads")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    extra: dict[str, Any] = {"fsync": True, "concurrency": args.concurrency}
    with throwaway_runtime() as rt:  # default settings: fsync on
        svc = rt.service
        svc.register_user("bench")
        uri = svc.uris.platform("bench")
        catalog_engine = svc.deps.engine
        catalog_url = catalog_engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE items AS SELECT g AS id, 'item ' || g AS name, now() AS created_at, "
                         "(g * 1.5)::numeric AS price FROM generate_series(1, 10000) g")
            conn.execute("ALTER TABLE items ADD PRIMARY KEY (id)")
            conn.execute("ANALYZE items")
        results.update(_in_process(rt, args.requests))
        server = ServeProcess(rt.settings.home)
        server.wait_ready()
        try:
            get_user, rows = _http(server.port, admin_token(rt.settings))
            for _ in range(200):
                get_user()
                rows()
            before = _server_totals(server.port)
            results["HTTP GET /api/users/{id} (client)"] = percentiles(_timed(get_user, args.requests))
            after = _server_totals(server.port)
            extra["server_mean_ms_get_user"] = _server_mean_ms(before, after, "GET", _ROUTE_USER)
            before = after
            results["HTTP REST rows, 100 rows, sequential (client)"] = percentiles(_timed(rows, args.rows_requests))
            after = _server_totals(server.port)
            extra["server_mean_ms_rows"] = _server_mean_ms(before, after, "POST", _ROUTE_ROWS)

            token = admin_token(rt.settings)
            # Warm as many pooled connections as there are clients first: opening them is not the page's cost.
            _rate(lambda: _http(server.port, token)[1], args.concurrency, args.concurrency * 25)
            extra["rest_rows_per_s"] = _rate(lambda: _http(server.port, token)[1], args.concurrency,
                                             args.rows_requests)
            try:
                _http(server.port, token, count="none")[1]()
            except AssertionError:  # a tree without the option answers 422
                pass
            else:
                extra["rest_rows_nocount_per_s"] = _rate(lambda: _http(server.port, token, count="none")[1],
                                                         args.concurrency, args.rows_requests)
        finally:
            server.stop()
        extra["floor_rows_per_s"] = _floor_rate(uri, args.concurrency, args.rows_requests)
        with psycopg.connect(catalog_url, autocommit=True) as conn:
            query = ("SELECT u.id, u.email, u.status, u.created_at, d.database_name, d.status, d.ownership_type, "
                     "d.provider, d.created_at, d.current_period_cost_cents FROM users u "
                     "LEFT JOIN user_global_database d ON d.user_id = u.id WHERE u.id = %s")
            for _ in range(200):
                conn.execute(query, ("bench",)).fetchall()
            results["raw psycopg: the user read, one statement (baseline)"] = percentiles(
                _timed(lambda: conn.execute(query, ("bench",)).fetchall(), args.requests))
        with psycopg.connect(uri, autocommit=True) as conn:
            select = "SELECT * FROM items ORDER BY id LIMIT 100 OFFSET 0"
            for _ in range(200):
                conn.execute(select).fetchall()
            results["raw psycopg SELECT (100 rows) (baseline)"] = percentiles(
                _timed(lambda: conn.execute(select).fetchall(), args.rows_requests))
            start = time.perf_counter()
            for _ in range(args.rows_requests):
                conn.execute(select).fetchall()
            extra["raw_rows_per_s"] = round(args.rows_requests / (time.perf_counter() - start), 1)
    for key in ("rest_rows", "rest_rows_nocount", "floor_rows"):
        if f"{key}_per_s" in extra:
            extra[f"{key}_vs_raw"] = round(extra[f"{key}_per_s"] / extra["raw_rows_per_s"], 3)
    extra["targets"] = {"server_mean_ms_get_user <= 1.5": extra["server_mean_ms_get_user"] <= 1.5,
                        "rest_rows_vs_raw >= 0.5": extra["rest_rows_vs_raw"] >= 0.5}
    report(args.out, results, extra)
    write_json(args.out, {"results": results, **extra})


if __name__ == "__main__":
    main()
