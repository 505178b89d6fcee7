"""The FastAPI application factory. The runtime is opened in the lifespan, never at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from agentpg import __version__
from agentpg.runtime import Runtime, open_runtime
from agentpg.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        cm = open_runtime(settings)
        runtime = await run_in_threadpool(cm.__enter__)
        app.state.runtime = runtime
        try:
            yield
        finally:
            await run_in_threadpool(cm.__exit__, None, None, None)

    app = FastAPI(title="agentpg", version=__version__, lifespan=lifespan)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """The catalog and the tenant Postgres answer."""
        runtime: Runtime = request.app.state.runtime
        checks: dict[str, str] = {}
        try:
            await run_in_threadpool(runtime.service.status)
            checks["catalog"] = "ok"
        except Exception:
            checks["catalog"] = "unreachable"
        try:
            await run_in_threadpool(runtime.service.deps.provider.check)
            checks["postgres"] = "ok"
        except Exception:
            checks["postgres"] = "unreachable"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ready else "not ready", **checks}, status_code=200 if ready else 503)

    return app
