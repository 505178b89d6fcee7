"""The explorer's pages: sign-in, user picker (admin), databases, agents' permissions.

Served by ``agentpg serve`` at ``/`` and under ``/explorer``; left out of the OpenAPI document (HTML, not API).
The database pages (tables, rows, export, SQL box) are in :mod:`agentpg.web.routes_db`, the History page (restores)
in :mod:`agentpg.web.history`, the audit log, usage and schema picture in :mod:`agentpg.web.console`, and the
management of users, workspaces and tokens in :mod:`agentpg.web.manage`.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Annotated, Final

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from agentpg.errors import AgentpgError, NotFound
from agentpg.service import ID_PATTERN, GlobalDbPermissions
from agentpg.web import console, data, history, manage, oauth, routes_db
from agentpg.web.context import web_context
from agentpg.web.render import PREFIX, render, user_url, with_query
from agentpg.web.routing import Explorer, PageRoute, Session, error_response, validation_message, wants_json
from agentpg.web.security import (
    COOKIE,
    check_same_origin,
    clear_session,
    field,
    principal_from_token,
    read_form,
    session_principal,
    set_session,
)

router = APIRouter(route_class=PageRoute, include_in_schema=False)
router.include_router(routes_db.router)
router.include_router(history.router)
router.include_router(manage.router)  # issue 21: the console's pages
router.include_router(console.router)
router.include_router(oauth.router)  # issue 20: /oauth/authorize, the consent page of remote MCP clients

Cursor = Annotated[str | None, Query(pattern=ID_PATTERN, max_length=128)]
_STATIC: Final = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                  "favicon.svg": "image/svg+xml",
                  # The console's vendored libraries (issue 21; versions and licenses: docs/explorer.md).
                  "console.js": "text/javascript; charset=utf-8",
                  "chart.umd.min.js": "text/javascript; charset=utf-8",
                  "cytoscape.min.js": "text/javascript; charset=utf-8",
                  "chart.js.LICENSE.md": "text/plain; charset=utf-8",
                  "cytoscape.LICENSE.txt": "text/plain; charset=utf-8"}
_REASONS: Final = {"expired": "Your session ended (the token was revoked, or the session expired). Sign in again.",
                   "signin": "Sign in to continue.", "signedout": "Signed out."}


def _landing_for(request: Request) -> Response:
    """Where ``/`` sends a signed-in browser: the admin to the user picker, a user to its own databases."""
    principal = request.state.explorer_principal
    if principal.is_admin:
        return RedirectResponse(f"{PREFIX}/users", status_code=303)
    return RedirectResponse(user_url(principal.user_id), status_code=303)


@router.get("/")
def landing(request: Request, reason: Annotated[str | None, Query(max_length=20)] = None,
            next_url: Annotated[str | None, Query(alias="next", max_length=oauth.MAX_NEXT)] = None) -> Response:
    """The sign-in page, or (with a valid session) a redirect to the caller's first page, or to ``next`` (an
    OAuth consent page that sent the browser here to sign in: :func:`agentpg.web.oauth.safe_next`)."""
    back = oauth.safe_next(next_url)
    if request.cookies.get(COOKIE):
        try:
            ctx = web_context(request)
            request.state.explorer_principal = session_principal(request, ctx)
            return RedirectResponse(back, status_code=303) if back else _landing_for(request)
        except AgentpgError:
            response = render(request, "login.html", title="Sign in", message=_REASONS["expired"], me=None,
                              next=back)
            clear_session(response)
            return response
    return render(request, "login.html", title="Sign in", message=_REASONS.get(reason or ""), me=None, next=back)


@router.get(PREFIX)
def explorer_root() -> Response:
    return RedirectResponse("/", status_code=303)


@router.post(f"{PREFIX}/login")
async def login(request: Request) -> Response:
    ctx = web_context(request)
    check_same_origin(request, ctx.settings.public_url)
    form = await read_form(request)
    token, back = field(form, "token").strip(), oauth.safe_next(field(form, "next"))
    try:
        principal = await run_in_threadpool(principal_from_token, ctx, token)
    except AgentpgError as exc:
        message = ("Agent tokens reach only MCP. Sign in with a user token or the admin token."
                   if exc.status == 403 else "That token is not valid: it is unknown, revoked, or mistyped.")
        return render(request, "login.html", status=exc.status, title="Sign in", error=message, message=None,
                      me=None, next=back)
    request.state.explorer_principal = principal
    response = RedirectResponse(back, status_code=303) if back else _landing_for(request)
    set_session(response, request, ctx, token)
    return response


@router.post(f"{PREFIX}/logout")
async def logout(request: Request) -> Response:
    check_same_origin(request, web_context(request).settings.public_url)
    response = RedirectResponse("/?reason=signedout", status_code=303)
    clear_session(response)
    return response


@cache
def _asset(name: str) -> bytes:
    return resources.files("agentpg.web").joinpath("static", name).read_bytes()


@router.get(PREFIX + "/static/{name}")
def static(name: str) -> Response:
    if name not in _STATIC:
        raise NotFound(f"there is no explorer asset {name!r}")
    return Response(_asset(name), media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


@router.get(f"{PREFIX}/users")
def pick_user(request: Request, s: Session, cursor: Cursor = None,
              user: Annotated[str | None, Query(max_length=128)] = None) -> Response:
    """Admin only: choose the user whose databases to explore."""
    if not s.principal.is_admin:
        return RedirectResponse(user_url(s.principal.user_id or ""), status_code=303)
    error = None
    if user:
        user = user.strip()
        if re.fullmatch(ID_PATTERN, user):
            try:
                data.get_user(s.ctx, s.principal, user)
                return RedirectResponse(user_url(user), status_code=303)
            except NotFound:
                pass
        error = f"There is no user {user!r}."
    page = s.ctx.service.caller(s.principal).list_users(limit=100, cursor=cursor)
    return render(request, "pick_user.html", title="Choose a user", users=page, error=error, query=user or "",
                  status=404 if error else 200)


@router.get(PREFIX + "/u/{user_id}")
async def overview(request: Request, user_id: str, s: Session, cursor: Cursor = None) -> Response:
    """Databases panel: the global database and one per workspace, with size, status and cost."""
    view = await data.overview(s.ctx, s.principal, user_id, cursor)
    return render(request, "overview.html", title="Databases", user_id=user_id, active="databases", view=view,
                  cursor=cursor)


def _allowed_tables(text: str) -> list[str] | None:
    names = [n.strip() for n in re.split(r"[,\n]", text) if n.strip()]
    return names or None


@router.get(PREFIX + "/u/{user_id}/agents")
def agents(request: Request, user_id: str, s: Session, cursor: Cursor = None,
           saved: Annotated[str | None, Query(pattern=ID_PATTERN, max_length=128)] = None) -> Response:
    return _agents_page(request, s, user_id, cursor, saved=saved)


def _agents_page(request: Request, s: Explorer, user_id: str, cursor: str | None, *,
                 saved: str | None = None, error: tuple[str, str] | None = None) -> Response:
    user = data.get_user(s.ctx, s.principal, user_id)
    page = data.workspaces(s.ctx, s.principal, user_id, cursor)
    rows = data.agent_permissions(s.ctx, s.principal, user_id, page)
    byo = user.global_database is not None and user.global_database.ownership_type == "user"
    return render(request, "agents.html", title="Agents and permissions", user_id=user_id, active="agents",
                  rows=rows, page=page, cursor=cursor, saved=saved, error=error, byo=byo,
                  status=422 if error else 200)


@router.post(PREFIX + "/u/{user_id}/agents/{workspace_id}/permissions")
async def save_permissions(request: Request, user_id: str, workspace_id: str, s: Session) -> Response:
    """Set one agent's rights on the global database (the API's PUT …/global-database-permissions)."""
    check_same_origin(request, s.ctx.settings.public_url)
    form = await read_form(request)
    try:
        wanted = GlobalDbPermissions(
            can_read=field(form, "can_read") == "on", can_write=field(form, "can_write") == "on",
            can_create_tables=field(form, "can_create_tables") == "on",
            can_drop_tables=field(form, "can_drop_tables") == "on",
            allowed_tables=_allowed_tables(field(form, "allowed_tables")))
        saved = await run_in_threadpool(data.set_permissions, s.ctx, s.principal, user_id, workspace_id, wanted)
    except AgentpgError as exc:
        if wants_json(request) or exc.status not in (409, 422):
            return error_response(request, exc.status, exc.code, exc.message)
        return await run_in_threadpool(_agents_page, request, s, user_id, None, error=(workspace_id, exc.message))
    except ValidationError as exc:  # a combination Postgres could not enforce (can_drop_tables alone...)
        message = validation_message(exc)
        if wants_json(request):
            return error_response(request, 422, "invalid_input", message)
        return await run_in_threadpool(_agents_page, request, s, user_id, None, error=(workspace_id, message))
    if wants_json(request):
        return JSONResponse({"workspace_id": workspace_id, "permissions": saved.model_dump(),
                             "message": "Saved: the agent's role in the global database has these rights now."})
    return RedirectResponse(with_query(f"{user_url(user_id)}/agents", saved=workspace_id), status_code=303)
