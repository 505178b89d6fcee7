"""Registration in bursts, on the default durable settings (fsync on): agentpg's REST route against a plain
``CREATE ROLE`` + ``CREATE DATABASE`` on the same server, in the same run (issue 22).

    python bench/registration_bursts.py [--bursts 6 --burst-size 20 --pause 2 --base 8 --max 64 --out NAME]

A fresh ``agentpg serve`` (embedded PostgreSQL 18, fsync on) registers ``--bursts`` bursts of
``--burst-size`` users, back to back (``--concurrency`` at a time; 1 = one after another, as the issue's
measurement), ``--pause`` seconds apart: the pattern of a platform's sign-up spike. The warm pool starts
at ``--base`` (``AGENTPG_WARM_POOL_SIZE``) and may grow to ``--max`` (``AGENTPG_WARM_POOL_MAX``) from the
bursts it sees. The baseline sends the same
bursts of ``CREATE ROLE … LOGIN PASSWORD`` + ``CREATE DATABASE … OWNER`` to the same server, once with the
default strategy (``WAL_LOG``) and once with ``STRATEGY = FILE_COPY``. Latency is per registration, from
the request to its answer (the wait a sign-up page sees).
"""

from __future__ import annotations

import argparse
import calendar
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))
from _common import ServeProcess, percentiles, report, write_json

from agentpg.app.runtime import open_runtime
from agentpg.settings import Settings


def bursts(n: int, size: int, pause_s: float, one: Callable[[str], None], prefix: str,
           concurrency: int = 1, calls: list[tuple[float, float]] | None = None) -> list[float]:
    """Run ``n`` bursts of ``size`` calls of ``one(name)``, ``concurrency`` at a time; each call's latency in ms
    (and, into ``calls``, each call's wall-clock start with its latency)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def timed(name: str) -> None:
        began, start = time.time(), time.perf_counter()
        one(name)
        with lock:
            latencies.append((time.perf_counter() - start) * 1000)
            if calls is not None:
                calls.append((began, latencies[-1]))

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for b in range(n):
            list(pool.map(timed, [f"{prefix}-{b}-{i}" for i in range(size)]))
            if b < n - 1:
                time.sleep(pause_s)
    return latencies


class DirtyPages(threading.Thread):
    """Samples the kernel's dirty and under-writeback page cache (``/proc/meminfo``) every 50 ms: a commit's
    WAL fsync queues behind the disk's writeback of what other writers left dirty."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            self.samples.append((time.time(), int(fields["Dirty"].split()[0]) // 1024,
                                 int(fields["Writeback"].split()[0]) // 1024))

    def around(self, began: float, ms: float) -> dict[str, int]:
        """The most dirty / under-writeback MB sampled while a call that began at ``began`` ran."""
        inside = [(d, w) for t, d, w in self.samples if began - 0.05 <= t <= began + ms / 1000 + 0.05]
        return {"dirty_mb": max((d for d, _ in inside), default=-1),
                "writeback_mb": max((w for _, w in inside), default=-1)}


def checkpoints_during(log: Path, windows: list[tuple[float, float]]) -> list[str]:
    """The server's checkpoints (``log_checkpoints`` is on by default) that overlap the windows, as
    "starting" / "complete" log line pairs: a checkpoint's writes and fsyncs are what a commit's own WAL fsync
    may wait behind."""
    spans: list[tuple[float, float, str]] = []
    started: tuple[float, str] | None = None
    for line in log.read_text(errors="replace").splitlines():
        if "checkpoint starting" not in line and "checkpoint complete" not in line:
            continue
        try:
            stamp = calendar.timegm(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
        except ValueError:
            continue
        if "checkpoint starting" in line:
            started = (stamp, line)
        elif started is not None:
            spans.append((started[0], stamp, started[1][:90] + " / " + line[:24] + line[line.find("write="):][:60]))
            started = None
    if started is not None:
        spans.append((started[0], float("inf"), started[1][:90] + " / not complete"))
    return [text for begin, end, text in spans if any(begin <= w_end + 1 and end >= w_start - 1
                                                       for w_start, w_end in windows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=6)
    parser.add_argument("--burst-size", type=int, default=20)
    parser.add_argument("--pause", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=1, help="registrations in flight at once in a burst")
    parser.add_argument("--base", type=int, default=8)
    parser.add_argument("--max", type=int, default=64)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds for the pool to fill before a case")
    parser.add_argument("--max-wal-size", default=None, help="ALTER SYSTEM SET max_wal_size (e.g. 4GB) at start")
    parser.add_argument("--server-set", action="append", default=[], metavar="NAME=VALUE",
                        help="an experiment: ALTER SYSTEM SET NAME = VALUE on the server at start (repeatable)")
    parser.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for serve (repeatable), e.g. AGENTPG_BACKUP_WAL_TRIGGER_MB=0")
    parser.add_argument("--out", default=None, help="also write bench/results/<out>.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="agentpg-bench-", dir="/tmp"))
    home.chmod(0o711)
    serve_env = dict(item.split("=", 1) for item in args.serve_env)
    serve = ServeProcess(home, {"AGENTPG_WARM_POOL_SIZE": str(args.base), "AGENTPG_WARM_POOL_MAX": str(args.max),
                                **serve_env})
    results: dict[str, dict[str, float]] = {}
    try:
        serve.wait_ready(timeout=120)
        server_set = dict(item.split("=", 1) for item in args.server_set)
        if args.max_wal_size:  # an experiment: fewer WAL-triggered checkpoints on the server (not a setting)
            server_set["max_wal_size"] = args.max_wal_size
        if server_set:
            with open_runtime(Settings(home=home), attach_only=True, migrate_catalog=False) as rt, \
                    psycopg.connect(rt.admin_dsn, autocommit=True) as conn:
                for name, value in server_set.items():
                    conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
                conn.execute("SELECT pg_reload_conf()")
        dirty = DirtyPages()
        dirty.start()
        calls: list[tuple[float, float]] = []
        admin = {"Authorization": f"Bearer {(home / 'admin-token').read_text().strip()}"}
        time.sleep(args.settle)  # the pool fills to its base first, as on a server that has been up a while
        with httpx.Client(base_url=serve.base_url, headers=admin, timeout=120) as api:
            def register(name: str) -> None:
                response = api.post("/api/users", json={"id": name})
                assert response.status_code == 201, response.text

            windows = [time.time()]
            first = bursts(1, args.burst_size, 0, register, "first", args.concurrency, calls)
            windows.append(time.time())
            time.sleep(args.settle)  # the refiller has seen the burst: the pool grows to 1.5 x burst
            windows.append(time.time())
            rest = bursts(args.bursts - 1, args.burst_size, args.pause, register, "user", args.concurrency, calls)
            windows.append(time.time())
        dirty.done.set()
        slowest = [{"at": time.strftime("%H:%M:%S", time.gmtime(began)) + f".{int(began % 1 * 1000):03d}",
                    "ms": round(ms, 1), **dirty.around(began, ms)}
                   for began, ms in sorted(calls, key=lambda c: -c[1])[:5]]
        typical = [d for t, d, _ in dirty.samples
                   if windows[0] <= t <= windows[1] or windows[2] <= t <= windows[3]]
        checkpoints = checkpoints_during(home / "postgres" / "postgres.log", [(windows[0], windows[1]),
                                                                             (windows[2], windows[3])])
        results["agentpg POST /api/users, first burst (pool at its base)"] = percentiles(first)
        results["agentpg POST /api/users, later bursts (pool sized from the first)"] = percentiles(rest)
        results["agentpg POST /api/users, every burst"] = percentiles(first + rest)

        settings = Settings(home=home)
        with open_runtime(settings, attach_only=True, migrate_catalog=False) as rt:
            admin_dsn = rt.admin_dsn
        for strategy in ("WAL_LOG", "FILE_COPY"):
            def plain(name: str, strategy: str = strategy) -> None:
                role = name.replace("-", "_")
                with psycopg.connect(admin_dsn, autocommit=True) as conn:
                    conn.execute("SET backend_flush_after = 0")  # the stock default: a plain server's baseline
                    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(secrets.token_urlsafe(24))))
                    conn.execute(sql.SQL("CREATE DATABASE {} OWNER {} STRATEGY = {}").format(
                        sql.Identifier(role), sql.Identifier(role), sql.SQL(strategy)))

            samples = bursts(args.bursts, args.burst_size, args.pause, plain, f"plain_{strategy.lower()}",
                             args.concurrency)
            results[f"plain CREATE ROLE + CREATE DATABASE ({strategy})"] = percentiles(samples)
    finally:
        serve.stop()
        try:  # the embedded server outlives serve: stop it before removing its home
            from agentpg.embedded import EmbeddedPostgres

            EmbeddedPostgres(home, os_user=Settings(home=home).postgres_os_user).stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)

    every = results["agentpg POST /api/users, every burst"]
    base = results["plain CREATE ROLE + CREATE DATABASE (WAL_LOG)"]
    extra: dict[str, Any] = {
        "fsync": "on (default)", "bursts": args.bursts, "burst_size": args.burst_size, "pause_s": args.pause,
        "warm_pool_base": args.base, "warm_pool_max": args.max, "concurrency": args.concurrency,
        "serve_env": serve_env, "max_wal_size": args.max_wal_size, "server_set": server_set,
        "checkpoint_log_lines_during_bursts": checkpoints, "slowest_registrations": slowest,
        "dirty_mb_during_bursts": {"median": sorted(typical)[len(typical) // 2] if typical else -1,
                                   "max": max(typical, default=-1)},
        "cpus": os.cpu_count(),
        "speedup_p50_vs_wal_log": round(base["p50"] / every["p50"], 2),
        "speedup_p99_vs_wal_log": round(base["p99"] / every["p99"], 2),
        "goals": {"p50_ms": 10, "p99_ms": 40, "speedup": 10},
    }
    report("registration_bursts", results, extra)
    print("checkpoint lines during the bursts:", *checkpoints, sep="\n  ")
    print("slowest registrations (with the most dirty / writeback page cache while each ran):", *slowest, sep="\n  ")
    if args.out:
        write_json(args.out, {"benchmark": "registration_bursts", "results": results, **extra})


if __name__ == "__main__":
    main()
