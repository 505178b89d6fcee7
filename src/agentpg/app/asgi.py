"""The one ASGI factory: builds the FastAPI app and mounts every edge on it (REST api, the console, MCP at
``/mcp``, the gateway at ``/mcp/servers/{name}``).

This is the only place that knows every edge. Nothing is built at import time: the runtime (catalog, key
ring, provider, service) and the service's tenant access (pools, governor, query runner) are opened in the
lifespan and closed after it; the metrics registry belongs to the app object, so two apps in one process
(tests) never share counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from agentpg import __version__
from agentpg.access.browse import ReadLimits
from agentpg.access.cache import Invalidation
from agentpg.api import routes_agents, routes_data, routes_mcp_servers, routes_undo, routes_usage, routes_users
from agentpg.api.context import AppContext, app_context
from agentpg.api.errors import document_problems, install_error_handlers
from agentpg.api.metrics import ApiMetrics
from agentpg.api.middleware import (
    BodyLimitMiddleware,
    GuardMiddleware,
    MetricsMiddleware,
    SingleQueryValuesMiddleware,
)
from agentpg.api.ratelimit import LimitMiddleware
from agentpg.app.collectors import CpuSharesCollector, GovernorCollector, ReaperCollector, StorageCollector
from agentpg.app.gateway_wiring import gateway_for
from agentpg.app.loop_lag import LoopLag, freeze_startup_heap
from agentpg.app.runtime import open_runtime
from agentpg.mcp.http import McpHttp
from agentpg.mcp.oauth import McpOAuth
from agentpg.service import TenantAccess
from agentpg.settings import Settings
from agentpg.web import router as explorer_router

MAX_BODY_BYTES = 1024 * 1024

_DESCRIPTION = """\
Every user of the platform gets a PostgreSQL **global database**, each of its workspaces (agents) an
**agent database**. This API registers users and workspaces, issues tokens, keeps the user's env vars, and
lets the platform browse tables and rows (read only).

**Auth**: `Authorization: Bearer <token>` with the admin token (everything) or a user token (that user's
routes only; another user's resources answer 404). Agent tokens are for MCP and get 403 here.

**Errors** are RFC 9457 `application/problem+json`: `{type, title, status, detail, code, errors?}`.
"""


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for :func:`create_app` that are about trust, for ``serve`` and the tests alike.

    uvicorn's default believes ``X-Forwarded-For`` from loopback. With no proxy in front, that let any client
    on this machine (a gateway child shares its network) name a new address per request and so get a fresh
    budget from every per-address limit. Proxy headers count only from ``AGENTPG_TRUSTED_PROXIES``."""
    trusted = settings.trusted_proxies
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": ",".join(trusted) if trusted else ""}


def create_app(settings: Settings | None = None, *, read_limits: ReadLimits | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, invalidation: Invalidation | None = None) -> FastAPI:
    """The app ``agentpg serve`` runs. ``invalidation``: share the cache generation with other services of
    this process (tests that change things through another service and expect this app to see it at once)."""
    settings = settings or Settings()
    metrics = ApiMetrics.create()
    limits = read_limits or ReadLimits()
    mcp = McpHttp(settings)
    gateway = gateway_for(settings, mcp)  # /mcp/servers/{name}: user MCP server configs (docs/gateway.md)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cm = open_runtime(settings, invalidation=invalidation)
        runtime = await run_in_threadpool(cm.__enter__)
        # A long-running process keeps the warm pool full and syncs usage; open_runtime stops both.
        runtime.start_background_jobs()
        service = runtime.service
        metrics.registry.register(StorageCollector(service.deps, settings.user_storage_limit_mb))
        # Issue 18: one connection budget per tenant server, shared by the REST, console, MCP and gateway sides.
        access = TenantAccess.from_settings(settings, service.reaper, read_limits=limits)
        if access.governor is not None:
            metrics.registry.register(GovernorCollector(access.governor))
        metrics.registry.register(ReaperCollector(service.reaper))
        if runtime.cpu_shares is not None:
            metrics.registry.register(CpuSharesCollector(runtime.cpu_shares.shares))
        service.attach_tenant(access)
        app.state.service = service  # what every edge reads (each through its own accessor)
        app.state.runtime = runtime  # the assembly's own handle (its background jobs); no edge reads it
        app.state.agentpg = AppContext(service=service, metrics=metrics)
        lag = asyncio.create_task(LoopLag(metrics.registry).run())
        try:
            async with mcp.run(service), gateway.run(service):
                freeze_startup_heap()
                yield
        finally:
            lag.cancel()
            app.state.agentpg = None
            app.state.service = None
            app.state.runtime = None
            await service.background.drain()  # a restore answered 202 finishes before the pools close
            service.attach_tenant(None)
            await access.close()
            await run_in_threadpool(cm.__exit__, None, None, None)

    app = FastAPI(title="agentpg", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)
    # Added innermost first: the body limit runs just outside the routes, the metrics outermost.
    # Rate, concurrency and failed-auth limits (docs/limits.md) just inside the body limit.
    app.add_middleware(LimitMiddleware, settings=settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(SingleQueryValuesMiddleware)
    app.add_middleware(GuardMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(routes_users.router)
    app.include_router(routes_data.router)
    app.include_router(routes_agents.router)
    app.include_router(routes_usage.router)
    app.include_router(routes_mcp_servers.router)
    app.include_router(routes_undo.router)
    app.include_router(explorer_router)  # the database explorer's pages: /, /explorer/…
    mcp.mount(app)
    # OAuth discovery, token, registration, revocation (docs/mcp.md); the consent page is the explorer's.
    McpOAuth(settings, mcp.security, lambda: mcp.service).mount(app)
    gateway.mount(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "Not ready."}})
    async def readyz(request: Request) -> JSONResponse:
        """The catalog and the tenant Postgres answer (503 until they do)."""
        checks: dict[str, str] = {"catalog": "unreachable", "postgres": "unreachable"}
        try:
            ctx = app_context(request)
        except Exception:
            return JSONResponse({"status": "not ready", **checks}, status_code=503)
        try:
            await run_in_threadpool(ctx.service.status)
            checks["catalog"] = "ok"
        except Exception:
            checks["catalog"] = "unreachable"
        try:
            await run_in_threadpool(ctx.service.deps.provider.check)
            checks["postgres"] = "ok"
        except Exception:
            checks["postgres"] = "unreachable"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition."}})
    async def prometheus_metrics() -> Response:
        """Prometheus metrics: requests and latency by route template, provisioning counts and durations."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = document_problems(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
