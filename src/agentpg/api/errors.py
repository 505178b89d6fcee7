"""Errors as RFC 9457 problem details (``application/problem+json``), the same shape for every failure.

``{"type": "urn:agentpg:problem:<code>", "title": <HTTP phrase>, "status": <int>, "detail": <a sentence a
person can act on>, "code": <stable machine code>}``, plus ``errors`` (field → message) on a 422 from
validation. Messages come from :mod:`agentpg.errors` (which never holds a URI or password) or are written
here; request input is never echoed back in a validation error (it may be a secret, e.g. an env value), and
an unexpected exception becomes a bare 500 whose details go only to the log, as a traceback without the
exception's message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentpg.errors import AgentpgError, Unauthenticated
from agentpg.problems import (
    PROBLEM_MEDIA_TYPE,
    Problem,
    ProblemResponse,
    problem,
    validation_problem,
)

log = logging.getLogger(__name__)

RETRY_AFTER_S = "1"
"""``Retry-After`` of a 503: the catalog or a server is unreachable, or agentpg is busy; all are retryable."""


_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "no_such_route",
               405: "method_not_allowed", 406: "not_acceptable", 413: "content_too_large",
               415: "unsupported_media_type"}


async def _agentpg_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, AgentpgError)
    headers = {"WWW-Authenticate": 'Bearer realm="agentpg"'} if isinstance(exc, Unauthenticated) else None
    if exc.status == 503:  # a server or the catalog cannot be reached, or agentpg is busy: retryable
        headers = {"Retry-After": RETRY_AFTER_S}
    elif exc.status == 429:  # back-pressure (a busy database or server): retryable
        headers = {"Retry-After": str(getattr(exc, "retry_after_s", RETRY_AFTER_S))}
    if exc.status >= 500:
        log.warning("%s %s answered %d (%s)", request.method, request.url.path, exc.status, exc.code)
    return problem(exc.status, exc.code, exc.message, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    content_type = request.headers.get("content-type")
    whole_body = any(tuple(e.get("loc", ())) == ("body",) and e.get("type") != "missing" for e in exc.errors())
    if whole_body and content_type is not None and not _is_json(content_type):
        # FastAPI reads a body as JSON only when it says so; anything else (curl -d sends form encoding by
        # default) reached the model as raw bytes, which pydantic calls "not a valid dictionary".
        return problem(415, "unsupported_media_type",
                       f"the body must be JSON sent with the header Content-Type: application/json; this "
                       f"request's Content-Type is {content_type.split(';')[0].strip()[:100]!r} (curl -d sends "
                       "application/x-www-form-urlencoded unless told otherwise: add -H 'Content-Type: "
                       "application/json')")
    return validation_problem(exc)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _http_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    if exc.status_code == 404:
        detail = f"there is no route {request.url.path!r}; the API is described at /docs"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on this route"
    elif exc.status_code == 400:
        detail = "the request body could not be parsed"
    else:
        detail = str(exc.detail)
    return problem(exc.status_code, code, detail, headers=dict(exc.headers or {}))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AgentpgError, _agentpg_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


def _problem_content() -> dict[str, Any]:
    return {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


_DESCRIPTIONS = {
    400: "The body could not be parsed.",
    401: "No bearer token, or one that is unknown or revoked.",
    403: "The token may not use this route (an agent token on REST; a user token on an admin route), "
         "or the name is managed by agentpg.",
    404: "No such resource, or it belongs to another user.",
    405: "Method not allowed on this route.",
    409: "Conflicts with the resource's existence or state.",
    413: "The request body is larger than the limit.",
    422: "The request is invalid; `errors` names each field.",
    429: "Too many requests for this token (rate limit; see Retry-After), concurrent reads of this database, or "
         "the database server's connection budget is in use (`server_busy`); retry after Retry-After.",
    500: "Unexpected failure (details are only in the server log).",
    502: "The database server refused an operation.",
    503: "A database server or the catalog cannot be reached, or agentpg is busy with other changes; retry "
         "after the seconds in Retry-After.",
    504: "The read ran past its statement timeout.",
}

COMMON_ERRORS = (400, 401, 403, 404, 405, 413, 422, 500)


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it may answer beyond :data:`COMMON_ERRORS`."""
    return {status: {"description": _DESCRIPTIONS[status]} for status in statuses}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Post-process the OpenAPI document: each ``/api`` operation lists its problem+json error responses.

    FastAPI documents its own 422 as ``application/json`` with ``HTTPValidationError``; we answer
    ``application/problem+json`` with :class:`Problem`, so every 4xx/5xx is rewritten to that.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem_schema.pop("$defs", {}))
    components["Problem"] = problem_schema
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for path, item in schema.get("paths", {}).items():
        if not path.startswith("/api/"):
            continue
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status in COMMON_ERRORS:
                responses.setdefault(str(status), {})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["description"] = _DESCRIPTIONS.get(int(status), response.get("description", ""))
                    response["content"] = _problem_content()
    return schema
