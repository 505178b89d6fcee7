"""The console's management pages: users (admin), workspaces and tokens (admin or the user).

Every change goes through the same scoped service call as its REST route (:meth:`agentpg.service.Service.caller`:
``register_user``, ``delete_user``, ``create_workspace_with_token``, ``delete_workspace``, ``issue_*_token``,
``revoke_token``) with the session's principal, so who may do what is the API's rule, line for line (a user
token cannot create or delete users; another user's workspace or token is "not found").

Forms are POSTs checked like the explorer's others (same origin, url-encoded, size cap:
:mod:`agentpg.web.security`). A delete or a revocation first shows a confirmation page (no script needed);
deleting a user or a workspace asks for its id to be typed. A new token's secret is in the body of the answer
to the POST that made it and nowhere else: never in a URL (no redirect carries it), never logged, never
shown again (only its hash is stored). Bad input re-renders the page with the reason (4xx), never a 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from agentpg.errors import AgentpgError, NotFound, PermissionDenied
from agentpg.service import ID_PATTERN, TokenCreate, TokenInfo, UserCreate, WorkspaceCreate, client_configs
from agentpg.web import data
from agentpg.web.render import PREFIX, render, user_url, with_query
from agentpg.web.routing import Explorer, PageRoute, Session, validation_message
from agentpg.web.security import check_same_origin, field, read_form

router = APIRouter(route_class=PageRoute, include_in_schema=False)

USERS = f"{PREFIX}/manage/users"
Cursor = Annotated[str | None, Query(pattern=ID_PATTERN, max_length=128)]
Notice = Annotated[str | None, Query(max_length=300)]


def manage_url(user_id: str) -> str:
    return f"{user_url(user_id)}/manage"


def _optional(text: str) -> str | None:
    return text.strip() or None


async def _form(request: Request, s: Explorer) -> dict[str, list[str]]:
    check_same_origin(request, s.ctx.settings.public_url)
    return await read_form(request)


def _reason(exc: AgentpgError | ValidationError) -> tuple[int, str]:
    if isinstance(exc, ValidationError):
        return 422, validation_message(exc)
    return exc.status, exc.message


# -- users (admin) --------------------------------------------------------------------------------------


def _users_page(request: Request, s: Explorer, cursor: str | None, *, notice: str | None = None,
                error: str | None = None, status: int = 200, form: dict[str, str] | None = None) -> Response:
    if not s.principal.is_admin:
        raise PermissionDenied("managing users needs the admin token")
    users = s.ctx.service.caller(s.principal).list_users(limit=100, cursor=cursor)
    return render(request, "manage_users.html", title="Manage users", users=users, cursor=cursor, notice=notice,
                  error=error, status=status, form=form or {})


@router.get(USERS)
def users(request: Request, s: Session, cursor: Cursor = None, notice: Notice = None) -> Response:
    """Admin only: every user, a form to register one, and a delete button each."""
    return _users_page(request, s, cursor, notice=notice)


@router.post(USERS)
async def create_user(request: Request, s: Session) -> Response:
    """Register a user (its global database is made now); answers with its page, or the form and the reason."""
    form = await _form(request, s)
    wanted = {"id": field(form, "id").strip(), "email": field(form, "email").strip()}
    try:
        body = UserCreate(id=wanted["id"], email=_optional(wanted["email"]))
        created = await run_in_threadpool(s.ctx.service.caller(s.principal).register_user, body.id, body.email)
    except (AgentpgError, ValidationError) as exc:
        status, message = _reason(exc)
        return await run_in_threadpool(_users_page, request, s, None, error=f"Could not create the user: {message}",
                                       status=status, form=wanted)
    return RedirectResponse(with_query(manage_url(created.id), notice=f"Created user {created.id}."),
                            status_code=303)


@router.get(USERS + "/{user_id}/delete")
def confirm_delete_user(request: Request, user_id: str, s: Session) -> Response:
    if not s.principal.is_admin:
        raise PermissionDenied("deleting a user needs the admin token")
    user = data.get_user(s.ctx, s.principal, user_id)
    return render(request, "manage_confirm.html", title="Delete user?", what="user", subject=user.id,
                  action=f"{USERS}/{user.id}/delete", cancel=USERS, error=None, note=None)


@router.post(USERS + "/{user_id}/delete")
async def delete_user(request: Request, user_id: str, s: Session) -> Response:
    """Delete a user with every database it has, once its id was typed on the confirmation page."""
    form = await _form(request, s)
    if field(form, "confirm").strip() != user_id:
        if not s.principal.is_admin:
            raise PermissionDenied("deleting a user needs the admin token")
        await run_in_threadpool(data.get_user, s.ctx, s.principal, user_id)
        return render(request, "manage_confirm.html", status=422, title="Delete user?", what="user",
                      subject=user_id, action=f"{USERS}/{user_id}/delete", cancel=USERS,
                      error="Type the user's id exactly to confirm.", note=None)
    caller = s.ctx.service.caller(s.principal)
    held = await run_in_threadpool(caller.check_delete_user, user_id)
    await run_in_threadpool(caller.delete_user, user_id)
    await s.ctx.service.forget_connections(held)
    return RedirectResponse(with_query(USERS, notice=f"Deleted user {user_id} and all its databases."),
                            status_code=303)


# -- one user's workspaces and tokens --------------------------------------------------------------------


def _manage_page(request: Request, s: Explorer, user_id: str, cursor: str | None, *, notice: str | None = None,
                 error: str | None = None, status: int = 200, form: dict[str, str] | None = None) -> Response:
    user = data.get_user(s.ctx, s.principal, user_id)
    page = data.workspaces(s.ctx, s.principal, user_id, cursor)
    tokens: list[TokenInfo] = s.ctx.service.list_tokens(user_id)
    agent_tokens: dict[str, list[TokenInfo]] = {}
    for token in tokens:
        if token.workspace_id is not None:
            agent_tokens.setdefault(token.workspace_id, []).append(token)
    user_tokens = [t for t in tokens if t.kind == "user"]
    return render(request, "manage.html", title="Workspaces & tokens", user_id=user_id, active="manage", user=user,
                  page=page, cursor=cursor, agent_tokens=agent_tokens, user_tokens=user_tokens, notice=notice,
                  error=error, status=status, form=form or {}, signed_in_with=s.principal.token_id)


@router.get(PREFIX + "/u/{user_id}/manage")
def manage(request: Request, user_id: str, s: Session, cursor: Cursor = None, notice: Notice = None) -> Response:
    """The user's workspaces with their agent tokens, and the user's own tokens; forms to change them."""
    return _manage_page(request, s, user_id, cursor, notice=notice)


def _token_page(request: Request, user_id: str, *, kind: str, secret: str, token_id: str, name: str | None,
                workspace_id: str | None, config: dict[str, Any] | None = None) -> Response:
    """The only page that ever shows a token's secret: the answer to the POST that issued it."""
    return render(request, "manage_token.html", status=201, title="Copy the new token", user_id=user_id,
                  active="manage", kind=kind, secret=secret, token_id=token_id, name=name, workspace_id=workspace_id,
                  config=json.dumps(config, indent=2) if config else None)


@router.post(PREFIX + "/u/{user_id}/manage/workspaces")
async def create_workspace(request: Request, user_id: str, s: Session) -> Response:
    """Create a workspace (its agent database too) and show its first agent token, once."""
    form = await _form(request, s)
    wanted = {"id": field(form, "id").strip(), "name": field(form, "name").strip()}
    try:
        body = WorkspaceCreate(id=wanted["id"], name=_optional(wanted["name"]))
        info, issued = await run_in_threadpool(s.ctx.service.caller(s.principal).create_workspace_with_token,
                                               user_id, body.id, body.name)
    except (AgentpgError, ValidationError) as exc:
        if isinstance(exc, NotFound) and exc.message.startswith("user "):
            raise
        status, message = _reason(exc)
        return await run_in_threadpool(_manage_page, request, s, user_id, None, status=status, form=wanted,
                                       error=f"Could not create the workspace: {message}")
    base = s.ctx.settings.public_url or str(request.base_url)
    config = client_configs(s.ctx.settings, base, issued.secret).get("http")
    return _token_page(request, user_id, kind="agent", secret=issued.secret, token_id=issued.id, name=None,
                       workspace_id=info.id, config=config)


def _confirm(request: Request, user_id: str, *, what: str, subject: str, action: str, error: str | None = None,
             note: str | None = None) -> Response:
    return render(request, "manage_confirm.html", status=422 if error else 200,
                  title=f"{'Revoke' if what == 'token' else 'Delete'} {what}?", user_id=user_id, active="manage",
                  what=what, subject=subject, action=action, cancel=manage_url(user_id), error=error, note=note)


@router.get(PREFIX + "/u/{user_id}/manage/workspaces/{workspace_id}/delete")
def confirm_delete_workspace(request: Request, user_id: str, workspace_id: str, s: Session) -> Response:
    ws = data.get_workspace(s.ctx, s.principal, user_id, workspace_id)
    return _confirm(request, user_id, what="workspace", subject=ws.id,
                    action=f"{manage_url(user_id)}/workspaces/{ws.id}/delete")


@router.post(PREFIX + "/u/{user_id}/manage/workspaces/{workspace_id}/delete")
async def delete_workspace(request: Request, user_id: str, workspace_id: str, s: Session) -> Response:
    """Delete a workspace, its agent database and its role, once its id was typed: its tokens stop at once."""
    form = await _form(request, s)
    if field(form, "confirm").strip() != workspace_id:
        ws = await run_in_threadpool(data.get_workspace, s.ctx, s.principal, user_id, workspace_id)
        return _confirm(request, user_id, what="workspace", subject=ws.id, error="Type the workspace's id exactly "
                        "to confirm.", action=f"{manage_url(user_id)}/workspaces/{ws.id}/delete")
    caller = s.ctx.service.caller(s.principal)
    owner, held = await run_in_threadpool(caller.check_delete_workspace, user_id, workspace_id)
    await run_in_threadpool(caller.delete_workspace, owner, workspace_id)
    await s.ctx.service.forget_connections(held)
    return RedirectResponse(with_query(manage_url(user_id), notice=f"Deleted workspace {workspace_id}, its agent "
                                       "database and its tokens."), status_code=303)


def _token_name(form: dict[str, list[str]]) -> TokenCreate:
    return TokenCreate(name=_optional(field(form, "name")))


@router.post(PREFIX + "/u/{user_id}/manage/workspaces/{workspace_id}/tokens")
async def issue_agent_token(request: Request, user_id: str, workspace_id: str, s: Session) -> Response:
    """Issue another agent token for the workspace (for its MCP connection) and show it, once."""
    form = await _form(request, s)
    try:
        name = _token_name(form).name
        out = await run_in_threadpool(s.ctx.service.caller(s.principal).issue_agent_token, user_id, workspace_id,
                                      name)
    except (AgentpgError, ValidationError) as exc:
        if isinstance(exc, NotFound):
            raise
        status, message = _reason(exc)
        return await run_in_threadpool(_manage_page, request, s, user_id, None, status=status,
                                       error=f"Could not issue a token for {workspace_id}: {message}")
    return _token_page(request, user_id, kind="agent", secret=out.secret, token_id=out.id, name=name,
                       workspace_id=workspace_id)


@router.post(PREFIX + "/u/{user_id}/manage/tokens")
async def issue_user_token(request: Request, user_id: str, s: Session) -> Response:
    """Admin only (as in the API): issue a user token, for the REST API and this explorer, and show it once."""
    form = await _form(request, s)
    try:
        name = _token_name(form).name
        out = await run_in_threadpool(s.ctx.service.caller(s.principal).issue_user_token, user_id, name)
    except (AgentpgError, ValidationError) as exc:
        if isinstance(exc, NotFound):
            raise
        status, message = _reason(exc)
        return await run_in_threadpool(_manage_page, request, s, user_id, None, status=status,
                                       error=f"Could not issue a user token: {message}")
    return _token_page(request, user_id, kind="user", secret=out.secret, token_id=out.id, name=name,
                       workspace_id=None)


def _live_token(s: Explorer, user_id: str, token_id: str) -> TokenInfo:
    """The user's live token ``token_id`` (another user's, a revoked or an unknown one is "not found")."""
    data.get_user(s.ctx, s.principal, user_id)
    for token in s.ctx.service.list_tokens(user_id):
        if token.id == token_id:
            return token
    raise NotFound(f"token {token_id!r} does not exist (or is already revoked)")


def _token_label(token: TokenInfo) -> str:
    owner = f"agent token of {token.workspace_id}" if token.kind == "agent" else "user token"
    return f"{owner}{f' «{token.name}»' if token.name else ''} ({token.id})"


@router.get(PREFIX + "/u/{user_id}/manage/tokens/{token_id}/revoke")
def confirm_revoke(request: Request, user_id: str, token_id: str, s: Session) -> Response:
    token = _live_token(s, user_id, token_id)
    note = ("This is the token you are signed in with: revoking it signs you out."
            if token.id == s.principal.token_id else None)
    return _confirm(request, user_id, what="token", subject=_token_label(token), note=note,
                    action=f"{manage_url(user_id)}/tokens/{token.id}/revoke")


@router.post(PREFIX + "/u/{user_id}/manage/tokens/{token_id}/revoke")
async def revoke(request: Request, user_id: str, token_id: str, s: Session) -> Response:
    """Revoke a token at once (its next request, an open MCP session's included, is refused)."""
    form = await _form(request, s)
    token = await run_in_threadpool(_live_token, s, user_id, token_id)
    if field(form, "confirm") != "yes":
        return _confirm(request, user_id, what="token", subject=_token_label(token), error="Tick the box to "
                        "confirm the revocation.", action=f"{manage_url(user_id)}/tokens/{token.id}/revoke")
    await run_in_threadpool(s.ctx.service.caller(s.principal).revoke_token, token.id)
    return RedirectResponse(with_query(manage_url(user_id), notice=f"Revoked the {_token_label(token)}."),
                            status_code=303)
