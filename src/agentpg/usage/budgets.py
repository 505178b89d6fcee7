"""Sync every database's usage into the catalog, total it per user, and enforce budgets at the grant level.

One sync at a time across every agentpg process sharing the catalog: the job takes a Postgres advisory
lock and skips when another instance holds it. Each step is idempotent, so a sync interrupted anywhere is
finished by the next one: costs are computed from stored counter snapshots, and ``enforced`` is only set
after the provider has really changed the grants.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from agentpg.catalog.engine import singleton_lock
from agentpg.catalog.models import User, UserBudget, UserGlobalDatabase, WorkspaceAgentDatabase
from agentpg.errors import AgentpgError
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.periodic import PeriodicJob
from agentpg.providers.base import DatabasePlan, UsageSample
from agentpg.usage import history as usage_history
from agentpg.usage.backups import Sized, attribute, server_backup_bytes
from agentpg.usage.pricing import MICRO, PriceTable, backup_cost_microcents, cost_microcents

log = logging.getLogger(__name__)

_SYNC_LOCK_KEY = 0x61677470_75736167  # any constant shared by every agentpg process on one catalog

Record = UserGlobalDatabase | WorkspaceAgentDatabase
_T = TypeVar("_T")

BATCH = 500
"""Databases (and users) per provider request and catalog transaction: a sync of thousands of databases is a
handful of round trips, and a transaction holds its row locks for milliseconds."""


def period_start_of(now: datetime) -> datetime:
    """Budgets run per calendar month (UTC)."""
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def budget_status(total_cents: int, budget_cents: int | None, warning_percent: int) -> Literal["ok", "warning",
                                                                                              "exceeded"]:
    if budget_cents is None:
        return "ok"
    if total_cents >= budget_cents:
        return "exceeded"
    return "warning" if total_cents * 100 >= budget_cents * warning_percent else "ok"


@dataclass(frozen=True)
class UsagePolicy:
    """The operator's prices and budget rules (from settings)."""

    prices: PriceTable = field(default_factory=PriceTable)
    default_budget_cents: int | None = None
    warning_percent: int = 80


@dataclass
class SyncReport:
    skipped: bool = False
    databases: int = 0
    failed: list[str] = field(default_factory=list)
    users: int = 0
    made_read_only: list[str] = field(default_factory=list)
    writes_restored: list[str] = field(default_factory=list)


def _plan(rec: Record) -> DatabasePlan | None:
    if rec.ownership_type != "platform" or not rec.owner_role or not rec.login_role:
        return None
    return DatabasePlan(rec.database_name, rec.owner_role, rec.login_role, rec.provider_server)


def sync_usage(deps: LifecycleDeps, prices: PriceTable, *, default_budget_cents: int | None = None,
               now: datetime | None = None) -> SyncReport:
    """Sample every ready platform database, add its cost since the last sample, then enforce budgets."""
    report = SyncReport()
    now = now or datetime.now(UTC)
    period = period_start_of(now)
    with singleton_lock(deps.engine, _SYNC_LOCK_KEY) as mine:
        if not mine:
            report.skipped = True
            return report
        _sample_all(deps, prices, now, period, report)
        _enforce(deps, now, period, default_budget_cents, report)
    return report


def _ready_records(deps: LifecycleDeps) -> list[Record]:
    with deps.sessions() as s:
        return [*s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.status == "ready")),
                *s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.status == "ready"))]


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), BATCH):
        yield items[start:start + BATCH]


def _sample_all(deps: LifecycleDeps, prices: PriceTable, now: datetime, period: datetime,
                report: SyncReport) -> None:
    """Every database is read first, then priced: a database's backup share needs the sizes of all the
    databases of its server (:mod:`.backups`); one unread keeps its last known size in that sum."""
    planned = [(rec, plan) for rec in _ready_records(deps) if (plan := _plan(rec)) is not None]
    samples: dict[str, UsageSample | AgentpgError] = {}
    for chunk in _chunks(planned):
        samples.update(deps.provider.usage_many([plan for _, plan in chunk]))
    backup = server_backup_bytes(deps.provider) if planned else {}
    shares = attribute(backup, [Sized(plan.database, plan.server, _size(samples.get(plan.database), rec))
                                for rec, plan in planned]) if backup else {}
    unread = backup is None  # the shares stay as the last sync measured them
    for chunk in _chunks(planned):
        with deps.sessions.begin() as s:
            locked = _lock_records(s, [rec for rec, _ in chunk])
            for rec, plan in chunk:
                sample = samples.get(plan.database)
                if not isinstance(sample, UsageSample):
                    reason = sample.message if sample is not None else "the provider returned no sample"
                    report.failed.append(f"{rec.database_name}: {reason}")
                    continue
                fresh = locked.get((type(rec), rec.id))
                if fresh is None:  # deleted since the list was read
                    continue
                share = None if unread else shares.get(plan.database, 0)
                _add_cost(fresh, sample, prices, now, period, backup_bytes=share)
                report.databases += 1


def _size(sample: UsageSample | AgentpgError | None, rec: Record) -> int:
    if isinstance(sample, UsageSample):
        return sample.storage_bytes
    return int((rec.usage_snapshot or {}).get("storage_bytes") or 0)


def sample_first(deps: LifecycleDeps, prices: PriceTable, records: Sequence[Record],
                 now: datetime | None = None) -> int:
    """Take the first usage sample of the databases of ``records`` never sampled yet (a new user's or
    workspace's), so their usage reads right from the start instead of after the first periodic sync.
    Returns how many were sampled; a database the provider cannot read now is left to the sync."""
    now = now or datetime.now(UTC)
    planned = [(rec, plan) for rec in records if rec.last_consumption_sync is None and rec.status == "ready"
               and (plan := _plan(rec)) is not None]
    if not planned:
        return 0
    samples = deps.provider.usage_many([plan for _, plan in planned])
    sampled = 0
    with deps.sessions.begin() as s:
        locked = _lock_records(s, [rec for rec, _ in planned])
        for rec, plan in planned:
            sample, fresh = samples.get(plan.database), locked.get((type(rec), rec.id))
            if isinstance(sample, UsageSample) and fresh is not None and fresh.last_consumption_sync is None:
                _add_cost(fresh, sample, prices, now, period_start_of(now))  # else the sync got there first
                sampled += 1
    return sampled


def _lock_records(s: Session, records: Sequence[Record]) -> dict[tuple[type, str], Record]:
    """The catalog rows of ``records``, locked for this transaction (in id order, one query per table)."""
    locked: dict[tuple[type, str], Record] = {}
    models: tuple[type[UserGlobalDatabase], type[WorkspaceAgentDatabase]] = (UserGlobalDatabase,
                                                                             WorkspaceAgentDatabase)
    for model in models:
        ids = [rec.id for rec in records if isinstance(rec, model)]
        if ids:
            rows: list[Record] = list(s.scalars(select(model).where(model.id.in_(ids)).order_by(model.id)
                                                .with_for_update()))
            locked.update(((model, row.id), row) for row in rows)
    return locked


def _add_cost(rec: Record, sample: UsageSample, prices: PriceTable, now: datetime, period: datetime, *,
              backup_bytes: int | None = None) -> None:
    """Price what ``rec`` used since its last sample into its period cost, and keep ``sample`` as the next
    starting point (a new period starts the cost from zero). ``backup_bytes``: the database's share of its
    server's backups now (None: not measured, the last share stays); it is priced like storage, a size over
    the elapsed time, into ``period_cost_microcents`` and, separately, ``period_backup_microcents``."""
    if rec.period_start is None or rec.period_start < period:
        rec.period_start = period
        rec.period_cost_microcents = 0
        rec.period_backup_microcents = 0
    before = UsageSample.from_json(rec.usage_snapshot) if rec.usage_snapshot else None
    since = max(rec.last_consumption_sync or rec.created_at, period)
    elapsed_s = (now - since).total_seconds()
    rec.period_cost_microcents += cost_microcents(prices, before, sample, elapsed_s)
    if backup_bytes is not None:
        backup_cost = backup_cost_microcents(prices, backup_bytes, elapsed_s)
        rec.backup_bytes = backup_bytes
        rec.period_backup_microcents += backup_cost
        rec.period_cost_microcents += backup_cost
    rec.current_period_cost_cents = round(rec.period_cost_microcents / MICRO)
    rec.usage_snapshot = sample.to_json()
    rec.last_consumption_sync = now


def _enforce(deps: LifecycleDeps, now: datetime, period: datetime, default_budget_cents: int | None,
             report: SyncReport) -> None:
    totals: dict[str, int] = defaultdict(int)
    storage: dict[str, int] = defaultdict(int)  # for the usage history (usage/history.py)
    plans: dict[str, list[DatabasePlan]] = defaultdict(list)
    for rec in _ready_records(deps):
        if rec.period_start is not None and rec.period_start >= period:
            totals[rec.user_id] += rec.period_cost_microcents
        storage[rec.user_id] += _size(None, rec)
        plan = _plan(rec)
        if plan is not None:
            plans[rec.user_id].append(plan)
    with deps.sessions() as s:
        user_ids = list(s.scalars(select(User.id).where(User.status == "active").order_by(User.id)))
    for chunk in _chunks(user_ids):
        changes: list[tuple[str, bool]] = []
        days: list[tuple[str, int, int]] = []
        with deps.sessions.begin() as s:
            # A budget row for every user first; ON CONFLICT: one set through the API meanwhile is kept.
            s.execute(pg_insert(UserBudget).values([
                {"user_id": user_id, "budget_cents": default_budget_cents, "period_start": period,
                 "total_cost_cents": 0, "exceeded": False, "enforced": False} for user_id in chunk])
                .on_conflict_do_nothing(index_elements=[UserBudget.user_id]))
            for budget in s.scalars(select(UserBudget).where(UserBudget.user_id.in_(chunk))
                                    .order_by(UserBudget.user_id).with_for_update()):
                total_cents = round(totals[budget.user_id] / MICRO)
                budget.period_start = period
                budget.total_cost_cents = total_cents
                budget.exceeded = budget.budget_cents is not None and total_cents >= budget.budget_cents
                if wants_read_only(budget) != budget.enforced:
                    changes.append((budget.user_id, wants_read_only(budget)))
                days.append((budget.user_id, total_cents, storage[budget.user_id]))
            usage_history.record_day(s, now, period, days)
        report.users += len(chunk)
        for user_id, read_only in changes:
            apply_enforcement(deps, user_id, plans[user_id], read_only, report)


def wants_read_only(budget: UserBudget) -> bool:
    """A user's databases are read-only while either block applies: over budget, or over the storage limit."""
    return budget.exceeded or budget.storage_exceeded


def apply_enforcement(deps: LifecycleDeps, user_id: str, plans: list[DatabasePlan], read_only: bool,
                      report: SyncReport | None = None) -> bool:
    """Make every database of the user read-only (or writable again); record it once all succeeded.

    Serialised per user by the budget row's lock, held while the databases change, and decided by that row
    as it is then: a budget change committed meanwhile (``PUT …/budget`` ten times at once, or the sync
    racing one) may have made ``read_only`` stale, and the last change must win, not the last to finish.
    The row decides on both blocks (:func:`wants_read_only`): lifting one never lifts the other.
    """
    with deps.sessions.begin() as s:
        budget = s.get(UserBudget, user_id, with_for_update=True, populate_existing=True)
        if budget is not None:
            read_only = wants_read_only(budget)
            if budget.enforced == read_only:
                return True
        try:
            for plan in plans:
                deps.provider.set_read_only(plan, read_only)
        except AgentpgError as exc:
            log.warning("budget enforcement for user %s is incomplete, the next sync retries: %s", user_id,
                        exc.message)
            if report is not None:
                report.failed.append(f"enforcement for user {user_id}: {exc.message}")
            return False
        if budget is not None:
            budget.enforced = read_only
    if report is not None:
        (report.made_read_only if read_only else report.writes_restored).append(user_id)
    log.info("user %s databases are now %s", user_id, "read-only (over budget or storage limit)" if read_only
             else "writable")
    return True


class UsageSyncer(PeriodicJob):
    """The periodic job ``serve`` runs: a sync every ``interval_s`` (the first after one interval); the
    advisory lock keeps it to one instance at a time however many ``serve`` processes share the catalog."""

    def __init__(self, deps: LifecycleDeps, prices: PriceTable, interval_s: float,
                 default_budget_cents: int | None) -> None:
        self._deps, self._prices = deps, prices
        self._default_budget = default_budget_cents
        super().__init__("usage-sync", self._sync_once, interval_s, first_run_now=False)

    def _sync_once(self) -> None:
        report = sync_usage(self._deps, self._prices, default_budget_cents=self._default_budget)
        if not report.skipped:
            log.info("usage sync: %d databases, %d users, %d failed", report.databases, report.users,
                     len(report.failed))
