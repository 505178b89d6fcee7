"""The explorer's route class and session dependency: errors become pages, every answer gets its headers.

A page route's failures are rendered, not thrown at the app's problem+json handlers: an expired or revoked
session sends the browser back to the sign-in page (and clears the cookie), any other agentpg error becomes
an error page with the same status and the same message the API would give. A request that asks for JSON
(the explorer's own scripts do) gets the API's problem+json instead.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from agentpg.errors import AgentpgError, Unauthenticated
from agentpg.problems import problem, validation_problem
from agentpg.service import Principal
from agentpg.web.context import WebContext, web_context
from agentpg.web.render import PREFIX, render
from agentpg.web.security import COOKIE, add_security_headers, clear_session, session_principal


@dataclass(frozen=True)
class Explorer:
    """What a signed-in page works with."""

    ctx: WebContext
    principal: Principal


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "the request is invalid"


def error_response(request: Request, status: int, code: str, message: str) -> Response:
    if wants_json(request):
        return problem(status, code, message)
    return render(request, "error.html", status=status, title="Something went wrong", status_code=status,
                  code=code, message=message)


def _signed_out(request: Request, exc: Unauthenticated) -> Response:
    if wants_json(request):
        response: Response = problem(401, exc.code, exc.message)
    else:
        reason = "expired" if request.cookies.get(COOKIE) else "signin"
        response = RedirectResponse(f"/?reason={reason}", status_code=303)
    clear_session(response)
    return response


class PageRoute(APIRoute):
    """An APIRoute whose agentpg errors become pages (or problem+json for scripts)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except Unauthenticated as exc:
                response = _signed_out(request, exc)
            except AgentpgError as exc:
                response = error_response(request, exc.status, exc.code, exc.message)
            except RequestValidationError as exc:
                response = validation_problem(exc) if wants_json(request) else error_response(
                    request, 422, "invalid_input", validation_message(exc))
            except ValidationError as exc:
                response = error_response(request, 422, "invalid_input", validation_message(exc))
            add_security_headers(response, cache="cache-control" in response.headers)
            return response

        return guarded


def _explorer(request: Request) -> Explorer:
    """The signed-in caller (a sync dependency: the token check is a catalog query)."""
    ctx = web_context(request)
    principal = session_principal(request, ctx)
    request.state.explorer_principal = principal
    return Explorer(ctx, principal)


def _workspace_in_path(request: Request) -> str | None:
    value = request.path_params.get("workspace_id")
    return value if isinstance(value, str) else None


Session = Annotated[Explorer, Depends(_explorer)]
WorkspaceInPath = Annotated[str | None, Depends(_workspace_in_path)]


#: The two kinds of database page: a user's global database, and one workspace's agent database.
DATABASE_BASES = (PREFIX + "/u/{user_id}/global", PREFIX + "/u/{user_id}/agents/{workspace_id}")


def for_both_databases(router: APIRouter, suffix: str,
                       method: str = "GET") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a page under both kinds of database (:data:`DATABASE_BASES`) + ``suffix``; the endpoint's
    ``workspace_id`` is None on the global database's."""
    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        for base in DATABASE_BASES:
            router.add_api_route(base + suffix, endpoint, methods=[method])
        return endpoint

    return register
