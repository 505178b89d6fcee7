"""How the explorer authenticates a browser, and what it asks the browser to enforce.

* The credential is the same token the REST API takes (a user token, or the admin token). The login form
  POSTs it; the answer sets a session cookie holding it **sealed** (AES-256-GCM with the service's key ring,
  bound to this use, with an expiry inside the sealed payload the browser cannot extend), so the token itself
  is never echoed in a ``Set-Cookie`` header and a cookie copied out of a browser expires on time. The cookie
  is ``HttpOnly`` (page scripts, hence an injected one, cannot read it), ``SameSite=Strict`` (never sent on a
  request another site starts), ``Path=/`` and, over HTTPS, ``Secure``. On every request it is opened and
  the token inside is checked exactly as the API checks a bearer token, so revoking the token ends the
  session at once. The token never appears in a URL, so never in an access log, a history or a Referer.
* Every state-changing request (POST) must come from a page of this origin: its ``Origin`` header must be
  this server's own origin (or ``AGENTPG_PUBLIC_URL``'s), or, when a browser sends no Origin,
  ``Sec-Fetch-Site: same-origin``. Anything else is 403 before any work (CSRF defence in depth, on top of
  SameSite=Strict).
* Every answer carries a strict Content-Security-Policy (scripts and styles only from our own static files,
  no inline code, no framing), ``no-store`` caching, ``nosniff`` and ``Referrer-Policy: same-origin``.
"""

from __future__ import annotations

import json
import time
from typing import Final
from urllib.parse import parse_qs, urlsplit

from fastapi import Request, Response

from agentpg.errors import AgentpgError, InvalidInput, SecretError, Unauthenticated
from agentpg.service import Principal, Service, not_an_agent
from agentpg.web.context import WebContext

COOKIE: Final = "agentpg_explorer"
SESSION_SECONDS: Final = 8 * 3600
MAX_FORM_BYTES: Final = 256 * 1024

CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class CrossOrigin(AgentpgError):
    status = 403
    code = "cross_origin"


def add_security_headers(response: Response, *, cache: bool = False) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not cache:
        response.headers["Cache-Control"] = "no-store"


def principal_from_token(ctx: WebContext, token: str) -> Principal:
    """The API's own check (unknown/revoked → 401; agent token → 403), on a token from a form or cookie."""
    if not token or len(token) > 512 or not token.isascii() or not token.isprintable():
        raise Unauthenticated("that is not a token agentpg issued")
    return not_an_agent(ctx.service.tokens.authenticate(token))




def seal_session(service: Service, token: str, *, seconds: int = SESSION_SECONDS) -> str:
    payload = json.dumps({"token": token, "expires": int(time.time()) + seconds})
    sealed: str = service.seal_cookie(payload)
    return sealed


def open_session(service: Service, value: str) -> str:
    """The token inside a session cookie, or ``Unauthenticated`` (tampered, foreign key, or expired)."""
    try:
        payload = json.loads(service.open_cookie(value))
        token, expires = payload["token"], payload["expires"]
    except (SecretError, ValueError, KeyError, TypeError):
        raise Unauthenticated("the session is not valid any more; sign in again") from None
    if not isinstance(token, str) or not isinstance(expires, int) or expires < time.time():
        raise Unauthenticated("the session has expired; sign in again")
    return token


def session_principal(request: Request, ctx: WebContext) -> Principal:
    value = request.cookies.get(COOKIE)
    if not value:
        raise Unauthenticated("sign in with a user token or the admin token")
    if len(value) > 2048:
        raise Unauthenticated("the session is not valid any more; sign in again")
    return principal_from_token(ctx, open_session(ctx.service, value))


def _is_https(request: Request, public_url: str | None) -> bool:
    if request.url.scheme == "https":
        return True
    return bool(public_url) and urlsplit(public_url or "").scheme == "https"


def set_session(response: Response, request: Request, ctx: WebContext, token: str) -> None:
    public_url = ctx.settings.public_url
    response.set_cookie(COOKIE, seal_session(ctx.service, token), max_age=SESSION_SECONDS, path="/",
                        httponly=True, samesite="strict", secure=_is_https(request, public_url))


def clear_session(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_same_origin(request: Request, public_url: str | None) -> None:
    """Refuse a state-changing request that a page of another origin could have started."""
    origin = request.headers.get("origin")
    if origin is not None:
        allowed = {_origin_of(str(request.base_url))}
        if public_url:
            allowed.add(_origin_of(public_url))
        if origin.lower() in allowed:
            return
        raise CrossOrigin("this form was sent from another site; open the explorer and try again")
    if request.headers.get("sec-fetch-site") == "same-origin":
        return
    raise CrossOrigin("the explorer accepts forms only from its own pages (the browser sent no Origin header)")


async def read_form(request: Request) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body (the only kind our forms send), parsed strictly."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InvalidInput("the explorer's forms are sent as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidInput(f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
    try:
        text = body.decode("utf-8")
        return parse_qs(text, keep_blank_values=True, strict_parsing=False, errors="strict", max_num_fields=200)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the form could not be read (not UTF-8, or too many fields)") from None


def field(form: dict[str, list[str]], name: str, default: str = "") -> str:
    values = form.get(name)
    if not values:
        return default
    if "\x00" in values[0]:
        raise InvalidInput(f"the field {name!r} contains a NUL character")
    return values[0]
