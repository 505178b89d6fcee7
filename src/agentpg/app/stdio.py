"""The stdio transports, assembled: ``agentpg mcp`` (agentpg's tools) and ``agentpg mcp --server NAME`` (the
gateway). The service's tenant access is opened on the loop that serves and closed after it."""

from __future__ import annotations

import importlib.util
from typing import Any

import anyio

from agentpg.gateway.stdio import serve_gateway_stdio
from agentpg.mcp.server import build_server
from agentpg.mcp.stdio import serve_stdio
from agentpg.service import Service, TenantAccess


def loop_options() -> dict[str, Any]:
    """uvloop when installed: its cheaper wake-ups give ~8 % more stdio calls/s in
    bench/mcp_vs_server_postgres.py. ``serve`` gets it from uvicorn, which picks uvloop by itself."""
    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


async def _serve(service: Service, token: str, server: str | None) -> None:
    access = TenantAccess.from_settings(service.settings, service.reaper)
    service.attach_tenant(access)
    try:
        if server is None:
            await serve_stdio(service, token)
        else:
            await serve_gateway_stdio(service, token, server, build_server)
    finally:
        service.attach_tenant(None)
        await access.close()


def run_stdio(service: Service, token: str, server: str | None) -> None:
    """Serve on stdin/stdout until EOF (raises what the transports raise before serving)."""
    anyio.run(_serve, service, token, server, backend_options=loop_options())
