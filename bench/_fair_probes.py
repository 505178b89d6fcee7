"""What fair_sharing.py watches besides its clients' latencies: serve's memory, the server's client backends and
refused connections, the governor's and the event loop's metrics, a direct probe of PostgreSQL (no serve), and
who used the CPU (with _proc_cpu.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
from _proc_cpu import descendants, postgres_database

REFUSED = ("too many clients", "remaining connection slots are reserved")


def proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def memory(pid: int, reset: bool = True) -> dict[str, Any]:
    """serve's VmRSS and VmHWM (MB); then the peak is reset to the current RSS for the next phase if allowed."""
    out: dict[str, Any] = {"rss_mb": round(proc_kib(pid, "VmRSS") / 1024, 1),
                           "peak_mb": round(proc_kib(pid, "VmHWM") / 1024, 1)}
    if reset:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            out["peak_reset_after"] = True
        except OSError:
            out["peak_reset_after"] = False
    return out


def serve_pids(pid: int) -> list[int]:
    """serve's process and any children it forked (uvicorn with one worker does not fork)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(p) for p in children.read_text().split())] if children.exists() else [pid]


class BackendSampler(threading.Thread):
    """Client backends on the server every 100 ms: the most of tenants' (non-superuser) and of superusers' at
    once, and by ``application_name`` when the total was highest (the admin connections of serve and of this
    benchmark use the same ``max_connections`` slots as the tenants: the superuser reserve only refuses
    non-superusers once that few slots are left)."""

    def __init__(self, admin_dsn: str) -> None:
        super().__init__(daemon=True)
        self.admin_dsn, self._stop_event = admin_dsn, threading.Event()
        self.max_tenant = self.max_superuser = self.max_total = 0
        self.at_max_total: dict[str, int] = {}

    def run(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True, application_name="bench sampler") as conn:
            while not self._stop_event.wait(0.1):
                rows = conn.execute("SELECT coalesce(r.rolsuper, false), a.application_name, count(*) "
                                    "FROM pg_stat_activity a LEFT JOIN pg_roles r ON r.rolname = a.usename "
                                    "WHERE a.backend_type = 'client backend' GROUP BY 1, 2").fetchall()
                tenant = sum(int(n) for sup, _, n in rows if not sup)
                superuser = sum(int(n) for sup, _, n in rows if sup)
                self.max_tenant, self.max_superuser = max(self.max_tenant, tenant), max(self.max_superuser, superuser)
                if tenant + superuser > self.max_total:
                    self.max_total = tenant + superuser
                    self.at_max_total = {f"{'superuser' if sup else 'tenant'}: {app or '-'}": int(n)
                                         for sup, app, n in rows}

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(10)
        return {"max_tenant_backends": self.max_tenant, "max_superuser_backends": self.max_superuser,
                "max_total_backends": self.max_total, "at_max_total": self.at_max_total}


class PgLog:
    """Counts the embedded server's refused connections written to its log since the last look."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, path.stat().st_size if path.exists() else 0

    def refused_since(self) -> int:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            text = handle.read().decode(errors="replace")
            self.offset = handle.tell()
        return sum(text.count(needle) for needle in REFUSED)


def running_backends(admin_dsn: str, databases: list[str]) -> dict[str, int]:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FILTER (WHERE state <> 'idle'), count(*) FROM pg_stat_activity "
                           "WHERE datname = ANY(%s) AND backend_type = 'client backend' "
                           "AND pid <> pg_backend_pid()", [databases]).fetchone()
    assert row is not None
    return {"running": int(row[0]), "all_incl_idle": int(row[1])}


async def governor_metrics(base_url: str, admin: str) -> dict[str, float]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {admin}"}, timeout=30) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("agentpg_governor") and "user_calls" not in line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = float(value)
    return out


def loop_lag_buckets(base_url: str, admin: str) -> dict[float, float]:
    """serve's ``agentpg_event_loop_lag_seconds`` histogram: cumulative count per bucket bound (s)."""
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {admin}"}, timeout=30).text
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("agentpg_event_loop_lag_seconds_bucket"):
            out[float(line.split('le="')[1].split('"')[0])] = float(line.rsplit(" ", 1)[1])
    return out


def lag_between(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """The loop-lag samples taken between two scrapes: how many, the bucket bounds their p50 and p99 fall
    under (ms), and the share that waited over 5 ms."""
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return {"samples": 0}

    def under(q: float) -> float:
        return next(le for le, n in delta.items() if n >= q * total) * 1000

    return {"samples": total, "p50_under_ms": under(0.5), "p99_under_ms": under(0.99),
            "over_5ms_share": round(1 - delta.get(0.005, 0.0) / total, 3)}


class DirectProbe(threading.Thread):
    """The victim's read straight to PostgreSQL (no serve) every 20 ms: tells the server's share of a slow call
    from serve's."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self._stop_event = dsn, threading.Event()
        self.latencies: list[float] = []

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="bench probe") as conn:
            while not self._stop_event.wait(0.02):
                began = time.perf_counter()
                conn.execute("SELECT v FROM t WHERE k = %s", ["probe"]).fetchall()
                self.latencies.append((time.perf_counter() - began) * 1000)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join(10)
        return self.latencies


def cpu_classifier(serve_pid: int, attacker_pid: int, attacker_dbs: list[str], victim_db: str
                   ) -> Callable[[int, list[str]], str | None]:
    serve = descendants(serve_pid)
    attacker = set(attacker_dbs)

    def classify(pid: int, argv: list[str]) -> str | None:
        if pid in serve:
            return "serve"
        if pid == os.getpid():
            return "this process: the victim's client, probes"
        if pid == attacker_pid:
            return "the attacker's client"
        if argv and argv[0].startswith("postgres"):
            db = postgres_database(argv)
            return ("postgres: the attacker's backends" if db in attacker else
                    "postgres: the victim's backends" if db == victim_db else "postgres: everything else")
        return "other processes"

    return classify

