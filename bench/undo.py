"""Undo (issue 19): checkpoint creation, one-database restore, the archiving's cost on writes, the recovery point.

    python bench/undo.py [--tenants 300] [--big-mb 1024] [--small-mb 10] [--checkpoints 200]
                         [--rounds 3] [--round-s 10] [--clients 1,8] [--rpo-s 20] [--big-in-place]
                         [--other-wal-mb 300 [--round-pause-s 60]]

One throwaway embedded server on the default durable settings (fsync on), with agentpg's archiver attached as
``serve`` attaches it (``attach_archivers``; the backup directory under the temporary home, files fsynced).
It holds ``--tenants`` small tenant databases (``LocalProvider.create_database``, one 1,000-row table each)
and two users whose global databases are filled with generated rows to ``--small-mb`` and ``--big-mb``
(heap + primary key, ``pg_database_size``). Then archiving starts (slot, ``pg_receivewal``, a full base
backup that holds everything), and:

- **checkpoints**: ``service.undo.create_checkpoint`` on the small and on the big database, interleaved with
  the baseline, a bare ``pg_create_restore_point`` on one open admin connection (what a checkpoint is at
  bottom; agentpg adds a connection, the catalog lookups and the catalog row).
- **restore**: a checkpoint, then a mistake (rows updated, a table created), then ``service.undo.restore``
  to the checkpoint, timed end to end with its phases (the side instance's build, recovery, dump; the load
  into the running server; the swap for in place): ``mode="new"`` for both sizes, in place for the small one
  (``--big-in-place`` for the big one too). Each result is checked (row count and checksum as at the
  checkpoint). With ``--other-wal-mb N``, before each restore another tenant writes N MB of WAL and the
  archiver does one round (``Archiver.tick``, as ``serve`` does every 30 s): with the default
  ``AGENTPG_BACKUP_WAL_TRIGGER_MB`` that round takes an incremental base backup (its time, bytes, files and
  the machine's disk I/O are recorded), with ``AGENTPG_BACKUP_WAL_TRIGGER_MB=0`` (the old behaviour) it does
  not, and the restore replays all of it.
- **archiving's cost**: pgbench (TPC-B-like, scale 10, its own database on the same server) with archiving
  off (receiver stopped), asynchronous (the default) and synchronous (``AGENTPG_BACKUP_SYNCHRONOUS``: the
  receiver a synchronous standby), ``--rounds`` rounds of ``--round-s`` seconds per mode and client count,
  the modes' order rotated every round. Between modes the receiver catches up before anything is measured.
- **recovery point**: pgbench writing steadily (4 clients) for ``--rpo-s`` seconds in each archiving mode
  while a sampler (20 Hz) compares the server's flushed WAL with (a) what the receiver wrote into the backup
  directory (read from its ``.partial`` segment: the last non-zero WAL page, 8 KB resolution), (b) the
  write and flush positions it reported (``pg_stat_replication``), and the server's own ``write_lag`` and
  ``flush_lag``; plus a probe that commits a row every 20 ms and checks, right after the commit returns,
  whether the backup's reported flush position has passed the WAL position read before the commit.

Prints the JSON and a table; writes ``bench/results/undo.json`` (``--out NAME`` for another name).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).parent))
from _common import percentiles, report, throwaway_runtime, write_json

from agentpg.embedded import client_bin
from agentpg.lifecycle import undo
from agentpg.lifecycle.users import plan_of
from agentpg.providers import pitr
from agentpg.providers.archive import APPLICATION_NAME, Archiver
from agentpg.providers.base import DatabasePlan
from agentpg.providers.side import SideInstance
from agentpg.providers.walfiles import parse_lsn, tree_bytes

PAGE = 8192


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- setup ---------------------------------------------------------------------------------------------------


def make_tenants(provider: Any, admin_dsn: str, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        plan = DatabasePlan.fresh(provider.server_name)
        provider.create_database(plan, f"pw-{i}-{plan.database}")
        with psycopg.connect(make_conninfo(admin_dsn, dbname=plan.database), autocommit=True) as conn:
            conn.execute(f'SET ROLE "{plan.owner_role}"')
            conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
            conn.execute("INSERT INTO notes SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
        if (i + 1) % 50 == 0:
            log(f"  {i + 1} tenants")
    return time.perf_counter() - started


def fill(admin_dsn: str, plan: DatabasePlan, mb: int) -> dict[str, Any]:
    """``data(id bigint PK, a text, b text, n float8)``, ~150 bytes a row with its index, to ``mb`` MB."""
    started = time.perf_counter()
    with psycopg.connect(make_conninfo(admin_dsn, dbname=plan.database), autocommit=True) as conn, \
            psycopg.connect(admin_dsn, autocommit=True) as admin:
        conn.execute(f'SET ROLE "{plan.owner_role}"')
        conn.execute("CREATE TABLE data (id bigint PRIMARY KEY, a text, b text, n float8)")
        base = int(admin.execute("SELECT pg_database_size(%s)", (plan.database,)).fetchone()[0])  # type: ignore[index]
        want = mb * 1024 * 1024
        done = 0
        while True:
            size = int(admin.execute("SELECT pg_database_size(%s)", (plan.database,)).fetchone()[0])  # type: ignore[index]
            if size >= want:
                break
            rows = max(2000, min(500_000, (want - size) // 150))
            conn.execute("INSERT INTO data SELECT g, md5(g::text), md5((g * 7)::text), g * 0.5 "
                         "FROM generate_series(%s::bigint, %s::bigint) g", (done + 1, done + rows))
            done += rows
        conn.execute("ANALYZE data")
        size = int(admin.execute("SELECT pg_database_size(%s)", (plan.database,)).fetchone()[0])  # type: ignore[index]
    return {"rows": done, "bytes": size, "empty_db_bytes": base, "load_s": round(time.perf_counter() - started, 1)}


def disk_io() -> tuple[int, int]:
    """Bytes read and written by the machine's disks so far (/proc/diskstats: whole devices, 512-byte sectors;
    the machine is shared, so a delta includes whatever else ran meanwhile)."""
    read = written = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if re.fullmatch(r"(vd|sd|xvd)[a-z]+|nvme\d+n\d+", parts[2]):
                read, written = read + int(parts[5]) * 512, written + int(parts[9]) * 512
    return read, written


def other_wal(admin_dsn: str, database: str, mb: int) -> float:
    """Write about ``mb`` MB of WAL in ``database`` (another tenant's work): rows inserted and deleted."""
    started = time.perf_counter()
    with psycopg.connect(make_conninfo(admin_dsn, dbname=database), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS churn (id bigint, v text)")
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]  # type: ignore[index]
        while True:
            row = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", (lsn,)).fetchone()
            if row is None or int(row[0]) >= mb * 2**20:
                break
            conn.execute("INSERT INTO churn SELECT g, md5(g::text) || md5((g + 1)::text) "
                         "FROM generate_series(1, 200000) g")
            conn.execute("DELETE FROM churn")
            conn.execute("VACUUM churn")
    return time.perf_counter() - started


def archiving_round(archiver: Archiver) -> dict[str, Any] | None:
    """One ``serve`` round; the base backup it took, if any (time, bytes, files, the disks' I/O meanwhile)."""
    before = {b.label for b in archiver.backups()}
    io0, t0 = disk_io(), time.perf_counter()
    assert archiver.tick()
    took, io1 = time.perf_counter() - t0, disk_io()
    new = [b for b in archiver.backups() if b.label not in before]
    if not new:
        return None
    files = sum(len(names) for _, _, names in os.walk(new[-1].path))
    return {"s": round(took, 1), "bytes": tree_bytes(new[-1].path), "files": files,
            "incremental": new[-1].incremental_of is not None,
            "disk_read_mb": round((io1[0] - io0[0]) / 2**20, 1), "disk_written_mb": round((io1[1] - io0[1]) / 2**20, 1),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def fingerprint(admin_dsn: str, database: str) -> tuple[int, str]:
    with psycopg.connect(make_conninfo(admin_dsn, dbname=database), autocommit=True) as conn:
        row = conn.execute("SELECT count(*), md5(string_agg(md5(a || b), '' ORDER BY id)) FROM data "
                           "WHERE id % 97 = 0").fetchone()
        total = conn.execute("SELECT count(*) FROM data").fetchone()
    assert row is not None and total is not None
    return int(total[0]), str(row[1])


_MISTAKES = iter(range(1_000_000))


def mistake(admin_dsn: str, database: str) -> None:
    """A different one each time: 1,000 rows changed, 1,000 deleted (2,000 ids further on), a table made."""
    k = next(_MISTAKES)
    lo = k * 2000
    with psycopg.connect(make_conninfo(admin_dsn, dbname=database), autocommit=True) as conn:
        conn.execute("UPDATE data SET a = 'oops' WHERE id BETWEEN %s AND %s", (lo + 1, lo + 1000))
        conn.execute("DELETE FROM data WHERE id BETWEEN %s AND %s", (lo + 1001, lo + 2000))
        conn.execute(f"CREATE TABLE wrong_{k} (x int)")


# -- checkpoints -----------------------------------------------------------------------------------------------


def checkpoints(svc: Any, admin_dsn: str, n: int, users: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"raw": [], **{user: [] for user in users}}
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for i in range(n + 10):
            warm = i < 10
            started = time.perf_counter()
            conn.execute("SELECT pg_create_restore_point(%s)", (f"bench raw {i}",)).fetchone()
            took = (time.perf_counter() - started) * 1000
            if not warm:
                out["raw"].append(took)
            for user in users:
                started = time.perf_counter()
                svc.undo.create_checkpoint(user, None, f"bench {i}", "bench")
                took = (time.perf_counter() - started) * 1000
                if not warm:
                    out[user].append(took)
    return out


# -- restore ---------------------------------------------------------------------------------------------------


class Phases:
    """Time spent in each step of a restore: wrappers around the steps, summed per name."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        had_own = attr in vars(owner) if not isinstance(owner, type) else True
        times = self.times

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times[name] = round(times.get(name, 0.0) + time.perf_counter() - started, 2)

        setattr(owner, attr, timed)
        if had_own:
            self._undo.append(lambda: setattr(owner, attr, original))
        else:
            self._undo.append(lambda: delattr(owner, attr))

    def restore(self) -> None:
        for fn in reversed(self._undo):
            fn()


@contextmanager
def phases(provider: Any, archiver: Archiver) -> Iterator[dict[str, float]]:
    p = Phases()
    p.wrap(archiver, "wait_archived", "wait_archived")
    p.wrap(SideInstance, "build", "side_build (base backup minus other DBs, WAL)")
    p.wrap(SideInstance, "recover", "side_recover (start, replay, promote)")
    p.wrap(SideInstance, "dump", "side_dump (pg_dump -Fc)")
    p.wrap(SideInstance, "__exit__", "side_stop_remove")
    p.wrap(pitr, "_load", "load (pg_restore into the server, hand to owner)")
    p.wrap(provider, "replace_database", "swap (in place)")
    p.wrap(undo, "apply_current_access", "apply_current_access")
    try:
        yield p.times
    finally:
        p.restore()


def restore_case(rt: Any, archiver: Archiver, user: str, mode: str) -> dict[str, Any]:
    svc, deps = rt.service, rt.service.deps
    with deps.sessions() as s:
        plan = plan_of(undo._record(s, undo.Where(user, None)))
    before = fingerprint(rt.admin_dsn, plan.database)
    cp = svc.undo.create_checkpoint(user, None, f"before the mistake ({mode})", "bench")
    mistake(rt.admin_dsn, plan.database)
    copies_before = {c.id for c in undo.list_copies(deps, user)}
    with archiver.connect() as conn:
        now = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]))  # type: ignore[index]
    wal_mb = round((now - archiver.backups()[-1].start_lsn) / 2**20, 1)
    with phases(deps.provider, archiver) as times:
        started = time.perf_counter()
        try:
            result = svc.undo.restore(user, None, undo.TargetSpec(checkpoint_id=cp.id), mode)
        except Exception as exc:  # reported, not hidden: a failed restore is a figure too
            return {"failed": f"{type(exc).__name__}: {getattr(exc, 'message', exc)}",
                    "after_s": round(time.perf_counter() - started, 2), "phases_s": dict(times),
                    "server_wal_since_base_backup_mb": wal_mb}
        total = time.perf_counter() - started
    if mode == "new":
        copy = next(c for c in undo.list_copies(deps, user) if c.id not in copies_before)
        after = fingerprint(rt.admin_dsn, copy.database_name)
        svc.undo.drop_copy(user, copy.id)
    else:
        after = fingerprint(rt.admin_dsn, plan.database)
    assert after == before, (user, mode, before, after)
    assert result.status == "restored"
    return {"total_s": round(total, 2), "phases_s": dict(times), "server_wal_since_base_backup_mb": wal_mb,
            "checked": "rows and checksum as at the checkpoint"}


# -- archiving modes, pgbench ------------------------------------------------------------------------------------


def set_mode(archiver: Archiver, mode: str) -> None:
    """off: receiver stopped (the slot stays); async / sync: the receiver (re)started in that mode, caught up."""
    if mode == "off":
        archiver.stop_receiver()
        return
    want_sync = mode == "sync"
    if archiver.synchronous != want_sync or archiver._receiver is None:
        archiver.stop_receiver()
        archiver.synchronous = want_sync
    archiver.tick()  # the receiver (and, for sync, synchronous_standby_names); no base backup is due
    with archiver.connect() as conn:
        flush = parse_lsn(str(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]))  # type: ignore[index]
    deadline = time.monotonic() + 120
    with archiver.connect() as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT (CASE WHEN %s THEN flush_lsn ELSE write_lsn END)::text, sync_state "
                               "FROM pg_stat_replication "
                               "WHERE application_name = %s", (want_sync, APPLICATION_NAME)).fetchone()
            if row and row[0] and parse_lsn(str(row[0])) >= flush and (row[1] == "sync") == want_sync:
                return
            time.sleep(0.1)
    raise RuntimeError(f"the receiver did not catch up in mode {mode}")


class PgBench:
    def __init__(self, admin_dsn: str, database: str) -> None:
        params = conninfo_to_dict(admin_dsn)
        self.exe = str(client_bin() / "pgbench")
        self.args = ["-h", str(params.get("host") or "127.0.0.1"), "-p", str(params.get("port") or 5432),
                     "-U", str(params.get("user") or "postgres")]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env["PGPASSWORD"] = str(params.get("password") or "")
        self.database = database

    def init(self, scale: int) -> None:
        subprocess.run([self.exe, *self.args, "-i", "-q", "-s", str(scale), self.database], env=self.env,
                       check=True, capture_output=True)

    def start(self, clients: int, seconds: int) -> subprocess.Popen[str]:
        return subprocess.Popen([self.exe, *self.args, "-c", str(clients), "-j", str(min(clients, 2)), "-T",
                                 str(seconds), "-n", self.database], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def parse(proc: subprocess.Popen[str]) -> dict[str, float]:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(out[-2000:])
        tps = re.search(r"tps = ([\d.]+)", out)
        lat = re.search(r"latency average = ([\d.]+) ms", out)
        assert tps is not None and lat is not None, out
        return {"tps": float(tps.group(1)), "latency_ms": float(lat.group(1))}


class Rounds(threading.Thread):
    """The archiver's rounds every ``every_s`` while pgbench writes, as ``serve`` runs them (every 30 s there):
    each may take an incremental base backup when the WAL since the last one passes the trigger."""

    def __init__(self, archiver: Archiver, every_s: float) -> None:
        super().__init__(daemon=True)
        self.archiver, self.every_s, self.stopping = archiver, every_s, threading.Event()
        self.backups_before = len(archiver.backups())

    def run(self) -> None:
        while not self.stopping.wait(self.every_s):
            held = self.archiver.tick(stopping=self.stopping)
            if not held or self.archiver.last_error:
                log(f"    archiver round: {'held' if held else 'not held'}; {self.archiver.last_error or ''}")

    def stop(self) -> int:
        """Stop; the base backups taken meanwhile."""
        self.stopping.set()
        self.join(600)
        return len(self.archiver.backups()) - self.backups_before


def archiving_cost(archiver: Archiver, bench: PgBench, clients: list[int], rounds: int,
                   seconds: int, modes: list[str] | None = None) -> dict[str, Any]:
    """pgbench's tps with the archive's receiver off, asynchronous, synchronous, and ``async_backups``
    (asynchronous, with the archiver's rounds running: its incremental base backups included)."""
    modes = modes or ["off", "async", "sync"]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {str(c): {m: [] for m in modes} for c in clients}
    backups_taken: list[int] = []
    trigger, archiver.wal_trigger = archiver.wal_trigger, 0  # set_mode's own round takes no backup: only
    for r in range(rounds):                                   # async_backups' rounds, while pgbench writes
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for mode in order:
            set_mode(archiver, "async" if mode == "async_backups" else mode)
            ticking = Rounds(archiver, 5.0) if mode == "async_backups" else None
            if ticking is not None:
                archiver.wal_trigger = trigger
                ticking.start()
            for c in clients:
                runs[str(c)][mode].append(PgBench.parse(bench.start(c, seconds)))
            if ticking is not None:
                backups_taken.append(ticking.stop())
                archiver.wal_trigger = 0
            log(f"  round {r + 1} {mode}: " + ", ".join(f"{c} clients {runs[str(c)][mode][-1]['tps']:.0f} tps"
                                                       for c in clients))
    archiver.wal_trigger = trigger
    summary: dict[str, Any] = {"base_backups_per_async_backups_round": backups_taken}
    measured = [m for m in modes if m != "off"]
    for c in clients:
        med = {m: statistics.median(x["tps"] for x in runs[str(c)][m]) for m in modes}
        lat = {m: statistics.median(x["latency_ms"] for x in runs[str(c)][m]) for m in modes}
        summary[str(c)] = {
            "tps_median": {m: round(v, 1) for m, v in med.items()},
            "latency_ms_median": {m: round(v, 3) for m, v in lat.items()},
            "tps_per_round": {m: [round(x["tps"], 1) for x in runs[str(c)][m]] for m in modes},
            **{f"cost_{m}_pct": round((1 - med[m] / med["off"]) * 100, 1) for m in measured},
        }
        # per round (the modes back to back, seconds apart): robust to the machine's load drifting
        for m in measured:
            ratios = [x["tps"] / o["tps"] for x, o in zip(runs[str(c)][m], runs[str(c)]["off"], strict=True)]
            summary[str(c)][f"cost_{m}_pct_per_round"] = [round((1 - r) * 100, 1) for r in ratios]
            summary[str(c)][f"cost_{m}_pct_paired_median"] = round((1 - statistics.median(ratios)) * 100, 1)
    return summary


# -- recovery point ----------------------------------------------------------------------------------------------


def written_position(archiver: Archiver, seg_size: int) -> int | None:
    """How far the receiver wrote WAL into the backup directory (into the OS, not necessarily fsynced): the
    ``.partial`` segment is pre-filled with zeros and written pages start with a non-zero page header, so the
    last such page, up to its last non-zero byte (records are 8-byte aligned: a few bytes' resolution)."""
    partial = sorted(archiver.wal_dir.glob("*.partial"))
    if not partial:
        return None
    path = partial[-1]
    name = path.name[:24]
    segno = int(name[8:16], 16) * (0x100000000 // seg_size) + int(name[16:24], 16)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pages = size // PAGE

        def written(page: int) -> bool:
            f.seek(page * PAGE)
            return f.read(2) not in (b"\0\0", b"")

        lo, hi = 0, pages  # invariant: pages < lo written, pages >= hi not
        while lo < hi:
            mid = (lo + hi) // 2
            if written(mid):
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return segno * seg_size
        f.seek((lo - 1) * PAGE)
        last = f.read(PAGE).rstrip(b"\0")  # the rest of a page not yet received is still zeros
    return segno * seg_size + (lo - 1) * PAGE + len(last)


def recovery_point(archiver: Archiver, bench: PgBench, admin_dsn: str, mode: str, seconds: int) -> dict[str, Any]:
    set_mode(archiver, mode)
    seg_size = archiver.seg_size()
    samples: list[dict[str, float]] = []
    probes = {"n": 0, "behind": 0, "max_behind_bytes": 0, "file_behind": 0, "file_max_behind_bytes": 0}
    stop = threading.Event()

    def sampler() -> None:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT pg_current_wal_flush_lsn()::text, write_lsn::text, flush_lsn::text, "
                    "extract(epoch FROM write_lag), extract(epoch FROM flush_lag) FROM pg_stat_replication "
                    "WHERE application_name = %s", (APPLICATION_NAME,)).fetchone()
                disk = written_position(archiver, seg_size)
                if row is not None:
                    server = parse_lsn(str(row[0]))
                    samples.append({
                        "t": time.monotonic(), "server": server,
                        "file_bytes": max(0, server - disk) if disk is not None else float("nan"),
                        "write_bytes": max(0, server - parse_lsn(str(row[1]))),
                        "flush_bytes": max(0, server - parse_lsn(str(row[2]))),
                        "write_lag_s": float(row[3]) if row[3] is not None else float("nan"),
                        "flush_lag_s": float(row[4]) if row[4] is not None else float("nan"),
                    })
                stop.wait(0.05)

    def prober() -> None:
        with psycopg.connect(admin_dsn, autocommit=True) as conn, \
                psycopg.connect(admin_dsn, autocommit=True) as look:
            conn.execute("CREATE TABLE IF NOT EXISTS rpo_probe (id bigserial PRIMARY KEY, at timestamptz)")
            while not stop.is_set():
                with conn.transaction():
                    before = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]))  # type: ignore[index]
                    conn.execute("INSERT INTO rpo_probe (at) VALUES (clock_timestamp())")
                row = look.execute("SELECT flush_lsn::text FROM pg_stat_replication WHERE application_name = %s",
                                   (APPLICATION_NAME,)).fetchone()
                disk = written_position(archiver, seg_size)  # None: between segments, not known
                probes["n"] += 1
                if disk is not None and disk <= before:
                    probes["file_behind"] += 1
                    probes["file_max_behind_bytes"] = max(probes["file_max_behind_bytes"], before - disk)
                flushed = parse_lsn(str(row[0])) if row and row[0] else 0
                if flushed <= before:
                    probes["behind"] += 1
                    probes["max_behind_bytes"] = max(probes["max_behind_bytes"], before - flushed)
                stop.wait(0.02)

    with archiver.connect() as conn:
        start_lsn = parse_lsn(str(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]))  # type: ignore[index]
    started = time.monotonic()
    proc = bench.start(4, seconds)
    threads = [threading.Thread(target=sampler), threading.Thread(target=prober)]
    for t in threads:
        t.start()
    load = PgBench.parse(proc)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    with archiver.connect() as conn:
        end_lsn = parse_lsn(str(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]))  # type: ignore[index]
    wal_rate = (end_lsn - start_lsn) / elapsed

    def dist(key: str) -> dict[str, float]:
        values = sorted(s[key] for s in samples if s[key] == s[key])  # drop NaN
        if len(values) < 2:
            return {"n": len(values)}
        q = statistics.quantiles(values, n=100, method="inclusive")
        return {"n": len(values), "p50": round(q[49], 4), "p99": round(q[98], 4), "max": round(values[-1], 4)}

    out: dict[str, Any] = {"load_tps": load["tps"], "wal_bytes_per_s": round(wal_rate),
                           "samples": len(samples), "probe_commits": probes["n"],
                           "probe_commits_not_yet_flushed_in_backup": probes["behind"],
                           "probe_max_behind_bytes": probes["max_behind_bytes"],
                           "probe_commits_not_yet_written_in_backup_file": probes["file_behind"],
                           "probe_file_max_behind_bytes": probes["file_max_behind_bytes"]}
    for key in ("file_bytes", "write_bytes", "flush_bytes", "write_lag_s", "flush_lag_s"):
        out[key] = dist(key)
    for key in ("file_bytes", "flush_bytes"):
        if "p50" in out[key]:
            out[key.replace("bytes", "seconds_at_wal_rate")] = {
                k: round(v / wal_rate, 4) for k, v in out[key].items() if k != "n"}
    return out


# -- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=300)
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-s", type=int, default=10)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--rpo-s", type=int, default=20)
    parser.add_argument("--big-in-place", action="store_true")
    parser.add_argument("--small-repeats", type=int, default=3, help="restores of the small database, per mode")
    parser.add_argument("--big-repeats", type=int, default=1)
    parser.add_argument("--skip", default="", help="comma-separated: checkpoints,restore,cost,rpo")
    parser.add_argument("--other-wal-mb", type=int, default=0,
                        help="before each restore, another tenant writes this much WAL, then one archiving round")
    parser.add_argument("--round-pause-s", type=float, default=0.0,
                        help="with --other-wal-mb: wait this long after the writes, before the archiving round")
    parser.add_argument("--cost-modes", default="off,async,sync",
                        help="archiving cost modes: off, async, sync, async_backups (async with the archiver's "
                             "rounds, so its incremental base backups, running)")
    parser.add_argument("--wal-trigger-mb", type=int, default=None,
                        help="AGENTPG_BACKUP_WAL_TRIGGER_MB for this run (default: the setting's default)")
    parser.add_argument("--out", default="undo")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    clients = [int(c) for c in args.clients.split(",")]
    t0 = time.perf_counter()
    extra: dict[str, Any] = {"fsync": "on", "tenants": args.tenants, "loadavg_at_start": list(os.getloadavg())}
    results: dict[str, dict[str, float]] = {}

    overrides: dict[str, Any] = {"usage_sync_interval_s": 0}
    if args.wal_trigger_mb is not None:
        overrides["backup_wal_trigger_mb"] = args.wal_trigger_mb
    with throwaway_runtime(**overrides) as rt:  # the default, durable settings (fsync on)
        assert rt.settings.embedded_fsync
        svc = rt.service
        provider: Any = rt.service.deps.provider
        assert rt.archive_job is not None and rt.archive_job.archivers, "no archiver attached"
        archiver = rt.archive_job.archivers[0]
        log(f"server up; {args.tenants} other tenants")
        extra["tenants_create_s"] = round(make_tenants(provider, rt.admin_dsn, args.tenants), 1)
        noise_plan = DatabasePlan.fresh(provider.server_name)
        provider.create_database(noise_plan, "pw-noise")
        noise_db = noise_plan.database
        extra["wal_trigger_mb"] = rt.settings.backup_wal_trigger_mb
        sizes: dict[str, Any] = {}
        users = [u for u, mb in (("small", args.small_mb), ("big", args.big_mb)) if mb > 0]
        for user, mb in (("small", args.small_mb), ("big", args.big_mb)):
            if mb <= 0:
                continue
            svc.register_user(user)
            with svc.deps.sessions() as s:
                plan = plan_of(undo._record(s, undo.Where(user, None)))
            log(f"filling {user} to {mb} MB")
            sizes[user] = {"target_mb": mb, **fill(rt.admin_dsn, plan, mb)}
        extra["databases"] = sizes
        with psycopg.connect(rt.admin_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*), sum(pg_database_size(oid)) FROM pg_database").fetchone()
        assert row is not None
        extra["server"] = {"databases": int(row[0]), "bytes": int(row[1])}
        log("archiving: slot, receiver, full base backup")
        started = time.perf_counter()
        assert archiver.tick()
        extra["first_base_backup"] = {"s": round(time.perf_counter() - started, 1),
                                      "bytes": tree_bytes(archiver.backups()[-1].path)}
        assert archiver.backups(), archiver.last_error

        if "checkpoints" not in skip:
            log("checkpoints")
            cps = checkpoints(svc, rt.admin_dsn, args.checkpoints, users)
            results["checkpoint: raw pg_create_restore_point (baseline)"] = percentiles(cps["raw"])
            for user in users:
                results[f"checkpoint: service, {sizes[user]['bytes'] >> 20} MB database"] = percentiles(cps[user])

        if "restore" not in skip:
            restores: dict[str, Any] = {}
            cases = [("small", "new"), ("small", "in_place")] * args.small_repeats
            if "big" in users:
                cases += [("big", "new")] * args.big_repeats
            if args.big_in_place and "big" in users:
                cases += [("big", "in_place")] * args.big_repeats
            # then the same after a fresh (incremental) base backup: a restore replays the whole server's WAL
            # since the base backup it starts from, so its time depends on where the server is in that cycle
            fresh = [c for c in cases if c[1] == "new"]
            for n, (user, mode) in enumerate([*cases, ("backup", ""), *fresh]):
                if user == "backup":
                    log("incremental base backup")
                    started = time.perf_counter()
                    inc = archiver.backup_now()
                    extra["incremental_base_backup"] = {"s": round(time.perf_counter() - started, 1),
                                                        "bytes": tree_bytes(inc.path),
                                                        "incremental": inc.incremental_of is not None}
                    continue
                after = " after a fresh base backup" if n > len(cases) else ""
                if args.other_wal_mb and not after:
                    log(f"another tenant writes {args.other_wal_mb} MB of WAL; one archiving round")
                    churn_s = other_wal(rt.admin_dsn, noise_db, args.other_wal_mb)
                    time.sleep(args.round_pause_s)  # a steadier writer: that WAL over a longer time
                    taken = archiving_round(archiver)
                    log(f"  {churn_s:.0f} s; base backup taken: {taken}")
                    extra.setdefault("archiving_rounds", []).append(taken)
                log(f"restore {user} {mode}{after}")
                label = f"{user} ({sizes[user]['bytes'] >> 20} MB) {mode}{after}"
                one = restore_case(rt, archiver, user, mode)
                log(f"  {one}")
                restores.setdefault(label, {"runs": []})["runs"].append(one)
            for res in restores.values():
                res["total_s"] = [r.get("total_s") for r in res["runs"]]
                ok = [t for t in res["total_s"] if t is not None]
                res["median_s"] = statistics.median(ok) if ok else None
                res["failures"] = sum(1 for r in res["runs"] if "failed" in r)
            extra["restore"] = restores

        if "cost" not in skip or "rpo" not in skip:
            with psycopg.connect(rt.admin_dsn, autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench_pgbench")
            bench = PgBench(rt.admin_dsn, "bench_pgbench")
            log("pgbench -i -s 10")
            bench.init(10)
        if "cost" not in skip:
            log(f"archiving cost: clients {clients}, {args.rounds} rounds of {args.round_s} s per mode")
            extra["archiving_cost"] = archiving_cost(archiver, bench, clients, args.rounds, args.round_s,
                                                     args.cost_modes.split(","))
        if "rpo" not in skip:
            rpo: dict[str, Any] = {}
            for mode in ("async", "sync"):
                log(f"recovery point, {mode}")
                rpo[mode] = recovery_point(archiver, bench, rt.admin_dsn, mode, args.rpo_s)
            extra["recovery_point"] = rpo
        set_mode(archiver, "off")

    extra["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    extra["wall_s"] = round(time.perf_counter() - t0, 1)
    extra["args"] = vars(args)
    report("undo", results, extra)
    table = summary_rows(extra, results)
    print("\n" + "\n".join(table))
    write_json(args.out, {"benchmark": "undo", "results": results, **extra})


def summary_rows(extra: dict[str, Any], results: dict[str, dict[str, float]]) -> list[str]:
    rows = [f"{'figure':<60}{'value':>30}"]
    for key, res in extra.get("restore", {}).items():
        rows.append(f"{'restore ' + key + ' (median; runs)':<60}{res['median_s']!s:>10} s  {res['total_s']}")
    for c, res in extra.get("archiving_cost", {}).items():
        if not isinstance(res, dict):
            continue  # base_backups_per_async_backups_round
        tps = res["tps_median"]
        modes = list(tps)
        rows.append(f"{f'pgbench {c} clients tps ' + '/'.join(modes):<60}" + "".join(f"{tps[m]:>10.0f}" for m in modes))
        for m in modes[1:]:
            rows.append(f"{f'  cost {m} (%): of the medians / median of per-round ratios':<60}"
                        f"{res[f'cost_{m}_pct']:>20}{res[f'cost_{m}_pct_paired_median']:>10}")
    for mode, res in extra.get("recovery_point", {}).items():
        fb, wl = res["file_bytes"], res["write_lag_s"]
        rows.append(f"{f'recovery point {mode}: bytes behind (file) p50/p99/max':<60}"
                    f"{fb.get('p50', '-'):>10}{fb.get('p99', '-'):>10}{fb.get('max', '-'):>10}")
        rows.append(f"{'  write_lag s p50/p99/max':<60}"
                    f"{wl.get('p50', '-'):>10}{wl.get('p99', '-'):>10}{wl.get('max', '-'):>10}")
        rows.append(f"{'  probe commits not yet flushed in the backup (reported)':<60}"
                    f"{res['probe_commits_not_yet_flushed_in_backup']:>20}/{res['probe_commits']}")
        rows.append(f"{'  probe commits not yet written in the backup file':<60}"
                    f"{res['probe_commits_not_yet_written_in_backup_file']:>20}/{res['probe_commits']}")
        fl = res["flush_lag_s"]
        rows.append(f"{'  flush_lag s p50/p99/max':<60}"
                    f"{fl.get('p50', '-'):>10}{fl.get('p99', '-'):>10}{fl.get('max', '-'):>10}")
    return rows


if __name__ == "__main__":
    main()
