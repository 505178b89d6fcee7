"""Reading and setting a user's budget; the numbers behind ``GET /api/users/{id}/usage``."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from agentpg.catalog.models import User, UserBudget, UserGlobalDatabase, WorkspaceAgentDatabase
from agentpg.errors import AgentpgError, InvalidInput, NotFound
from agentpg.lifecycle import workspace_ids
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.schemas import BackupUsage, DatabaseUsage, UsageReport
from agentpg.usage.budgets import (
    _plan,
    apply_enforcement,
    budget_status,
    period_start_of,
    sample_first,
    wants_read_only,
)
from agentpg.usage.pricing import MICRO, PriceTable

log = logging.getLogger(__name__)

_MAX_BUDGET_CENTS = 10**12


def _usage_of(rec: UserGlobalDatabase | WorkspaceAgentDatabase, period: datetime,
              workspace_id: str | None) -> DatabaseUsage:
    current = rec.period_start is not None and rec.period_start >= period
    snapshot = rec.usage_snapshot or {}
    storage = snapshot.get("storage_bytes")
    backup = rec.period_backup_microcents if current else 0
    return DatabaseUsage(database="agent" if workspace_id else "global",
                         workspace_id=workspace_ids.public_id(workspace_id) if workspace_id else None,
                         name=rec.database_name,
                         cost_cents=round((rec.period_cost_microcents - backup) / MICRO) if current else 0,
                         storage_bytes=int(storage) if storage is not None else None,
                         last_sync=rec.last_consumption_sync, backup_bytes=rec.backup_bytes,
                         backup_cost_cents=round(backup / MICRO))


def usage_report(deps: LifecycleDeps, user_id: str, *, warning_percent: int = 80,
                 default_budget_cents: int | None = None, prices: PriceTable | None = None) -> UsageReport:
    """The user's usage as of the last sync. The total is the sum of the parts (each database's own cost,
    and the backup storage line: their shares of their servers' backups), by construction.

    With ``prices``, a database never sampled yet (just registered) is sampled now, so a new user's storage
    and cost read right away rather than after the first periodic sync."""
    period = period_start_of(datetime.now(UTC))
    with deps.sessions() as s:
        user = s.get(User, user_id)
        if user is None or user.status == "provisioning":
            raise NotFound(f"user {user_id!r} does not exist")
        glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one_or_none()
        agents = list(s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.user_id == user_id)
                                .order_by(WorkspaceAgentDatabase.workspace_id)))
        budget = s.get(UserBudget, user_id)
    if prices is not None:
        try:
            sampled = sample_first(deps, prices, [*([glob] if glob is not None else []), *agents])
        except AgentpgError as exc:  # the periodic sync will get there; the report still answers
            log.warning("first usage sample of user %s failed: %s", user_id, exc.message)
            sampled = 0
        if sampled:
            return usage_report(deps, user_id, warning_percent=warning_percent,
                                default_budget_cents=default_budget_cents)
    parts = [_usage_of(a, period, a.workspace_id) for a in agents]
    global_part = _usage_of(glob, period, None) if glob is not None else None
    every = [*parts, *([global_part] if global_part else [])]
    backups = BackupUsage(bytes=sum(p.backup_bytes or 0 for p in every),
                          cost_cents=sum(p.backup_cost_cents for p in every))
    total = sum(p.cost_cents for p in every) + backups.cost_cents
    budget_cents = budget.budget_cents if budget is not None else default_budget_cents
    # read_only says what an agent meets: writes are refused from the decision on (agentpg checks it before
    # every write), and until the grants are given back after a block is lifted; the grants' own revocation
    # (``enforced``) may lag the decision by a moment, so it alone would say "writable" while writes fail.
    reason = block_reason(budget)
    return UsageReport(
        user_id=user_id, period_start=period, budget_cents=budget_cents, total_cost_cents=total,
        percent_of_budget=round(100 * total / budget_cents, 2) if budget_cents else None,
        status=budget_status(total, budget_cents, warning_percent),
        read_only=reason is not None, read_only_reason=reason,
        storage_limit_exceeded=bool(budget and budget.storage_exceeded), global_database=global_part,
        agent_databases=parts, backups=backups)


def set_budget(deps: LifecycleDeps, user_id: str, budget_cents: int | None) -> None:
    """Set (or with ``None`` remove) the user's budget and enforce it against the last synced total now."""
    if budget_cents is not None and (not isinstance(budget_cents, int) or isinstance(budget_cents, bool)
                                     or not 0 <= budget_cents <= _MAX_BUDGET_CENTS):
        raise InvalidInput(f"budget_cents must be a whole number of cents from 0 to {_MAX_BUDGET_CENTS}, or null")
    period = period_start_of(datetime.now(UTC))
    with deps.sessions.begin() as s:
        user = s.get(User, user_id)
        if user is None or user.status != "active":
            raise NotFound(f"user {user_id!r} does not exist")
        # Insert-if-missing then lock: two first budgets set at once would otherwise both INSERT (a 500).
        s.execute(pg_insert(UserBudget).values(user_id=user_id, budget_cents=budget_cents, period_start=period,
                                               total_cost_cents=0, exceeded=False, enforced=False)
                  .on_conflict_do_nothing(index_elements=[UserBudget.user_id]))
        budget = s.get_one(UserBudget, user_id, with_for_update=True, populate_existing=True)
        budget.budget_cents = budget_cents
        budget.exceeded = budget_cents is not None and budget.total_cost_cents >= budget_cents
        want, have = wants_read_only(budget), budget.enforced
        plans = [p for p in (_plan(r) for r in [
            *s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)),
            *s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.user_id == user_id))])
            if p is not None]
    if want != have:
        apply_enforcement(deps, user_id, plans, want)


def write_block_reason(deps: LifecycleDeps, user_id: str) -> str | None:
    """Why the user's agents may not write now (a clear message for MCP ``execute``), or ``None``."""
    with deps.sessions() as s:
        budget = s.get(UserBudget, user_id)
    return block_reason(budget)


def block_reason(budget: UserBudget | None) -> str | None:
    """The message of :func:`write_block_reason` for ``budget``'s row: both reasons when both blocks apply."""
    if budget is None:
        return None
    reasons = []
    if budget.storage_exceeded:
        reasons.append(storage_message(budget.storage_limit_mb, budget.storage_bytes))
    if budget.exceeded:
        reasons.append(f"budget exceeded: {_over_budget(budget.total_cost_cents, budget.budget_cents)}; this "
                       "user's databases are read-only until the budget is raised or the next period starts")
    if not reasons and budget.enforced:  # a block was just lifted; the grants follow within the same job
        reasons.append("this user's databases are read-only until agentpg restores writes (a budget or storage "
                       "block was just lifted); retry in a few seconds")
    return "; and ".join(reasons) + "; reads still work" if reasons else None


def storage_message(limit_mb: int | None, used_bytes: int) -> str:
    """Why writes are refused over the storage limit, and what brings them back."""
    return (f"storage limit of {limit_mb or 0} MB reached: {used_bytes / 2**20:.1f} MB used; this user's databases are "
            "read-only until its storage is back under the limit: delete data (a workspace's agent database "
            "goes with the workspace) or ask the operator to delete data or raise AGENTPG_USER_STORAGE_LIMIT_MB")


def _over_budget(cost_cents: int, budget_cents: int | None) -> str:
    """Why a user is over budget, in words that fit the figures (a budget of 0 allows no cost at all)."""
    if budget_cents == 0:
        return "this user's budget is 0 cents, which allows no usage at all"
    if budget_cents is None:
        return f"this user's databases cost {cost_cents} cents this period and were over its former budget"
    relation = "reaching" if cost_cents == budget_cents else "over"
    return (f"this user's databases cost {cost_cents} cents this period, {relation} its budget of "
            f"{budget_cents} cents")
