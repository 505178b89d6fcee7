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
         before_each: Callable[[int], None] | None = None) -> int:
    """Create warm databases until ``target`` exist (ready or being made); return how many were made.
    ``before_each`` runs before each one with how many there are (the refiller waits there for a quiet
    moment).

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
            before_each(count)
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
               before_each: Callable[[int], None] | None = None) -> int:
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


class ClaimBursts:
    """When the refiller may make the next database, from the claims it was told of (thread-safe enough: one
    writer per claim, one reader; a torn read only shifts one wait).

    Claims less than ``quiet_s`` apart are one *burst*. A ``CREATE DATABASE`` writes ~8 MB of WAL, and a
    claim's commit waits behind its flush, so a refill racing a burst slows the registrations it serves. So:

    - while claims come in bursts (the largest of the last ``memory_s`` had 2 or more) and the pool holds at
      least as many databases as the largest one, the next burst is served from it, and the refill waits for
      ``calm_s`` without claims, at most ``max_calm_s`` (a wave of bursts a few seconds apart is refilled
      after the wave);
    - otherwise (claims one at a time, or a pool the next burst could run dry) the refill takes the first
      ``quiet_s`` pause, and waits at most ``max_wait_s`` for it (a steady stream with no pause must not
      starve the pool);
    - an empty pool is refilled at once: every registration is already paying for a database of its own.
    """

    def __init__(self, quiet_s: float = 0.5, calm_s: float = 5.0, max_wait_s: float = 5.0,
                 max_calm_s: float = 15.0, memory_s: float = 600.0) -> None:
        self.quiet_s, self.calm_s, self.max_wait_s, self.memory_s = quiet_s, calm_s, max_wait_s, memory_s
        self.max_calm_s = max_calm_s
        self.last_claim = float("-inf")
        self._current = 0
        self._bursts: list[tuple[float, int]] = []
        """(ended at, size) of the bursts within ``memory_s``."""

    def claim(self, now: float) -> None:
        if now - self.last_claim > self.quiet_s:
            if self._current:
                self._bursts.append((self.last_claim, self._current))
            self._current = 0
        self._current += 1
        self.last_claim = now

    def largest(self, now: float) -> int:
        """The largest burst within ``memory_s`` (the one going on included)."""
        self._bursts = [(ended, size) for ended, size in self._bursts if now - ended <= self.memory_s]
        ongoing = self._current if now - self.last_claim <= self.memory_s else 0
        return max([ongoing, *(size for _, size in self._bursts)])

    def wait_until(self, pool: int, began: float, now: float) -> float:
        """The monotonic time the refill may make its next database, with ``pool`` databases there and its
        wait begun at ``began``; at or before ``now``: at once."""
        if pool == 0:
            return now
        largest = self.largest(now)
        if largest >= 2 and pool >= largest:
            return min(self.last_claim + self.calm_s, began + self.max_calm_s)
        return min(self.last_claim + self.quiet_s, began + self.max_wait_s)


class Refiller(PeriodicJob):
    """Keeps the pool at its :class:`WarmSizing` target from a background thread, every ``interval_s``;
    ``kick()`` after a claim wakes it early. A base of 0 never starts. When it makes each database:
    :class:`ClaimBursts`."""

    def __init__(self, deps: LifecycleDeps, sizing: WarmSizing, interval_s: float = 5.0,
                 bursts: ClaimBursts | None = None) -> None:
        self.bursts = bursts or ClaimBursts()
        super().__init__("warm-pool", lambda: keep_sized(deps, sizing, stop=self.stopping,
                                                         before_each=self._wait_for_quiet),
                         interval_s if sizing.base > 0 else 0, first_run_now=True)

    def kick(self) -> None:
        self.bursts.claim(time.monotonic())
        super().kick()

    def _wait_for_quiet(self, pool: int) -> None:
        began = time.monotonic()
        while not self.stopping.is_set():
            now = time.monotonic()
            wait = self.bursts.wait_until(pool, began, now) - now
            if wait <= 0:
                return
            self.stopping.wait(wait)
