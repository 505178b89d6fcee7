"""What the console's pages reach: the service the assembly set on the app (``app.state.service``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from agentpg.service import NotStarted, Service
from agentpg.settings import Settings


@dataclass(frozen=True)
class WebContext:
    service: Service

    @property
    def settings(self) -> Settings:
        return self.service.settings


def web_context(request: Request) -> WebContext:
    """``NotStarted`` (503) until the app's lifespan has attached the service."""
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, Service):
        raise NotStarted("agentpg is starting; retry in a moment")
    return WebContext(service)
