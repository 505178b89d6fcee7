"""The warm pool: tenant databases made ahead of time so registration only has to claim one.

``CREATE DATABASE`` copies a template and checkpoints: tens of milliseconds at best, far more under load.
A claimed warm database needs one ``ALTER ROLE … PASSWORD`` instead. Names are opaque and random, so a
database made for nobody in particular can become anybody's without renaming.

The pool sizes itself (:class:`WarmSizing`): at least ``AGENTPG_WARM_POOL_SIZE``, and as many as the
busiest wave of the last hour took (registrations and workspace creations within any minute, counted from
the catalog's intent log, so every ``serve`` instance sees every instance's demand) times 1.5, never more
than ``AGENTPG_WARM_POOL_MAX`` (its disk budget). When demand falls, it shrinks back after the hour.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from agentpg.catalog.models import WarmDatabase
from agentpg.errors import AgentpgError
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.periodic import PeriodicJob
from agentpg.providers.base import DatabasePlan, new_password

log = logging.getLogger(__name__)


def claim(s: Session, provider: str) -> DatabasePlan | None:
    """Take one ready warm database inside the caller's transaction; ``None`` if the pool is empty.

    ``SKIP LOCKED`` lets concurrent registrations each take a different one without waiting.
    """
    claimed = claim_with_password(s, provider)
    return claimed[0] if claimed is not None else None


def claim_with_password(s: Session, provider: str) -> tuple[DatabasePlan, WarmPassword | None] | None:
    """:func:`claim`, with the database's sealed login password when it has one
    (:attr:`~agentpg.catalog.models.WarmDatabase.password_sealed`)."""
    row = s.scalars(select(WarmDatabase)
                    .where(WarmDatabase.state == "ready", WarmDatabase.provider == provider)
                    .order_by(WarmDatabase.created_at).limit(1).with_for_update(skip_locked=True)).one_or_none()
    if row is None:
        return None
    s.delete(row)
    plan = DatabasePlan(row.database_name, row.owner_role, row.login_role, row.provider_server)
    return plan, WarmPassword(row.id, row.password_sealed) if row.password_sealed else None


@dataclass(frozen=True)
class WarmPassword:
    """A claimed warm database's login password, still sealed to its warm row (:meth:`opened` opens it)."""

    row_id: str
    sealed: str

    def opened(self, deps: LifecycleDeps) -> str:
        return deps.open(self.sealed, "warm_databases", self.row_id, "password")


def fill(deps: LifecycleDeps, target: int, *, stop: threading.Event | None = None,
         before_each: Callable[[float], None] | None = None) -> int:
    """Create warm databases until ``target`` exist (ready or being made); return how many were made.
    ``before_each`` runs before each one with how full the pool is (0 to 1; the refiller waits there for a
    quiet moment, longer when the pool is fuller).

    Each one is crash-safe like any operation: its row (state ``creating``) is written and its advisory lock
    held before the provider is touched.
    """
    made = 0
    while target > 0 and not (stop is not None and stop.is_set()):
        if before_each is not None:
            with deps.sessions() as s:
                count = s.scalar(select(func.count()).select_from(WarmDatabase)
                                 .where(WarmDatabase.provider == deps.provider.name)) or 0
            if count >= target:
                return made
            before_each(count / target)
        row_id = str(uuid.uuid4())
        plan = DatabasePlan.fresh(deps.provider.place())
        with deps.operation_lease(row_id):
            with deps.sessions.begin() as s:
                count = s.scalar(select(func.count()).select_from(WarmDatabase)
                                 .where(WarmDatabase.provider == deps.provider.name)) or 0
                if count >= target:
                    return made
                s.add(WarmDatabase(id=row_id, provider=deps.provider.name, database_name=plan.database,
                                   owner_role=plan.owner_role, login_role=plan.login_role, state="creating",
                                   provider_server=plan.server))
            password = new_password()
            try:
                deps.provider.create_database(plan, password)
            except AgentpgError as exc:
                log.warning("warm pool refill failed: %s", exc.message)
                discard(deps, row_id)
                return made
            with deps.sessions.begin() as s:
                row = s.get(WarmDatabase, row_id)
                if row is not None:
                    row.state = "ready"
                    row.password_sealed = deps.seal(password, "warm_databases", row_id, "password")
            made += 1
    return made


def discard(deps: LifecycleDeps, row_id: str) -> None:
    """Drop a warm database and forget it (a failed or abandoned refill)."""
    with deps.sessions() as s:
        row = s.get(WarmDatabase, row_id)
        if row is None:
            return
        plan = DatabasePlan(row.database_name, row.owner_role, row.login_role, row.provider_server)
    deps.provider.drop_database(plan)
    with deps.sessions.begin() as s:
        row = s.get(WarmDatabase, row_id)
        if row is not None:
            s.delete(row)


@dataclass(frozen=True)
class WarmSizing:
    """How large the pool should be: ``base`` at least, the busiest recent burst times ``headroom`` when that
    is more, ``maximum`` at most (``AGENTPG_WARM_POOL_SIZE`` / ``AGENTPG_WARM_POOL_MAX``)."""

    base: int
    maximum: int
    burst_window_s: float = 60.0  # a wave: bursts seconds apart count together (the refill between is partial)
    lookback_s: float = 3600.0
    headroom: float = 1.5

    def target(self, peak_burst: int) -> int:
        if self.base <= 0:
            return 0
        return max(self.base, min(self.maximum, math.ceil(peak_burst * self.headroom)))


_PEAK_BURST = text(
    "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM operations "
    "WHERE kind IN ('register_user', 'create_workspace') "
    "AND created_at > now() - make_interval(secs => :lookback) "
    "GROUP BY floor(extract(epoch FROM created_at) / :window)) AS bursts")


def peak_burst(deps: LifecycleDeps, sizing: WarmSizing) -> int:
    """Databases the busiest ``burst_window_s`` of the last ``lookback_s`` asked for (one per registration and
    per workspace creation, whether or not the pool had one): one catalog statement on an index."""
    with deps.sessions() as s:
        return int(s.scalar(_PEAK_BURST, {"lookback": sizing.lookback_s, "window": sizing.burst_window_s}) or 0)


def trim(deps: LifecycleDeps, target: int, *, stop: threading.Event | None = None) -> int:
    """Drop ready warm databases above ``target``, newest first; return how many were dropped.

    Each is taken out of the pool first (state ``dropping``, under ``SKIP LOCKED`` so a registration claiming
    it right now keeps it), then dropped under its lease; ``reconcile`` finishes a drop a crash left.
    """
    dropped = 0
    while not (stop is not None and stop.is_set()):
        with deps.sessions.begin() as s:
            ready = s.scalar(select(func.count()).select_from(WarmDatabase).where(
                WarmDatabase.state == "ready", WarmDatabase.provider == deps.provider.name)) or 0
            if ready <= target:
                return dropped
            row = s.scalars(select(WarmDatabase).where(WarmDatabase.state == "ready",
                                                       WarmDatabase.provider == deps.provider.name)
                            .order_by(WarmDatabase.created_at.desc()).limit(1)
                            .with_for_update(skip_locked=True)).one_or_none()
            if row is None:
                return dropped
            row.state = "dropping"
            row_id = row.id
        with deps.operation_lease(row_id) as lease:
            if lease.acquired:
                discard(deps, row_id)
                dropped += 1
    return dropped


def keep_sized(deps: LifecycleDeps, sizing: WarmSizing, *, stop: threading.Event | None = None,
               before_each: Callable[[float], None] | None = None) -> int:
    """One refill round: fill up to the current target, or trim down to it; the target it used."""
    target = sizing.target(peak_burst(deps, sizing)) if sizing.base > 0 else 0
    if fill(deps, target, stop=stop, before_each=before_each) == 0:
        trim(deps, target, stop=stop)
    return target


def drain(deps: LifecycleDeps) -> int:
    """Drop every ready warm database (``agentpg pool drain``, or setting the size to 0)."""
    with deps.sessions() as s:
        ids = list(s.scalars(select(WarmDatabase.id).where(WarmDatabase.state == "ready")))
    for row_id in ids:
        discard(deps, row_id)
    return len(ids)


class Refiller(PeriodicJob):
    """Keeps the pool at its :class:`WarmSizing` target from a background thread, every ``interval_s``;
    ``kick()`` after a claim wakes it early. A base of 0 never starts.

    It makes each database in a quiet moment: not within ``quiet_s`` of the last claim, so a burst of
    registrations is not slowed by the refill's writes and fsyncs (a ``CREATE DATABASE`` writes ~8 MB of WAL,
    and a claim's commit waits behind its flush); the pool refills in the pauses between bursts. While the pool
    is at least half full the quiet moment must be ``calm_s`` long: a wave of bursts a few seconds apart is
    served from the pool and refilled after it, and only a pool running low races the next burst."""

    def __init__(self, deps: LifecycleDeps, sizing: WarmSizing, interval_s: float = 5.0,
                 quiet_s: float = 0.5, calm_s: float = 5.0) -> None:
        self._quiet_s = quiet_s
        self._calm_s = calm_s
        self._last_claim = 0.0
        super().__init__("warm-pool", lambda: keep_sized(deps, sizing, stop=self.stopping,
                                                         before_each=self._wait_for_quiet),
                         interval_s if sizing.base > 0 else 0, first_run_now=True)

    def kick(self) -> None:
        self._last_claim = time.monotonic()
        super().kick()

    def _wait_for_quiet(self, fullness: float) -> None:
        quiet = self._quiet_s if fullness < 0.5 else self._calm_s
        while not self.stopping.is_set():
            calm_in = self._last_claim + quiet - time.monotonic()
            if calm_in <= 0:
                return
            self.stopping.wait(calm_in)
