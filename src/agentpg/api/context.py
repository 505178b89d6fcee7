"""What the routes reach: the runtime, the tenant pools and the metrics, built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from agentpg.access.browse import ReadLimits
from agentpg.access.pools import TenantPools
from agentpg.api.background import Background
from agentpg.api.metrics import ApiMetrics
from agentpg.errors import AgentpgError
from agentpg.runtime import Runtime
from agentpg.service import Service


class NotStarted(AgentpgError):
    status = 503
    code = "starting"


@dataclass(frozen=True)
class AppContext:
    runtime: Runtime
    pools: TenantPools
    metrics: ApiMetrics
    read_limits: ReadLimits
    background: Background = field(default_factory=Background)
    """Restores answered 202 go on here (drained in the lifespan before the runtime closes)."""

    @property
    def service(self) -> Service:
        return self.runtime.service


def app_context(request: Request) -> AppContext:
    ctx = getattr(request.app.state, "agentpg", None)
    if not isinstance(ctx, AppContext):  # the lifespan has not run (or failed): nothing to serve yet
        raise NotStarted("agentpg is starting; retry in a moment")
    return ctx


Ctx = Annotated[AppContext, Depends(app_context)]
