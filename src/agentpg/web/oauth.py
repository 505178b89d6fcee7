"""The OAuth authorization endpoint, ``/oauth/authorize``: the consent page, signed in through the explorer.

A desktop MCP client sends the user's browser here (the rest of the authorization server is in
:mod:`agentpg.mcp.oauth`; both call ``Service.oauth``). In order:

1. The request is checked first (client, redirect URI, PKCE S256, scope, RFC 8707 ``resource``). One it
   cannot be told about (unknown client, unregistered redirect URI) is an error page here (RFC 6749
   §4.1.2.1). One it can is redirected back with the error only when the redirect URI is a loopback one (a
   native app on this machine, RFC 8252 §7.3); any other gets the error page too. Registration is open, so
   a registered ``https://`` URI proves nothing, and bouncing an unsigned-in browser there would make
   agentpg's own address an open redirector (RFC 9700 §4.11.2).
2. Without a valid explorer session, the browser goes to the sign-in page, which returns here afterwards
   (``next``, accepted only for this path: :func:`safe_next`). The admin token cannot consent (it owns no
   workspace): sign in with the user's token.
3. The page names the client, where the browser goes back to, and the scopes, and lets the user pick ONE of
   their workspaces. Its form carries a sealed ticket bound to this session and this exact request; the POST
   must also pass the explorer's same-origin check (CSRF), and the page cannot be framed.
4. Allow: the client gets a code (and later tokens acting as that workspace's agent); Deny: ``access_denied``.

The consent page's Content-Security-Policy also lets its form lead to the client's redirect URI (browsers
apply ``form-action`` to the redirect that follows the POST).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agentpg.errors import AgentpgError, InvalidInput, PermissionDenied
from agentpg.service import Principal
from agentpg.service.oauth.service import AUTHORIZE_PATH, Answer, HttpRequest
from agentpg.web.context import WebContext, web_context
from agentpg.web.render import render
from agentpg.web.routing import PageRoute
from agentpg.web.security import COOKIE, CSP, CrossOrigin, check_same_origin, field, read_form, session_principal

router = APIRouter(route_class=PageRoute, include_in_schema=False)

MAX_NEXT: Final = 4000
_HOST: Final = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.\-]{0,40}")


def safe_next(value: str | None) -> str | None:
    """``value`` if it is a path of the authorization endpoint (the only place sign-in returns to), else None:
    never another site, never a scheme-relative or backslashed URL (open redirects)."""
    if not value or len(value) > MAX_NEXT or not value.startswith(AUTHORIZE_PATH + "?"):
        return None
    if "\\" in value or any(ord(c) < 0x21 for c in value):
        return None
    return value


def _http(request: Request, ctx: WebContext) -> HttpRequest:
    try:
        query = parse_qs(request.url.query, keep_blank_values=True, strict_parsing=False, errors="strict",
                         max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the authorization request's parameters could not be read") from None
    public = ctx.settings.public_url
    base = public.rstrip("/") if public else str(request.base_url).rstrip("/")
    return HttpRequest(method=request.method, path=request.url.path, base=base, headers=request.headers,
                       query=query)


def _here(request: Request) -> str:
    return f"{AUTHORIZE_PATH}?{request.url.query}"


def _to_client(answer: Answer, status: int) -> Response:
    location = answer.location
    if location is None:  # not expected: Authlib answers the authorization endpoint with redirects
        raise InvalidInput("the authorization request could not be answered")
    return RedirectResponse(location, status_code=status)


def _refused(answer: Answer) -> Response:
    """A request refused before the user decided anything: back to a loopback client with the error (it is
    waiting on this machine), else an error page here (see the module docstring: never an open redirect)."""
    location = answer.location or ""
    parts = urlsplit(location)
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return _to_client(answer, 302)
    query = parse_qs(parts.query)
    error = query.get("error", ["invalid_request"])[0][:100]
    description = query.get("error_description", [""])[0][:300]
    raise InvalidInput(f"The MCP client's authorization request was refused ({error}"
                       f"{': ' + description if description else ''}). Go back to the client and connect again; "
                       "if this repeats, the client asks for something agentpg does not offer.")


_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def _signed_in(request: Request, ctx: WebContext) -> Principal | None:
    if not request.cookies.get(COOKIE):
        return None
    try:
        return session_principal(request, ctx)
    except AgentpgError:
        return None


def _user(principal: Principal) -> str:
    if principal.is_admin or principal.user_id is None:
        raise PermissionDenied("The admin token owns no workspace, so it cannot connect a client: sign out, and "
                               "sign in with the token of the user whose workspace the client should use.")
    return principal.user_id


def _form_target(redirect_to: str) -> str:
    """The CSP source of the redirect URI (its origin, or an app scheme's ``name:``); '' for anything that
    is not plainly one (nothing a client registered can add a directive to the header)."""
    parts = urlsplit(redirect_to)
    if parts.scheme in ("http", "https") and _HOST.fullmatch(parts.netloc):
        return f"{parts.scheme}://{parts.netloc}"
    return f"{parts.scheme}:" if _SCHEME.fullmatch(parts.scheme) and parts.scheme not in ("http", "https") else ""


def _consent_page(request: Request, ctx: WebContext, principal: Principal, http: HttpRequest, *,
                  error: str | None = None, status: int = 200) -> Response:
    view = ctx.service.oauth.check_authorization(http)
    if isinstance(view, Answer):
        return _refused(view)
    user_id = _user(principal)
    page = ctx.service.list_workspaces(user_id, limit=100)
    workspaces = [w for w in page.items if w.status == "active"]
    request.state.explorer_principal = principal
    response = render(request, "oauth_consent.html", status=status, title="Connect an MCP client", view=view,
                      workspaces=workspaces, ticket=ctx.service.oauth.consent_ticket(principal, http),
                      action=_here(request), error=error)
    target = _form_target(view.redirect_to)
    if target:
        response.headers["Content-Security-Policy"] = CSP.replace("form-action 'self'",
                                                                  f"form-action 'self' {target}")
    return response


@router.get(AUTHORIZE_PATH)
def authorize_page(request: Request) -> Response:
    """The consent page (or the client's redirect with an error, or the sign-in page)."""
    ctx = web_context(request)
    http = _http(request, ctx)
    principal = _signed_in(request, ctx)
    if principal is None:
        checked = ctx.service.oauth.check_authorization(http)  # a bad request is answered before sign-in
        if isinstance(checked, Answer):
            return _refused(checked)
        return RedirectResponse(f"/?reason=signin&next={quote(_here(request), safe='')}", status_code=303)
    return _consent_page(request, ctx, principal, http)


@router.post(AUTHORIZE_PATH)
async def authorize_decision(request: Request) -> Response:
    """The user's decision; answers the redirect to the client (303: the browser follows with a GET)."""
    ctx = web_context(request)
    check_same_origin(request, ctx.settings.public_url)
    form = await read_form(request)
    principal = await run_in_threadpool(session_principal, request, ctx)
    http = _http(request, ctx)
    if not ctx.service.oauth.check_consent_ticket(field(form, "ticket"), principal, http):
        raise CrossOrigin("This consent form has expired or was not made for this request. Go back to the MCP "
                          "client and connect again.")
    decision = field(form, "decision")
    if decision not in ("allow", "deny"):
        raise InvalidInput("choose Allow or Deny")
    workspace = field(form, "workspace").strip() if decision == "allow" else None
    if decision == "allow" and not workspace:
        return await run_in_threadpool(_consent_page, request, ctx, principal, http,
                                       error="Choose the workspace whose agent the client acts as.", status=422)
    answer = await run_in_threadpool(ctx.service.oauth.authorize, http, _user(principal), workspace)
    return _to_client(answer, 303)
