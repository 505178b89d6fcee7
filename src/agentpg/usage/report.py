"""Reading and setting a user's budget; the numbers behind ``GET /api/users/{id}/usage``."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from agentpg.catalog.models import User, UserBudget, UserGlobalDatabase, WorkspaceAgentDatabase
from agentpg.errors import InvalidInput, NotFound
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.schemas import DatabaseUsage, UsageReport
from agentpg.usage.budgets import _plan, apply_enforcement, budget_status, period_start_of
from agentpg.usage.pricing import MICRO

_MAX_BUDGET_CENTS = 10**12


def _usage_of(rec: UserGlobalDatabase | WorkspaceAgentDatabase, period: datetime,
              workspace_id: str | None) -> DatabaseUsage:
    current = rec.period_start is not None and rec.period_start >= period
    snapshot = rec.usage_snapshot or {}
    storage = snapshot.get("storage_bytes")
    return DatabaseUsage(database="agent" if workspace_id else "global", workspace_id=workspace_id,
                         name=rec.database_name, cost_cents=round(rec.period_cost_microcents / MICRO) if current else 0,
                         storage_bytes=int(storage) if storage is not None else None,
                         last_sync=rec.last_consumption_sync)


def usage_report(deps: LifecycleDeps, user_id: str, *, warning_percent: int = 80,
                 default_budget_cents: int | None = None) -> UsageReport:
    """The user's usage as of the last sync. The total is the sum of the parts, by construction."""
    period = period_start_of(datetime.now(UTC))
    with deps.sessions() as s:
        user = s.get(User, user_id)
        if user is None or user.status == "provisioning":
            raise NotFound(f"user {user_id!r} does not exist")
        glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one_or_none()
        agents = list(s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.user_id == user_id)
                                .order_by(WorkspaceAgentDatabase.workspace_id)))
        budget = s.get(UserBudget, user_id)
    parts = [_usage_of(a, period, a.workspace_id) for a in agents]
    global_part = _usage_of(glob, period, None) if glob is not None else None
    total = sum(p.cost_cents for p in parts) + (global_part.cost_cents if global_part else 0)
    budget_cents = budget.budget_cents if budget is not None else default_budget_cents
    return UsageReport(
        user_id=user_id, period_start=period, budget_cents=budget_cents, total_cost_cents=total,
        percent_of_budget=round(100 * total / budget_cents, 2) if budget_cents else None,
        status=budget_status(total, budget_cents, warning_percent),
        read_only=bool(budget and budget.enforced), global_database=global_part, agent_databases=parts)


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
        budget = s.get(UserBudget, user_id, with_for_update=True)
        if budget is None:
            budget = UserBudget(user_id=user_id, period_start=period, total_cost_cents=0, exceeded=False,
                                enforced=False)
            s.add(budget)
        budget.budget_cents = budget_cents
        budget.exceeded = budget_cents is not None and budget.total_cost_cents >= budget_cents
        want, have = budget.exceeded, budget.enforced
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
    if budget is not None and (budget.exceeded or budget.enforced):
        return (f"budget exceeded: this user's databases cost {budget.total_cost_cents} cents this period, "
                f"over the budget of {budget.budget_cents} cents, so they are read-only until the budget is "
                "raised or the next period starts; reads still work")
    return None
