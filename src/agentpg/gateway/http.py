"""``/mcp/servers/{name}`` on the ``agentpg serve`` app: the gateway over streamable HTTP.

The same checks as ``/mcp`` (:mod:`agentpg.mcp.http`): Host/Origin (421/403), an agent token (401/403),
then the name must be one of the agent's user's configs or a built-in default (404 otherwise: another
user's config is exactly as absent as a missing one). Stateless, as ``/mcp`` is: every request names its
child by its token and the path, so no ``Mcp-Session-Id`` is issued and there is no table of sessions. A
stateful manager kept up to 10,000 sessions for all users together, each for 30 minutes idle: one user's
agents could fill it and lock every other user out of the gateway. And any ``serve`` instance answers any
request. The children themselves (one per workspace and server) live on in :mod:`agentpg.gateway.children`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from agentpg.errors import Unauthenticated
from agentpg.gateway.proxy import Gateway, ToolsServer, build_gateway_server
from agentpg.service import Principal, Service
from agentpg.settings import Settings

Admit = Callable[[Scope, Receive, Send, TransportSecurityMiddleware, Service,
                  Callable[[Principal], Awaitable[object]]], Awaitable[Principal | None]]
"""The agent door of ``/mcp`` (Host/Origin, token, a further check; sends the refusal itself), given by the
assembly so both agent-facing endpoints refuse alike."""

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

    def __init__(self, settings: Settings, *, tools_server: ToolsServer, admit: Admit,
                 security: TransportSecurityMiddleware) -> None:
        self._settings = settings
        self._tools_server = tools_server
        self._admit = admit
        self._security_settings = security.settings
        self._security = security
        self._manager: StreamableHTTPSessionManager | None = None
        self._gateway: Gateway | None = None

    def mount(self, app: Starlette) -> None:
        app.router.routes.append(Route(PATH, endpoint=self, include_in_schema=False))

    @asynccontextmanager
    async def run(self, service: Service) -> AsyncIterator[Gateway]:
        """Serve the gateway for the block. agentpg's own tools served here run through the service's tenant
        access (the REST and MCP sides' pools, under the connection governor)."""
        gateway = Gateway(service, self._settings, self._tools_server)
        manager = StreamableHTTPSessionManager(app=build_gateway_server(gateway, identify_http),
                                               security_settings=self._security_settings, json_response=True,
                                               stateless=True)
        async with gateway.children.run(), manager.run():
            self._manager, self._gateway = manager, gateway
            try:
                yield gateway
            finally:
                self._manager = self._gateway = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager, gateway = self._manager, self._gateway
        if manager is None or gateway is None:
            await _json(503, {"error": "starting", "error_description": "agentpg is starting; retry"})(
                scope, receive, send)
            return
        name = str(scope.get("path_params", {}).get("name", ""))
        principal = await self._admit(scope, receive, send, self._security, gateway.service,
                                      lambda p: gateway.target(p, name))  # 404: no config of that name
        if principal is None:
            return
        scope["user"] = AuthenticatedUser(AccessToken(token="", client_id=principal.workspace_id or "",
                                                      subject=f"{principal.token_id}/{name}", scopes=["agent"]))
        scope[_PRINCIPAL_KEY] = principal
        scope[_NAME_KEY] = name
        await manager.handle_request(scope, receive, send)


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")
