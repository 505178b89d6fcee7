"""Streamable HTTP at ``/mcp`` on the ``agentpg serve`` app: DNS-rebinding checks, agent-token auth, the SDK.

Each request to ``/mcp``, in order:

1. **Host and Origin** must be allowed (MCP spec, "Security Warning": servers must validate Origin against
   DNS rebinding). Allowed: loopback names (``127.0.0.1``, ``localhost``, ``[::1]``, any port), the host of
   ``AGENTPG_PUBLIC_URL``, and ``AGENTPG_MCP_ALLOWED_HOSTS`` / ``AGENTPG_MCP_ALLOWED_ORIGINS``. A request
   without Origin (any non-browser client) passes the Origin check. Refusals: 421 (Host), 403 (Origin).
2. **Bearer token**: an agent token, or an OAuth access token of a workspace (:mod:`agentpg.mcp.oauth`: it
   acts as that workspace's agent, and a ``tools/call`` needs its tool's scope, else 403
   ``insufficient_scope``); none or unknown/revoked → 401 with ``WWW-Authenticate: Bearer`` naming the
   protected-resource metadata; a valid admin or user token → 403 (agents only). The token is checked on
   every request; a success is remembered for 2 s (:mod:`agentpg.access.cache`), so a revocation through
   this process takes effect at once, one made elsewhere (the CLI, another instance) within 2 s.
3. **One well-formed JSON-RPC message** per POST (:mod:`agentpg.mcp.envelope`): a batch, an id that is not a
   string or an integer, ... get 400 with the JSON-RPC error in plain words (the SDK would take an object id
   for a notification and answer 202, or quote its validation library).
4. The SDK's ``StreamableHTTPSessionManager``, **stateless**, serves both protocol eras on this one path:
   a request with ``MCP-Protocol-Version: 2026-07-28`` (and the per-request ``_meta`` envelope) is one
   self-contained exchange (``server/discover``, ``tools/list``, ``tools/call``; ``initialize`` and ``ping``
   are -32601 there); no header or a 2025-era version is the handshake era, where ``initialize`` works but
   is not required first (a stateless connection starts ready). No ``Mcp-Session-Id`` is issued: the bearer
   token identifies the caller on every request, so any ``serve`` instance answers any request. Answers
   are plain JSON in both eras; a client that disconnects before its answer cancels the call (and the
   statement in Postgres): :func:`answer_unless_gone`.

Nothing is built at import time: :class:`McpHttp` is created by the app factory and started in its lifespan.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
from mcp import types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from agentpg.errors import AgentpgError, PermissionDenied, Unauthenticated
from agentpg.mcp import envelope
from agentpg.mcp.oauth import GRANTED_SCOPES, OAuthDoor
from agentpg.mcp.server import build_server
from agentpg.service import Principal, Service
from agentpg.settings import Settings

PATH = "/mcp"
_PRINCIPAL_KEY = "agentpg.principal"
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
MAX_BODY = 4 * 2**20
"""The largest POST body /mcp takes (the SDK answers 413 above it)."""


#: A Host header as HTTP allows it: a name or an IP literal, and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
                   r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class HostAndOriginCheck(TransportSecurityMiddleware):
    """The SDK's Host and Origin check (DNS rebinding), after one of our own: the Host must be well formed.

    The SDK matches an allowed ``name:*`` by prefix, so ``Host: localhost:1@evil.example`` passed, and where no
    public URL is set the OAuth metadata names its issuer and endpoints from the Host: a client reading them
    (or a cache keeping them) would be sent to another site."""

    async def validate_request(self, request: Request, is_post: bool = False) -> Response | None:
        host = request.headers.get("host")
        if host is not None and not _HOST.fullmatch(host):
            return Response("Invalid Host header", status_code=421)
        return await super().validate_request(request, is_post=is_post)


def security_settings(settings: Settings) -> TransportSecuritySettings:
    """Allowed Host and Origin values: loopback, the public URL's, and the configured allow-lists."""
    hosts = [h for name in _LOOPBACK for h in (name, f"{name}:*")]
    origins = [f"{scheme}://{name}{port}" for scheme in ("http", "https") for name in _LOOPBACK
               for port in ("", ":*")]
    if settings.public_url:
        public = urlsplit(settings.public_url)
        if public.netloc:
            hosts.append(public.netloc)
            origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(enable_dns_rebinding_protection=True,
                                     allowed_hosts=hosts + list(settings.mcp_allowed_hosts),
                                     allowed_origins=origins + list(settings.mcp_allowed_origins))


async def principal_of(request: Any) -> Principal:
    """The agent the bearer check (below) found for this HTTP request."""
    principal = request.scope.get(_PRINCIPAL_KEY) if request is not None else None
    if not isinstance(principal, Principal):
        raise Unauthenticated("this request carries no agent token")
    return principal


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


class McpHttp:
    """``/mcp`` on one app: :meth:`mount` adds the route, :meth:`run` (in the app's lifespan) serves it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._security = HostAndOriginCheck(security_settings(settings))
        self.security = self._security
        self.door = OAuthDoor(settings)
        """OAuth access tokens beside agent tokens (:mod:`agentpg.mcp.oauth`)."""
        self._manager: StreamableHTTPSessionManager | None = None
        self._service: Service | None = None

    def mount(self, app: Starlette) -> None:
        """Route ``/mcp`` (exactly; no redirect to ``/mcp/``) to this endpoint; it answers 503 until running.
        First in the route list: the agents' hot path should not be matched against every REST route."""
        app.router.routes.insert(0, Route(PATH, endpoint=self, include_in_schema=False))  # ASGI app: all methods

    @property
    def service(self) -> Service | None:
        """The service while :meth:`run` runs (the OAuth routes use it), else None."""
        return self._service

    @asynccontextmanager
    async def run(self, service: Service) -> AsyncIterator[None]:
        """Serve MCP for the duration of the block, through the service's tenant access (attached by the
        assembly before, closed by it after)."""
        # JSON answers in both eras; a disconnect still cancels the call (answer_unless_gone).
        manager = StreamableHTTPSessionManager(app=build_server(service, principal_of),
                                               security_settings=security_settings(self._settings),
                                               json_response=True, stateless=True,
                                               max_request_body_size=MAX_BODY)
        try:
            async with manager.run():
                self._manager, self._service = manager, service
                try:
                    yield
                finally:
                    self._manager = self._service = None
        finally:
            await run_in_threadpool(service.audit_writer.close)  # write-behind: nothing queued is lost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        manager, service = self._manager, self._service
        if manager is None or service is None:
            await _json(503, {"error": "starting", "error_description": "agentpg is starting; retry"})(
                scope, receive, send)
            return
        principal = await admit_agent(scope, receive, send, self._security, service, door=self.door)
        if principal is None:
            return
        granted = scope.get(GRANTED_SCOPES)  # an OAuth token's scopes; None: an agent token (every right)
        scope["user"] = AuthenticatedUser(AccessToken(token="", client_id=principal.workspace_id or "",
                                                      subject=principal.token_id,
                                                      scopes=sorted(granted) if granted is not None else ["agent"]))
        scope[_PRINCIPAL_KEY] = principal
        if scope["method"] != "POST":
            await manager.handle_request(scope, receive, send)
            return
        body = await well_formed(scope, receive, send)
        if body is not None and granted is not None and (refusal := self.door.refusal(body, scope)) is not None:
            await refusal(scope, receive, send)  # 403 insufficient_scope: the tool needs a scope not granted
            return
        if body is not None:
            await answer_unless_gone(manager, body, scope, receive, send)


async def well_formed(scope: Scope, receive: Receive, send: Send) -> bytes | None:
    """A POST's body if it is one well-formed JSON-RPC message; else None, having answered 400 with the
    JSON-RPC error (413 past :data:`MAX_BODY`; nothing if the client went away mid-body)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_BODY:  # the app's own body limit is lower: this only guards a bare mount
            await _json(413, {"error": "content_too_large"})(scope, receive, send)
            return None
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        problem: envelope.Problem | None = envelope.Problem(None, types.PARSE_ERROR, envelope.NOT_JSON)
    else:
        problem = envelope.problem(parsed)
        if problem is None and parsed.get("method") == "tools/call":
            problem = envelope.call_problem(parsed)
    if problem is None:
        return body
    await _json(400, problem.response())(scope, receive, send)
    return None


async def answer_unless_gone(manager: StreamableHTTPSessionManager, body: bytes, scope: Scope, receive: Receive,
                             send: Send) -> None:
    """The SDK's answer to the POST whose ``body`` was read; if the client disconnects before the answer is
    sent, the handling is cancelled (the tool call and its statement with it), in either era.

    Why here, not the SDK's SSE mode (which cancels on a disconnect too): the SDK's client refuses an SSE
    event over 1 MiB by default, and a result may be larger (up to the 1 MB row cap, as structured content
    and as text); in JSON mode the SDK watches for no disconnect. With the body read, ``receive`` returns
    only when the client goes away (or the response is complete).

    The watcher is a plain asyncio task (the server runs the app on asyncio) cancelled when the answer is
    out, and only the handling sits in a cancel scope: an anyio task group per request, whose cancel formats
    the current task's repr, cost ~90 us of CPU per call against ~20 us for this (measured for issue 20)."""
    answered = False
    gone = anyio.Event()

    async def tracked(message: Message) -> None:
        nonlocal answered
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            answered = True
        await send(message)

    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    handling = anyio.CancelScope()

    async def watch() -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # nothing to watch with: the call runs to its end (no task error left unread)
            return
        gone.set()
        if not answered:
            handling.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        with handling:
            await manager.handle_request(scope, replay, tracked)
    finally:
        watcher.cancel()


async def admit_agent(scope: Scope, receive: Receive, send: Send, security: TransportSecurityMiddleware,
                      service: Service,
                      then: Callable[[Principal], Awaitable[object]] | None = None, *,
                      door: OAuthDoor | None = None) -> Principal | None:
    """The door of every agent-facing HTTP endpoint (/mcp and the gateway's): Host/Origin check, then the
    agent token (or, with ``door``, an OAuth access token), then ``then`` (a further check, e.g. that a named
    server exists). Returns the principal, or sends the refusal (421/403/401/403/4xx) and returns ``None``."""
    refusal = await security.validate_request(Request(scope), is_post=False)
    if refusal is not None:
        await refusal(scope, receive, send)
        return None
    header = HTTPConnection(scope).headers.get("authorization")
    try:
        access = await door.access(service, scope, header) if door is not None else None
        principal = access.principal if access is not None else await authenticate_agent(service, header)
        if then is not None:
            await then(principal)
    except Unauthenticated as exc:
        challenge = (door.challenge(scope, presented=bool(header), description=exc.message) if door is not None
                     else 'Bearer error="invalid_token"')
        await _json(401, {"error": "invalid_token", "error_description": exc.message},
                    {"WWW-Authenticate": challenge})(scope, receive, send)
        return None
    except PermissionDenied as exc:
        await _json(403, {"error": "insufficient_scope", "error_description": exc.message},
                    {"WWW-Authenticate": 'Bearer error="insufficient_scope"'})(scope, receive, send)
        return None
    except AgentpgError as exc:
        await _json(exc.status, {"error": exc.code, "error_description": exc.message})(scope, receive, send)
        return None
    return principal


async def authenticate_agent(service: Service, header: str | None) -> Principal:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send this workspace's agent token as 'Authorization: Bearer <token>'")
    principal = service.tokens.cached(token.strip())  # authenticated < 2 s ago: no catalog round trip
    if principal is None:
        principal = await run_in_threadpool(service.tokens.authenticate, token.strip())
    if principal.kind != "agent":
        raise PermissionDenied("/mcp is for agent tokens (one workspace's); admin and user tokens use the "
                               "REST API")
    return principal
