"""The per-user storage limit (issue 18): a check every few seconds, not at the next usage sync.

Each check reads the size of every ready platform database with the provider's ``usage_many`` (one query per
server on a local server or a fleet, the usage sync's own reader), sums it per user (global + agent
databases), and over ``AGENTPG_USER_STORAGE_LIMIT_MB`` makes the user's databases read-only through the budget's
mechanism (:func:`~agentpg.usage.budgets.apply_enforcement`): the budget row's ``storage_exceeded`` is the
second reason to be read-only, beside ``exceeded``, and writes come back only when neither applies.

One check at a time across every ``serve`` sharing the catalog (an advisory lock of its own, so a long usage
sync never delays it). The catalog is written only for users near the limit (``WARN_FRACTION`` of it) or
whose state changes: a check of thousands of users far under it writes nothing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from agentpg.catalog.engine import singleton_lock
from agentpg.catalog.models import User, UserBudget
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.periodic import PeriodicJob
from agentpg.providers.base import DatabasePlan, UsageSample
from agentpg.usage.budgets import _plan, _ready_records, apply_enforcement, period_start_of, wants_read_only

log = logging.getLogger(__name__)

_STORAGE_LOCK_KEY = 0x61677470_73746f72  # not the usage sync's: the two never wait for each other
RELEASE_FRACTION = 0.95
"""A user over the limit gets writes back once under this fraction of it."""
WARN_FRACTION = 0.8
"""Users at or over this fraction of the limit have their storage recorded (and exported in /metrics)."""
METRICS_TOP = 100
"""At most this many users get a per-user storage series in /metrics (the largest): bounded cardinality."""


@dataclass
class StorageReport:
    skipped: bool = False
    databases: int = 0
    users: int = 0
    failed: list[str] = field(default_factory=list)
    made_read_only: list[str] = field(default_factory=list)
    writes_restored: list[str] = field(default_factory=list)


def check_storage(deps: LifecycleDeps, limit_mb: int, *, default_budget_cents: int | None = None) -> StorageReport:
    """Measure every user's storage now and block (or unblock) writes against ``limit_mb`` (0: no limit)."""
    report = StorageReport()
    with singleton_lock(deps.engine, _STORAGE_LOCK_KEY) as mine:
        if not mine:
            report.skipped = True
            return report
        _check(deps, limit_mb, default_budget_cents, report)
    return report


def _check(deps: LifecycleDeps, limit_mb: int, default_budget_cents: int | None, report: StorageReport) -> None:
    limit = limit_mb * 2**20
    plans: dict[str, list[DatabasePlan]] = defaultdict(list)
    for rec in _ready_records(deps):
        plan = _plan(rec)
        if plan is not None:
            plans[rec.user_id].append(plan)
    every = [plan for user_plans in plans.values() for plan in user_plans]
    samples = deps.provider.usage_many(every) if every and limit_mb > 0 else {}
    totals: dict[str, int] = {}
    for user_id, user_plans in plans.items():
        sizes = [samples.get(plan.database) for plan in user_plans]
        if limit_mb > 0 and not all(isinstance(size, UsageSample) for size in sizes):
            # One database unread (server down, just dropped): this user's state stays as it is until a check
            # reads them all; a partial sum could only unblock too early.
            report.failed.extend(f"{plan.database}: {getattr(size, 'message', 'no sample')}"
                                 for plan, size in zip(user_plans, sizes, strict=True)
                                 if not isinstance(size, UsageSample))
            continue
        totals[user_id] = sum(size.storage_bytes for size in sizes if isinstance(size, UsageSample))
        report.databases += len(sizes)
    with deps.sessions() as s:
        active = set(s.scalars(select(User.id).where(User.status == "active")))
        stored = {b.user_id: (b.storage_bytes, b.storage_exceeded, b.storage_limit_mb)
                  for b in s.scalars(select(UserBudget))}
    warn = limit * WARN_FRACTION
    due: dict[str, int] = {}
    for user_id in sorted(active):
        total = totals.get(user_id)
        if total is None and limit_mb > 0:
            continue  # unread this time (or no ready database yet): nothing is known to change
        total = total or 0
        before_bytes, before_over, before_limit = stored.get(user_id, (0, False, None))
        over = _over(limit_mb, limit, total, before_over)
        near = limit_mb > 0 and (total >= warn or before_bytes >= warn)
        if over != before_over or (near and (total != before_bytes or before_limit != limit_mb)):
            due[user_id] = total
    report.users = len(totals)
    if not due:
        return
    period = period_start_of(datetime.now(UTC))
    changes: list[tuple[str, bool]] = []
    with deps.sessions.begin() as s:
        s.execute(pg_insert(UserBudget).values([
            {"user_id": user_id, "budget_cents": default_budget_cents, "period_start": period,
             "total_cost_cents": 0, "exceeded": False, "enforced": False} for user_id in due])
            .on_conflict_do_nothing(index_elements=[UserBudget.user_id]))
        for budget in s.scalars(select(UserBudget).where(UserBudget.user_id.in_(list(due)))
                                .order_by(UserBudget.user_id).with_for_update()):
            total = due[budget.user_id]
            budget.storage_bytes = total
            budget.storage_limit_mb = limit_mb or None
            budget.storage_exceeded = _over(limit_mb, limit, total, budget.storage_exceeded)
            if wants_read_only(budget) != budget.enforced:
                changes.append((budget.user_id, wants_read_only(budget)))
    deps.invalidation.bump()  # this process's cached block reasons follow at once
    for user_id, read_only in changes:
        if apply_enforcement(deps, user_id, plans[user_id], read_only):
            (report.made_read_only if read_only else report.writes_restored).append(user_id)
            if read_only and limit_mb > 0 and due[user_id] >= limit:
                log.warning("user %s is over its storage limit of %d MB (%.1f MB): its databases are now "
                            "read-only", user_id, limit_mb, due[user_id] / 2**20)
    deps.invalidation.bump()


def _over(limit_mb: int, limit: float, total: int, was_over: bool) -> bool:
    """Over the limit; once over, until under 95 % of it: a database's size moves a little on its own (free
    space maps, a checkpoint), and writes must not flap on and off at the boundary."""
    if limit_mb <= 0:
        return False
    return total >= limit or (was_over and total >= limit * RELEASE_FRACTION)


class StorageGuard(PeriodicJob):
    """The job ``serve`` runs every ``interval_s`` (first at once; 0 disables it). Without a limit it still runs,
    hourly and without reading any database, so users blocked under a former limit get their writes back."""

    def __init__(self, deps: LifecycleDeps, limit_mb: int, interval_s: float,
                 default_budget_cents: int | None,
                 on_blocked: Callable[[list[str]], object] | None = None) -> None:
        """``on_blocked`` gets the users whose writes a check just blocked (serve ends their running writes:
        a revoked grant stops only the next statement)."""
        self._deps, self.limit_mb, self._default_budget = deps, limit_mb, default_budget_cents
        self._on_blocked = on_blocked
        super().__init__("storage-limit", self._check_once, interval_s if limit_mb > 0 or not interval_s else 3600,
                         first_run_now=True, log_traceback=False)

    def _check_once(self) -> None:
        report = check_storage(self._deps, self.limit_mb, default_budget_cents=self._default_budget)
        if report.made_read_only and self._on_blocked is not None:
            self._on_blocked(report.made_read_only)
        if report.failed:
            log.warning("storage check: %d databases unread: %s", len(report.failed), "; ".join(report.failed[:5]))


def blocked_users(deps: LifecycleDeps) -> set[str]:
    """Users whose databases are read-only right now (over the storage limit or the budget)."""
    with deps.sessions() as s:
        return {str(user) for user in s.scalars(select(UserBudget.user_id).where(UserBudget.enforced))}


class StorageCollector(Collector):
    """``/metrics``: the limit, how many users are blocked (by storage, by budget), and the storage of the
    users at or over ``WARN_FRACTION`` of the limit (the ``METRICS_TOP`` largest), read from the catalog at
    scrape time so every ``serve`` answers the same whichever one ran the check."""

    def __init__(self, deps: LifecycleDeps, limit_mb: int) -> None:
        self._deps, self._limit_mb = deps, limit_mb

    def collect(self) -> Iterable[Metric]:
        limit = GaugeMetricFamily("agentpg_user_storage_limit_bytes",
                                  "AGENTPG_USER_STORAGE_LIMIT_MB in bytes (0: no limit).")
        limit.add_metric([], self._limit_mb * 2**20)
        yield limit
        try:
            with self._deps.sessions() as s:
                storage_blocked = s.scalar(select(func.count()).where(UserBudget.storage_exceeded)) or 0
                budget_blocked = s.scalar(select(func.count()).where(UserBudget.exceeded)) or 0
                read_only = s.scalar(select(func.count()).where(UserBudget.enforced)) or 0
                near = list(s.execute(
                    select(UserBudget.user_id, UserBudget.storage_bytes)
                    .where(UserBudget.storage_bytes >= self._limit_mb * 2**20 * WARN_FRACTION,
                           UserBudget.storage_limit_mb.is_not(None))
                    .order_by(UserBudget.storage_bytes.desc()).limit(METRICS_TOP))) if self._limit_mb else []
        except Exception:  # the catalog is down: /metrics still answers the rest
            log.warning("storage metrics unavailable: the catalog cannot be read", exc_info=False)
            return
        blocked = GaugeMetricFamily("agentpg_users_blocked", "Users whose databases are read-only, by reason "
                                    "(storage | budget) and in all (any).", labels=["reason"])
        blocked.add_metric(["storage"], storage_blocked)
        blocked.add_metric(["budget"], budget_blocked)
        blocked.add_metric(["any"], read_only)
        yield blocked
        per_user = GaugeMetricFamily("agentpg_user_storage_bytes",
                                     f"Storage of each user at or over {WARN_FRACTION:.0%} of the limit (the "
                                     f"{METRICS_TOP} largest), as of the last storage check.", labels=["user_id"])
        for user_id, size in near:
            per_user.add_metric([user_id], size)
        yield per_user
