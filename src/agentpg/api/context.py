"""What the routes reach: the service and the REST side's metrics, set by the assembly's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from agentpg.api.metrics import ApiMetrics
from agentpg.service import NotStarted, Service
from agentpg.settings import Settings


@dataclass(frozen=True)
class AppContext:
    service: Service
    metrics: ApiMetrics

    @property
    def settings(self) -> Settings:
        return self.service.settings


def app_context(request: Request) -> AppContext:
    ctx = getattr(request.app.state, "agentpg", None)
    if not isinstance(ctx, AppContext):  # the lifespan has not run (or failed): nothing to serve yet
        raise NotStarted("agentpg is starting; retry in a moment")
    return ctx


async def _app_context(request: Request) -> AppContext:
    """:func:`app_context` as the routes' dependency. Async because it does no I/O: FastAPI runs a sync
    dependency in its thread pool, a thread hop (~0.1-0.3 ms) on every request for an attribute read."""
    return app_context(request)


Ctx = Annotated[AppContext, Depends(_app_context)]
