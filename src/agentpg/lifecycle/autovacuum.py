"""Pacing PostgreSQL's autovacuum launcher on the embedded server, which holds a database per tenant.

The launcher visits every database once per ``autovacuum_naptime`` (60 s by default), starting a worker
process for each: a fork, a connection and a look at the database's tables, every ``naptime / databases``
seconds (at least 100 ms apart). Measured on the 2-vCPU bench VM with the default: 5.7 worker starts per
second at 500 databases, 9.1 per second from 1,000 on, about 4 % of the machine in bursts of a few ms of CPU
each; the API's p99 rose with them while its p50 stayed flat. One database per tenant is what agentpg is
for, so on the server it runs itself it keeps the launch rate bounded instead:

    autovacuum_naptime = clamp(databases x pace, 60 s, 2 h)

Each start costs ~8 ms of CPU at 3,000 databases (some 40 % of it the launcher's own pass over its database
list, which grows with the square of the count), and the API's p99 tracks the start rate: alternating
rounds on one 3,000-database server measured p99 +14-19 % over autovacuum off at one start per second and
+3-10 % at one per two seconds. Hence the default pace of 2 s: each database is still looked at every
``naptime`` (100 min at 3,000 databases, at most 2 h), so a busy table's dead rows and a new table's planner
statistics wait that long at worst; anti-wraparound vacuums are started by their own thresholds whatever
the naptime. An operator with write-heavy tenants trades the other way with a smaller pace.

A server agentpg did not start (``AGENTPG_POSTGRES_URL``, the fleet, Neon)
is its operator's to tune: nothing here touches it.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from agentpg.periodic import PeriodicJob

log = logging.getLogger(__name__)

MIN_NAPTIME_S = 60
"""PostgreSQL's default: a server with few databases keeps it."""
MAX_NAPTIME_S = 7200
"""At most this long between two visits of one database: past 3,600 databases the start rate rises again."""


def naptime_for(databases: int, pace_s: float) -> int:
    """The ``autovacuum_naptime`` (seconds) that starts at most one worker per ``pace_s`` on ``databases``."""
    return round(min(MAX_NAPTIME_S, max(MIN_NAPTIME_S, databases * pace_s)))


def pace_autovacuum(admin_dsn: str, pace_s: float) -> int:
    """Set the server's ``autovacuum_naptime`` for its current number of databases (``ALTER SYSTEM`` and a
    reload, only when it changes); ``pace_s`` 0 takes back what an earlier pacing set (PostgreSQL's own
    configuration applies again). Returns the naptime in force, in seconds."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM pg_database), setting::int, "
                           "coalesce(sourcefile LIKE '%postgresql.auto.conf', false) FROM pg_settings "
                           "WHERE name = 'autovacuum_naptime'").fetchone()
        assert row is not None  # the setting always exists
        databases, current, paced = int(row[0]), int(row[1]), bool(row[2])
        if pace_s <= 0:
            if paced:
                conn.execute("ALTER SYSTEM RESET autovacuum_naptime")
                conn.execute("SELECT pg_reload_conf()")
                log.info("autovacuum_naptime: pacing off, back to the server's configuration")
            return current
        wanted = naptime_for(databases, pace_s)
        if wanted != current:
            # ALTER SYSTEM takes no bound parameters: the value goes in as a quoted literal.
            conn.execute(sql.SQL("ALTER SYSTEM SET autovacuum_naptime = {}").format(sql.Literal(f"{wanted}s")))
            conn.execute("SELECT pg_reload_conf()")
            log.info("autovacuum_naptime %d s -> %d s for %d databases", current, wanted, databases)
        return wanted


class AutovacuumPacer(PeriodicJob):
    """Re-paces the embedded server's autovacuum every ``interval_s`` in the background (``serve`` starts it;
    databases come and go while it runs)."""

    def __init__(self, admin_dsn: str, pace_s: float, interval_s: float = 60.0) -> None:
        self._admin_dsn = admin_dsn
        self._pace_s = pace_s
        # The server may be restarting: a failure is one line, and the next minute tries again.
        super().__init__("autovacuum-pacer", lambda: pace_autovacuum(admin_dsn, pace_s),
                         interval_s if pace_s > 0 else 0, first_run_now=True, log_traceback=False)

    def start(self) -> None:
        if self._pace_s > 0:
            super().start()
            return
        try:  # pacing switched off: undo what an earlier run set
            pace_autovacuum(self._admin_dsn, 0)
        except Exception as exc:
            log.warning("could not reset autovacuum_naptime: %s", type(exc).__name__)
