"""CPU shares (issue 18): a victim's CPU-bound statement while another user keeps the cores busy, with
agentpg's per-user CPU priority (lifecycle/cpu_shares.py) off and on, against the victim alone.

    python bench/cpu_shares.py [--attackers 4 --rounds 2 --round-s 10 --victim-rows 300000]

One embedded server on the default durable settings (fsync on), two users registered through the service.
The attacker: ``--attackers`` connections to its global database, each running a CPU-bound ``sum`` over
``generate_series`` back to back (``work_mem`` large enough that nothing spills: CPU only), as an agent's
abandoned heavy calls do. The victim: one connection to its own global database, a smaller CPU-bound
``sum`` every 100 ms, timed at the client, and its backend's CPU time read from ``/proc`` (wall time over CPU
time is the wait for a core). Modes alternate per round (off, on, off, on ...) so drift in the machine's load
hits both; "on" runs the same pass ``serve`` runs, every 0.5 s. Directly on PostgreSQL (no serve, no MCP):
this measures the scheduler's part alone.
Writes ``bench/results/<--out>.json``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).parent))
from _common import percentiles, report, throwaway_runtime, write_json

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import UserGlobalDatabase
from agentpg.lifecycle.cpu_shares import CpuShares, CpuSharesJob, catalog_owners, process_cpu_s


def global_dsn(rt: Runtime, user: str) -> str:
    """The user's global database as the server's admin (a secret: never printed). The statements' rights do
    not matter here, only which database (which user) the backend belongs to."""
    with rt.service.deps.sessions() as s:
        name = s.scalars(select(UserGlobalDatabase.database_name).where(UserGlobalDatabase.user_id == user)).one()
    # work_mem large enough that generate_series's tuplestore never spills: the statements use CPU, not disk
    return psycopg.conninfo.make_conninfo(rt.admin_dsn, dbname=name, options="-c work_mem=1GB")


class Spinner(threading.Thread):
    def __init__(self, dsn: str, rows: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rows, self.stop, self.statements = dsn, rows, stop, 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                conn.execute("SELECT sum(g) FROM generate_series(1, %s) g", [self.rows])
                self.statements += 1


def victim(dsn: str, rows: int, seconds: float, cpu_ms: list[float]) -> list[float]:
    """The victim's statements' latencies; ``cpu_ms`` gets each one's CPU time in its backend (wall time over
    CPU time is the wait for a core; CPU time itself grows with contention for the core's caches)."""
    latencies: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = conn.info.backend_pid
        conn.execute("SELECT sum(g) FROM generate_series(1, %s) g", [rows])  # warm
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            started, cpu_before = time.perf_counter(), process_cpu_s(pid)
            conn.execute("SELECT sum(g) FROM generate_series(1, %s) g", [rows])
            latencies.append((time.perf_counter() - started) * 1000)
            cpu_after = process_cpu_s(pid)
            if cpu_before is not None and cpu_after is not None:
                cpu_ms.append((cpu_after[0] - cpu_before[0]) * 1000)
            time.sleep(0.1)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--attacker-rows", type=int, default=5_000_000)
    parser.add_argument("--victim-rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-s", type=float, default=10.0)
    parser.add_argument("--out", default="cpu_shares")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    samples: dict[str, list[float]] = {"victim alone": [], "under attack, CPU shares off": [],
                                       "under attack, CPU shares on": []}
    cpu: dict[str, list[float]] = {case: [] for case in samples}
    demoted_seen = 0
    with throwaway_runtime(usage_sync_interval_s=0) as rt:
        heavy, light = f"heavy-{secrets.token_hex(3)}", f"light-{secrets.token_hex(3)}"
        rt.service.register_user(heavy)
        rt.service.register_user(light)
        heavy_dsn, light_dsn = global_dsn(rt, heavy), global_dsn(rt, light)
        for _ in range(args.rounds):
            samples["victim alone"] += victim(light_dsn, args.victim_rows, args.round_s / 2, cpu["victim alone"])
            for mode in ("off", "on"):
                stop = threading.Event()
                spinners = [Spinner(heavy_dsn, args.attacker_rows, stop) for _ in range(args.attackers)]
                for spinner in spinners:
                    spinner.start()
                job = None
                if mode == "on":
                    job = CpuSharesJob(CpuShares(rt.admin_dsn, catalog_owners(rt.service.deps)), 0.5)
                    job.start()
                time.sleep(2)  # the attack is under way (and, when on, measured: ~2 s half-life)
                case = f"under attack, CPU shares {mode}"
                samples[case] += victim(light_dsn, args.victim_rows, args.round_s, cpu[case])
                if job is not None:
                    demoted_seen += len(job.shares.demoted)
                    job.stop()
                stop.set()
                for spinner in spinners:
                    spinner.join(60)
                with psycopg.connect(rt.admin_dsn, autocommit=True) as conn:  # nothing of the attack left
                    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                                 [psycopg.conninfo.conninfo_to_dict(heavy_dsn)["dbname"]])
                    # a demoted backend (if one survived) would otherwise keep its nice into the next round
                time.sleep(1)
    results = {case: percentiles(ms) for case, ms in samples.items()}
    results.update({f"{case}: the backend's CPU time": percentiles(ms) for case, ms in cpu.items()})
    alone = results["victim alone"]
    extra: dict[str, Any] = {
        "args": vars(args), "loadavg_at_start": load_before, "attacker_demoted_at_end_of_on_rounds": demoted_seen,
        "ratios_to_alone": {case: {"p50": round(r["p50"] / alone["p50"], 2), "p99": round(r["p99"] / alone["p99"], 2)}
                            for case, r in results.items() if case.startswith("under attack")}}
    report("cpu_shares", results, extra)
    for case, ratio in extra["ratios_to_alone"].items():
        print(f"{case}: p50 x{ratio['p50']}, p99 x{ratio['p99']} of the victim alone")
    write_json(args.out, {"benchmark": "cpu_shares", "results": results, **extra})


if __name__ == "__main__":
    main()
