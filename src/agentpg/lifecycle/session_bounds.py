"""Bounds on tenant sessions agentpg did not open itself (issue 18): what a tenant's own connection may hold.

A gateway child gets its agent's connection string, so a tenant can connect directly as its own role. There
it can ``SET statement_timeout = 0`` (and every other timeout: they are all settable by any user), keep a
transaction open for ever, which holds back VACUUM of the shared catalogs and the server's freezing horizon
for every tenant, and open as many connections as its roles' ``CONNECTION LIMIT`` allows, across as many
roles as it has workspaces. PostgreSQL offers no per-role limit a role cannot lift for itself, so the bound
is kept from outside: every ``interval_s`` this job reads ``pg_stat_activity`` on each server agentpg
administers (as its admin) and terminates, among the tenant databases' client backends that this process's
pools did not open (``own_pids``: agentpg's own statements have their own timeouts and its pools close idle
connections within a minute):

- a statement running longer than ``max_statement_s``; a transaction open longer than ``max_transaction_s``;
- a session idle longer than ``max_idle_s``;
- a user's backends beyond ``user_max_connections`` (all its databases together, its newest first; 0: an
  eighth of the server's ordinary connection slots, at least 4), so one user cannot take the server's
  connection slots from the others (each role's ``CONNECTION LIMIT`` bounds one role, and a user has one
  role per workspace);
- any backend of a user whose writes are blocked (storage limit or budget: ``blocked_users``) that holds a
  transaction id, i.e. is writing: revoking a grant stops the next statement, not one running, and a direct
  statement could otherwise write on past the limit for as long as it likes. :meth:`SessionBounds.end_writes`
  does the same at once when the storage check blocks a user.

A limit of 0 turns that rule off. Termination is ``pg_terminate_backend`` on the exact backend seen (pid and
start time), never a pid alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

from agentpg.periodic import PeriodicJob
from agentpg.providers.base import NAME_PREFIX

log = logging.getLogger(__name__)

Owners = Callable[[list[str]], dict[str, str]]
"""Database names to the user owning each (the catalog's answer); agentpg's own databases are nobody's."""

# Tenant roles' client backends in tenant databases (agentpg's admin and other superusers are never touched).
_ACTIVITY = """
SELECT a.pid, a.backend_start, a.datname, a.state, now() - a.query_start, now() - a.xact_start,
       now() - a.state_change, a.backend_xid IS NOT NULL, now() - a.backend_start, a.application_name
FROM pg_catalog.pg_stat_activity a JOIN pg_catalog.pg_roles r ON r.oid = a.usesysid
WHERE a.backend_type = 'client backend' AND a.pid <> pg_catalog.pg_backend_pid() AND a.datname LIKE %s
  AND a.usename LIKE %s AND NOT r.rolsuper
"""
#: A backend younger than this is not counted against its user's connections yet: one of agentpg's own pools
#: has just opened it and not yet said so (it appears in pg_stat_activity before the pool's configure runs).
NEW_BACKEND_GRACE_S = 15.0
#: The application name agentpg's own tenant connections carry (access/pools.py).
_OURS = "agentpg"
_SLOTS = """
SELECT pg_catalog.current_setting('max_connections')::int
       - pg_catalog.current_setting('superuser_reserved_connections')::int
       - coalesce(pg_catalog.current_setting('reserved_connections', true)::int, 0)
"""
_TERMINATE = """
SELECT pg_catalog.count(*) FILTER (WHERE pg_catalog.pg_terminate_backend(a.pid))
FROM pg_catalog.pg_stat_activity a
JOIN ROWS FROM (pg_catalog.unnest(%s::int[]), pg_catalog.unnest(%s::timestamptz[])) AS t(pid, started)
  ON t.pid = a.pid AND t.started = a.backend_start
"""


@dataclass(frozen=True)
class SessionLimits:
    """The bounds in seconds (and connections per user); 0 turns one off."""

    max_statement_s: float = 900.0
    max_transaction_s: float = 900.0
    max_idle_s: float = 3600.0
    user_max_connections: int = 0
    """0: an eighth of the server's ordinary slots (``max_connections`` less the reserved ones), at least 4;
    -1: no bound."""


@dataclass(frozen=True)
class _Backend:
    pid: int
    started: datetime
    database: str
    state: str | None
    running_s: float | None
    in_transaction_s: float | None
    idle_s: float | None
    writing: bool
    age_s: float | None
    another_instances: bool
    """Named as agentpg's own while other instances run: not counted against its user's connections."""


class SessionBounds:
    """One sweep per call of :meth:`tick`, over every server in ``admin_dsns`` (secrets: never logged)."""

    def __init__(self, admin_dsns: Sequence[str], owners: Owners, limits: SessionLimits, *,
                 own_pids: Callable[[], set[int]] = set, blocked_users: Callable[[], set[str]] = set,
                 other_instances: bool = False) -> None:
        """``other_instances``: other agentpg processes (``serve_instances`` > 1) hold pools on these servers,
        whose pids this one cannot know: their connections (named ``agentpg``) are then left out of the
        per-user count, which a tenant naming its own connections so could exploit (documented)."""
        self._other_instances = other_instances
        self.new_backend_grace_s = NEW_BACKEND_GRACE_S
        self._admin_dsns = list(admin_dsns)
        self._owners = owners
        self.limits = limits
        self._own_pids = own_pids
        self._blocked_users = blocked_users
        self.terminated = 0
        """Backends ended by a bound (for /metrics and tests)."""

    def tick(self) -> None:
        """One sweep of every server; a server that cannot be reached is skipped (logged), never raised."""
        blocked = self._blocked_users()
        for dsn in self._admin_dsns:
            self._sweep(dsn, blocked, writes_only=False)

    def end_writes(self, users: Iterable[str]) -> None:
        """Terminate at once the writing backends of ``users`` (just blocked), on every server."""
        blocked = set(users)
        if blocked:
            for dsn in self._admin_dsns:
                self._sweep(dsn, blocked, writes_only=True)

    def _sweep(self, dsn: str, blocked: set[str], *, writes_only: bool) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                                 application_name="agentpg session bounds") as conn:
                like = NAME_PREFIX.replace("_", "\\_") + "%"
                backends = [_Backend(int(r[0]), r[1], str(r[2]), r[3], _seconds(r[4]), _seconds(r[5]),
                                     _seconds(r[6]), bool(r[7]), _seconds(r[8]),
                                     self._other_instances and r[9] == _OURS)
                            for r in conn.execute(_ACTIVITY, (like, like))]
                own = self._own_pids()
                backends = [b for b in backends if b.pid not in own]
                owners = self._owners(sorted({b.database for b in backends})) if backends else {}
                cap = self.limits.user_max_connections
                if cap == 0:
                    slots = conn.execute(_SLOTS).fetchone()
                    cap = max(4, int(slots[0]) // 8) if slots else 4
                ending = self._to_end(backends, owners, blocked, cap, writes_only=writes_only)
                if ending:
                    row = conn.execute(_TERMINATE, ([b.pid for b in ending], [b.started for b in ending])).fetchone()
                    self.terminated += int(row[0]) if row else 0
        except Exception as exc:  # a background job: the server or the catalog away is logged, and tried again
            log.warning("session bounds: a server could not be swept (%s)", type(exc).__name__)

    def _to_end(self, backends: list[_Backend], owners: dict[str, str], blocked: set[str], cap: int, *,
                writes_only: bool) -> list[_Backend]:
        lim = self.limits
        ending: dict[int, _Backend] = {}
        per_user: dict[str, list[_Backend]] = {}
        for b in backends:
            user = owners.get(b.database)
            if user is None:
                continue  # not a tenant's database (a half-made one, agentpg's own)
            per_user.setdefault(user, []).append(b)
            if user in blocked and b.writing:
                ending[b.pid] = b
            if writes_only:
                continue
            if _over(b.running_s, lim.max_statement_s) and b.state == "active":
                ending[b.pid] = b
            if _over(b.in_transaction_s, lim.max_transaction_s):
                ending[b.pid] = b
            if _over(b.idle_s, lim.max_idle_s) and b.state == "idle":
                ending[b.pid] = b
        if cap > 0 and not writes_only:
            for mine in per_user.values():
                kept = [b for b in mine if b.pid not in ending and not b.another_instances
                        and (b.age_s is None or b.age_s > self.new_backend_grace_s)]
                if len(kept) > cap:
                    kept.sort(key=lambda b: b.started)
                    for b in kept[cap:]:  # the newest go
                        ending[b.pid] = b
        if ending:
            log.info("session bounds: ending %d tenant backends", len(ending))
        return list(ending.values())


def _seconds(value: object) -> float | None:
    total = getattr(value, "total_seconds", None)
    return float(total()) if callable(total) else None


def _over(elapsed: float | None, bound: float) -> bool:
    return bound > 0 and elapsed is not None and elapsed > bound


class SessionBoundsJob(PeriodicJob):
    """:class:`SessionBounds` every ``interval_s`` in ``serve`` (0 disables it)."""

    def __init__(self, bounds: SessionBounds, interval_s: float) -> None:
        self.bounds = bounds
        super().__init__("session-bounds", bounds.tick, interval_s, first_run_now=False, log_traceback=False)
