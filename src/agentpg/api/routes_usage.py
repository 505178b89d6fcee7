"""Costs and budgets: what each of a user's databases cost this period, and the budget that caps them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from agentpg.api.auth import Auth, require_admin
from agentpg.api.context import Ctx
from agentpg.api.errors import problems
from agentpg.service import UsageReport

router = APIRouter(prefix="/api", tags=["usage"])

UserId = Annotated[str, Path(description="The platform's id for the user.", max_length=128)]


class BudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budget_cents: int | None = Field(
        description="The most this user's databases may cost per calendar month (UTC), in cents; null removes "
                    "the budget. Over it, every database of the user turns read-only until it is raised.",
        ge=0, le=10**12, strict=True)


@router.get("/users/{user_id}/usage", responses=problems(404))
def usage(user_id: UserId, principal: Auth, ctx: Ctx) -> UsageReport:
    """This period's cost of the global database, of each agent database and of backup storage (``backups``:
    the databases' shares of their servers' base backups and WAL), their total, and the budget.

    Figures are as of the last usage sync (``last_sync`` on each database); the total is the sum of the parts.
    """
    return ctx.service.caller(principal).usage(user_id)


@router.put("/users/{user_id}/budget", responses=problems(404, 422, 502, 503))
def set_budget(user_id: UserId, body: BudgetBody, principal: Auth, ctx: Ctx) -> UsageReport:
    """Set the user's budget (admin only). It is enforced at once against the last synced total: lowering it
    below the spend makes the databases read-only now, raising it restores writes now."""
    require_admin(principal, "setting a budget")
    return ctx.service.set_budget(user_id, body.budget_cents)
