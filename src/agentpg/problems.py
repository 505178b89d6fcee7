"""RFC 9457 problem details (``application/problem+json``): the one error body every HTTP edge answers.

``{"type": "urn:agentpg:problem:<code>", "title": <HTTP phrase>, "status": <int>, "detail": <a sentence a
person can act on>, "code": <stable machine code>}``, plus ``errors`` (field → message) on a 422 from
validation. Part of the kernel every edge may use (like :mod:`agentpg.errors`): the REST API answers with
it, and so do the console's routes when a script asks for JSON. Request input is never echoed back in a
validation error (it may be a secret, e.g. an env value).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str
    """Where: ``body.limit``, ``query.cursor``, ``path.name``; ``body`` for the body as a whole."""
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem detail."""

    model_config = ConfigDict(extra="forbid")

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(status: int, code: str, detail: str, *, errors: list[FieldError] | None = None,
            headers: dict[str, str] | None = None) -> ProblemResponse:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = Problem(type=f"urn:agentpg:problem:{code}", title=title, status=status, detail=detail, code=code,
                   errors=errors)
    return ProblemResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "body" and parts[1].isdigit():  # a JSON decode position, not a field
        return "body"
    return ".".join(parts) or "request"


def _message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "json_invalid":
        ctx = err.get("ctx") or {}
        pos = err.get("loc", ("body", "?"))[-1]
        return f"the body is not valid JSON ({ctx.get('error', 'decode error')} at character {pos})"
    if kind == "extra_forbidden":
        return "unknown field (not part of this request's schema)"
    if kind == "missing":
        return "required"
    if kind in ("too_long", "too_short") and isinstance(err.get("input"), str):
        # A text field's length is checked after its NUL check, so pydantic words it as a list's ("items").
        ctx = err.get("ctx") or {}
        bound = "at most" if kind == "too_long" else "at least"
        limit = ctx.get("max_length" if kind == "too_long" else "min_length")
        return f"should have {bound} {limit} characters, not {len(err['input'])}"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def validation_problem(exc: RequestValidationError) -> ProblemResponse:
    errors = [FieldError(field=_field(e.get("loc", ())), message=_message(e)) for e in exc.errors()]
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    if len(errors) > 5:
        detail += f"; and {len(errors) - 5} more"
    return problem(422, "invalid_input", detail or "the request is invalid", errors=errors)


class ResponseAborted(Exception):
    """Raised to cut a response whose status line is already sent (a failing export stream): the client
    sees the connection drop instead of a clean end, so it cannot take a partial body for a whole one.
    Whoever raises it logs why; the guard just lets the response die."""
