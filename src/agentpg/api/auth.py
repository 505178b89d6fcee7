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

from agentpg.api.context import Ctx
from agentpg.errors import NotFound, PermissionDenied, Unauthenticated
from agentpg.tokens import Principal

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="The admin token, or a user token (agent tokens are for MCP only).")


def authenticated(ctx: Ctx,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """The caller, or ``Unauthenticated``/``PermissionDenied``. Sync: the token lookup is a catalog query."""
    if credentials is None:
        raise Unauthenticated("send the admin token or a user token as 'Authorization: Bearer <token>'")
    principal = ctx.service.tokens.authenticate(credentials.credentials)
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
