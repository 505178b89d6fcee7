"""``/mcp/servers/{name}`` on the ``agentpg serve`` app: the gateway over streamable HTTP.

The same checks as ``/mcp`` (:mod:`agentpg.mcp.http`): Host/Origin (421/403), an agent token (401/403),
then the name must be one of the agent's user's configs or a built-in default (404 otherwise: another
user's config is exactly as absent as a missing one). An MCP session is bound to the token *and* the server
name that opened it (another token, or the same session id on another name, gets 404).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import TenantQueries
from agentpg.errors import Unauthenticated
from agentpg.gateway.proxy import Gateway, build_gateway_server
from agentpg.mcp.http import _json, admit_agent, security_settings
from agentpg.mcp.server import limits_from
from agentpg.service import Service
from agentpg.settings import Settings
from agentpg.tokens import Principal

PATH = "/mcp/servers/{name}"
_PRINCIPAL_KEY = "agentpg.gateway.principal"
_NAME_KEY = "agentpg.gateway.server"


async def identify_http(request: Any) -> tuple[Principal, str]:
    scope = request.scope if request is not None else {}
    principal, name = scope.get(_PRINCIPAL_KEY), scope.get(_NAME_KEY)
    if not isinstance(principal, Principal) or not isinstance(name, str):
        raise Unauthenticated("this request carries no agent token")
    return principal, name


class GatewayHttp:
    """:meth:`mount` adds the route; :meth:`run` (in the app's lifespan) serves it and owns the children."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._security = TransportSecurityMiddleware(security_settings(settings))
        self._manager: StreamableHTTPSessionManager | None = None
        self._gateway: Gateway | None = None

    def mount(self, app: Starlette) -> None:
        app.router.routes.append(Route(PATH, endpoint=self, include_in_schema=False))

    @asynccontextmanager
    async def run(self, service: Service, pools: TenantPools | None = None) -> AsyncIterator[Gateway]:
        """Serve the gateway for the block. ``pools`` (the REST and MCP sides', under the connection governor)
        carry agentpg's own tools served here; without them, a private ungoverned set (closed on exit)."""
        own = pools is None
        queries = TenantQueries(pools or TenantPools(PoolLimits(connect_timeout_s=self._settings.connect_timeout_s)),
                                limits_from(self._settings), terminate=service.reaper.terminate)
        gateway = Gateway(service, self._settings, queries)
        manager = StreamableHTTPSessionManager(app=build_gateway_server(gateway, identify_http),
                                               security_settings=security_settings(self._settings),
                                               json_response=True)
        try:
            async with gateway.children.run(), manager.run():
                self._manager, self._gateway = manager, gateway
                try:
                    yield gateway
                finally:
                    self._manager = self._gateway = None
        finally:
            if own:
                await queries.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager, gateway = self._manager, self._gateway
        if manager is None or gateway is None:
            await _json(503, {"error": "starting", "error_description": "agentpg is starting; retry"})(
                scope, receive, send)
            return
        name = str(scope.get("path_params", {}).get("name", ""))
        principal = await admit_agent(scope, receive, send, self._security, gateway.service,
                                      then=lambda p: gateway.target(p, name))  # 404: no config of that name
        if principal is None:
            return
        scope["user"] = AuthenticatedUser(AccessToken(token="", client_id=principal.workspace_id or "",
                                                      subject=f"{principal.token_id}/{name}", scopes=["agent"]))
        scope[_PRINCIPAL_KEY] = principal
        scope[_NAME_KEY] = name
        await manager.handle_request(scope, receive, send)
