"""Bearer authentication and the scoping rules every REST route applies.

* no token, an unknown or a revoked one → 401 (``WWW-Authenticate: Bearer``), never saying which;
* an agent token → 403 on every REST route: agents reach MCP only;
* a user token reaches only its own user's routes; another user's resource answers 404 exactly as a missing
  one would, so a token cannot probe which ids exist. Scope is checked before anything else about the
  resource, and only then may a route answer 403 ("needs the admin token") for the caller's own id;
* the admin token reaches everything.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from agentpg.api.context import Ctx
from agentpg.errors import NotFound, PermissionDenied, Unauthenticated
from agentpg.tokens import Principal

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="The admin token, or a user token (agent tokens are for MCP only).")


def principal_of(ctx: Ctx, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller, or ``Unauthenticated``/``PermissionDenied``. Sync: the token lookup may be a catalog query."""
    if credentials is None:
        raise Unauthenticated("send the admin token or a user token as 'Authorization: Bearer <token>'")
    return _not_an_agent(ctx.service.tokens.authenticate(credentials.credentials))


async def authenticated(ctx: Ctx,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """:func:`principal_of` as the routes' dependency. A token seen in the last 2 s (and the admin token) is
    answered on the event loop; only a catalog lookup goes to a worker thread, so most requests skip a
    thread hop here."""
    hit = ctx.service.tokens.cached(credentials.credentials) if credentials is not None else None
    if hit is not None:
        return _not_an_agent(hit)
    return await run_in_threadpool(principal_of, ctx, credentials)


def _not_an_agent(principal: Principal) -> Principal:
    if principal.kind == "agent":
        raise PermissionDenied("agent tokens reach only the MCP endpoint; the REST API needs the admin token "
                               "or a user token")
    return principal


Auth = Annotated[Principal, Depends(authenticated)]


def own_user(principal: Principal, user_id: str) -> None:
    """A user token on another user's routes: "not found", exactly as for an id that does not exist."""
    if not principal.is_admin and principal.user_id != user_id:
        raise NotFound(f"user {user_id!r} does not exist")


def require_admin(principal: Principal, what: str) -> None:
    if not principal.is_admin:
        raise PermissionDenied(f"{what} needs the admin token")


def user_scope(principal: Principal) -> str | None:
    """The ``user_id=`` a service call is scoped to: none for the admin, the token's user otherwise."""
    return None if principal.is_admin else principal.user_id
