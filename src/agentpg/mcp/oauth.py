"""The OAuth side of ``/mcp`` (MCP spec 2025-06-18 onwards, "Authorization"): discovery, the authorization
server's token, registration and revocation endpoints, and the bearer check of OAuth access tokens.

Routes (all answer JSON; ``<base>`` is ``AGENTPG_PUBLIC_URL``, else the URL the request came in on):

* ``GET /.well-known/oauth-protected-resource`` and ``…/oauth-protected-resource/mcp`` - RFC 9728 metadata
  of the resource ``<base>/mcp`` (the MCP SDK's model), naming ``<base>/`` as its authorization server;
* ``GET /.well-known/oauth-authorization-server`` - RFC 8414 metadata;
* ``POST /oauth/token`` (form), ``POST /oauth/register`` (JSON, RFC 7591), ``POST /oauth/revoke`` (form,
  RFC 7009). Errors are RFC 6749 §5.2 JSON (``{"error", "error_description"}``), never a 500 for bad input.

The authorization endpoint, ``/oauth/authorize``, is the explorer's consent page (:mod:`agentpg.web.oauth`):
it needs the browser's sign-in. Both call :class:`agentpg.service.oauth.service.OAuthService` through the service.

On ``/mcp``, :class:`OAuthDoor` accepts an OAuth access token (a JWT) beside agent tokens: it must be signed
here, unexpired, issued by ``<base>/`` for the audience ``<base>/mcp`` (a token for another resource is a
401), and its grant live (not revoked, workspace not deleted). It then acts as the workspace's agent. A
``tools/call`` needs the scope of its tool (:func:`agentpg.service.oauth.server.scope_for`), else 403
``insufficient_scope`` naming it, so a client can ask the user for more (step-up). The 401 names the
metadata (``WWW-Authenticate: Bearer resource_metadata="…"``), with ``error="invalid_token"`` only when a
token was presented (RFC 6750 §3.1).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from mcp.server.transport_security import TransportSecurityMiddleware
from mcp.shared.auth import ProtectedResourceMetadata
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from agentpg.errors import AgentpgError, Unauthenticated
from agentpg.service import Service
from agentpg.service.oauth.models import SCOPES, scope_for
from agentpg.service.oauth.service import REGISTER_PATH, REVOKE_PATH, TOKEN_PATH, Access, Answer, HttpRequest
from agentpg.settings import Settings

PRM_PATH = "/.well-known/oauth-protected-resource"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"
MAX_FORM_BYTES = 64 * 1024
GRANTED_SCOPES = "agentpg.oauth_scopes"
"""The ASGI scope key under which the door leaves an OAuth token's scopes (absent for agent tokens)."""
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def base_of(settings: Settings, scope: Scope) -> str:
    """``scheme://host[:port]`` of this service as the client reaches it: the public URL, else the request's
    (whose Host the transport security check has allowed)."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return str(HTTPConnection(scope).base_url).rstrip("/")


def _oauth_json(status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body) if body is not None else b"", status_code=status,
                    media_type="application/json" if body is not None else None,
                    headers={**_NO_STORE, **(headers or {})})


def _oauth_error(status: int, error: str, description: str) -> Response:
    return _oauth_json(status, {"error": error, "error_description": description})


def _answer(answer: Answer) -> Response:
    headers = {k: v for k, v in answer.headers if k.lower() not in ("content-type", "cache-control", "pragma")}
    return _oauth_json(answer.status, answer.body, headers)


def _quote(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")


class OAuthDoor:
    """The bearer check of OAuth access tokens on ``/mcp``, and the challenges it answers with."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def metadata_url(self, scope: Scope) -> str:
        return base_of(self._settings, scope) + PRM_PATH + "/mcp"

    def challenge(self, scope: Scope, *, presented: bool, description: str = "") -> str:
        """The 401's ``WWW-Authenticate``: where the metadata is, which scopes to ask for, and, only when a
        token was presented, ``error="invalid_token"``."""
        parts = []
        if presented:
            parts += ['error="invalid_token"', f'error_description="{_quote(description)}"']
        parts += [f'scope="{" ".join(SCOPES)}"', f'resource_metadata="{self.metadata_url(scope)}"']
        return "Bearer " + ", ".join(parts)

    async def access(self, service: Service, scope: Scope, header: str | None) -> Access | None:
        """The OAuth access token's agent (its scopes left in ``scope[GRANTED_SCOPES]``), or None when the
        header holds no OAuth token (an agent token, or nothing: the caller checks those). A JWT that is not
        valid here raises ``Unauthenticated``."""
        kind, _, token = (header or "").partition(" ")
        token = token.strip()
        if kind.lower() != "bearer" or not (token.startswith("eyJ") and token.count(".") == 2):
            return None
        base = base_of(self._settings, scope)
        found = service.oauth.access_cached(token, base)
        if found is None:
            found = await run_in_threadpool(service.oauth.access, token, base)
        if found is None:
            raise Unauthenticated("the access token is not valid here: expired, revoked, or issued for another "
                                  "resource")
        scope[GRANTED_SCOPES] = found.scopes
        return found

    def refusal(self, body: bytes, scope: Scope) -> Response | None:
        """403 ``insufficient_scope`` if this JSON-RPC message needs a scope the token lacks, else None."""
        granted = scope.get(GRANTED_SCOPES)
        if granted is None:
            return None  # an agent token: every right of its workspace's agent
        try:
            message = json.loads(body)
            params = message.get("params") if isinstance(message, dict) else None
            tool = params.get("name") if message.get("method") == "tools/call" and isinstance(params, dict) else None
        except (ValueError, AttributeError):
            return None  # well_formed has answered malformed bodies already
        needed = scope_for(tool if isinstance(tool, str) else None)
        if needed in granted:
            return None
        description = (f"this token lacks the scope {needed}" + (f" that the tool {tool} needs" if tool else "")
                       + "; authorize again asking for it")
        header = (f'Bearer error="insufficient_scope", scope="{needed}", error_description="{_quote(description)}", '
                  f'resource_metadata="{self.metadata_url(scope)}"')
        return _oauth_json(403, {"error": "insufficient_scope", "error_description": description},
                           {"WWW-Authenticate": header})


class McpOAuth:
    """The discovery and authorization-server routes; :meth:`mount` adds them to the app."""

    def __init__(self, settings: Settings, security: TransportSecurityMiddleware,
                 service_of: Callable[[], Service | None]) -> None:
        self._settings = settings
        self._security = security
        self._service_of = service_of

    def mount(self, app: Starlette) -> None:
        routes = [Route(PRM_PATH, self.protected_resource, methods=["GET"]),
                  Route(PRM_PATH + "/mcp", self.protected_resource, methods=["GET"]),
                  Route(AS_METADATA_PATH, self.server_metadata, methods=["GET"]),
                  Route(TOKEN_PATH, self.token, methods=["POST"]),
                  Route(REGISTER_PATH, self.register, methods=["POST"]),
                  Route(REVOKE_PATH, self.revoke, methods=["POST"])]
        for route in routes:
            app.router.routes.insert(1, route)  # after /mcp, before the REST routes

    async def _admitted(self, request: Request) -> Response | None:
        """Host and Origin must be allowed, as on /mcp (the issuer is derived from the Host)."""
        refusal: Response | None = await self._security.validate_request(request, is_post=False)
        return refusal

    async def _ready(self, request: Request) -> Service | Response:
        """The service, once the request passed :meth:`_admitted`; else the answer to send (a refusal, or
        503 while agentpg is starting)."""
        refusal = await self._admitted(request)
        if refusal is not None:
            return refusal
        service = self._service_of()
        if service is None:
            return _oauth_error(503, "temporarily_unavailable", "agentpg is starting; retry")
        return service

    async def protected_resource(self, request: Request) -> Response:
        refusal = await self._admitted(request)
        if refusal is not None:
            return refusal
        base = base_of(self._settings, request.scope)
        metadata = ProtectedResourceMetadata(
            resource=AnyHttpUrl(base + "/mcp"), authorization_servers=[AnyHttpUrl(base + "/")],
            scopes_supported=list(SCOPES), bearer_methods_supported=["header"], resource_name="agentpg")
        return Response(metadata.model_dump_json(exclude_none=True), media_type="application/json",
                        headers={"Cache-Control": "public, max-age=3600"})

    async def server_metadata(self, request: Request) -> Response:
        service = await self._ready(request)
        if isinstance(service, Response):
            return service
        return Response(json.dumps(service.oauth.metadata(base_of(self._settings, request.scope))),
                        media_type="application/json", headers={"Cache-Control": "public, max-age=3600"})

    async def token(self, request: Request) -> Response:
        return await self._endpoint(request, "token", form=True)

    async def register(self, request: Request) -> Response:
        return await self._endpoint(request, "register", form=False)

    async def revoke(self, request: Request) -> Response:
        return await self._endpoint(request, "revoke", form=True)

    async def _endpoint(self, request: Request, name: str, *, form: bool) -> Response:
        service = await self._ready(request)
        if isinstance(service, Response):
            return service
        bad = "invalid_request" if form else "invalid_client_metadata"
        try:
            http = await self._read(request, form=form)
        except ValueError as exc:
            return _oauth_error(400, bad, str(exc))
        call = {"token": service.oauth.token, "register": service.oauth.register,
                "revoke": service.oauth.revoke}[name]
        try:
            answer = await run_in_threadpool(call, http)
        except AgentpgError as exc:
            return _oauth_error(exc.status if exc.status < 500 else 503, bad if exc.status < 500 else "server_error",
                                exc.message)
        except ValueError:  # e.g. a description Authlib refuses to echo: the request is what was wrong
            return _oauth_error(400, bad, "the request could not be understood")
        if answer.status == 200 and name == "revoke" and answer.body is None:
            return _oauth_json(200, {})
        return _answer(answer)

    async def _read(self, request: Request, *, form: bool) -> HttpRequest:
        """The request in :class:`HttpRequest` form; ``ValueError`` (with a message for the client) if its
        body is not one form (each field once) or one JSON object, or is too large."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            raise ValueError(f"the body is larger than {MAX_FORM_BYTES // 1024} KiB")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        values: dict[str, list[str]] = {}
        document: dict[str, Any] | None = None
        if form:
            if kind != "application/x-www-form-urlencoded":
                raise ValueError("send the parameters as application/x-www-form-urlencoded")
            try:
                values = parse_qs(body.decode("utf-8"), keep_blank_values=False, strict_parsing=False,
                                  errors="strict", max_num_fields=50)
            except (UnicodeDecodeError, ValueError):
                raise ValueError("the form could not be read (not UTF-8, or too many fields)") from None
            repeated = sorted(k for k, v in values.items() if len(v) > 1)
            if repeated:
                raise ValueError(f"the parameter {repeated[0]} is given more than once")
            if any("\x00" in v for vs in values.values() for v in vs):
                raise ValueError("a parameter contains a NUL character")
        else:
            if kind != "application/json":
                raise ValueError("send the client metadata as application/json")
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):
                raise ValueError("the body is not JSON") from None
            if not isinstance(parsed, dict):
                raise ValueError("the client metadata must be a JSON object")
            document = parsed
        return HttpRequest(method=request.method, path=request.url.path,
                           base=base_of(self._settings, request.scope), headers=request.headers,
                           query={}, form=values, json=document)
