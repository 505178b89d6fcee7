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
from agentpg.errors import Unauthenticated
from agentpg.service import Principal, not_an_agent, own_user, require_admin, user_scope

__all__ = ["Auth", "authenticated", "own_user", "principal_of", "require_admin", "user_scope"]

_bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                     description="The admin token, or a user token (agent tokens are for MCP only).")


def principal_of(ctx: Ctx, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller, or ``Unauthenticated``/``PermissionDenied``. Sync: the token lookup may be a catalog query."""
    if credentials is None:
        raise Unauthenticated("send the admin token or a user token as 'Authorization: Bearer <token>'")
    return not_an_agent(ctx.service.tokens.authenticate(credentials.credentials))


async def authenticated(ctx: Ctx,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """:func:`principal_of` as the routes' dependency. A token seen in the last 2 s (and the admin token) is
    answered on the event loop; only a catalog lookup goes to a worker thread, so most requests skip a
    thread hop here."""
    hit = ctx.service.tokens.cached(credentials.credentials) if credentials is not None else None
    if hit is not None:
        return not_an_agent(hit)
    return await run_in_threadpool(principal_of, ctx, credentials)


Auth = Annotated[Principal, Depends(authenticated)]
