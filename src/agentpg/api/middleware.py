"""Pure ASGI middleware (no BaseHTTPMiddleware, so streamed exports are not buffered or broken).

Outermost first: :class:`MetricsMiddleware` (counts every answer, 413s and 500s included),
:class:`GuardMiddleware` (no exception escapes as a traceback-with-message or a non-problem 500),
:class:`BodyLimitMiddleware` (a body over the limit is refused before any route parses it).
"""

from __future__ import annotations

import logging
import time
import traceback
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentpg.api.errors import RETRY_AFTER_S
from agentpg.api.metrics import UNMATCHED, ApiMetrics
from agentpg.problems import ResponseAborted, problem

log = logging.getLogger(__name__)


def route_template(scope: Scope) -> str:
    """The matched route's path template; set by the router on the shared scope once it has matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            self.metrics.observe_request(scope["method"], route_template(scope), status,
                                         time.perf_counter() - start)


class GuardMiddleware:
    """The last line: an unexpected exception becomes a 500 problem, and the log gets its traceback but not
    its message (a driver's message can name a role or host; ours are built never to, theirs are not)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def track(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, track)
        except ResponseAborted:
            return
        except Exception as exc:
            if _catalog_busy(exc):
                # Every catalog connection of this process is in use and none came free in time.
                log.warning("%s %s: no catalog connection came free in time; answered 503", scope["method"],
                            route_template(scope))
                if not started:
                    await problem(503, "busy", "agentpg is busy with other requests right now; retry shortly",
                                  headers={"Retry-After": RETRY_AFTER_S})(scope, receive, send)
                return
            if _database_unreachable(exc):
                # The catalog (or a server) went away mid-request, e.g. while it restarts: retryable, not a bug.
                log.warning("%s %s: a database connection failed (%s); answered 503", scope["method"],
                            route_template(scope), type(exc).__name__)
                if not started:
                    await problem(503, "catalog_unavailable", "agentpg's catalog database cannot be reached "
                                  "right now; retry shortly",
                                  headers={"Retry-After": RETRY_AFTER_S})(scope, receive, send)
                return
            log.error("unexpected %s while answering %s %s%s\n%s", type(exc).__name__, scope["method"],
                      route_template(scope), " (response already started; connection dropped)" if started else "",
                      "".join(traceback.format_tb(exc.__traceback__)))
            if not started:
                response = problem(500, "internal", "an unexpected error occurred; it has been logged")
                await response(scope, receive, send)


def _catalog_busy(exc: BaseException) -> bool:
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    return isinstance(exc, PoolTimeoutError)


def _database_unreachable(exc: BaseException) -> bool:
    """A connection-level failure of the catalog or a server (SQLAlchemy's wrapper or psycopg's own)."""
    from psycopg import OperationalError as PsycopgOperationalError
    from sqlalchemy.exc import OperationalError as SqlOperationalError

    from agentpg.service import is_connection_lost

    if isinstance(exc, SqlOperationalError):
        return is_connection_lost(exc.orig) if exc.orig is not None else True
    return isinstance(exc, PsycopgOperationalError) and is_connection_lost(exc)


class SingleQueryValuesMiddleware:
    """Every REST query parameter takes one value: a repeated one (``?cursor=a&cursor=b``) is refused (422)
    rather than silently read as its last value, so the request means what the caller thinks it means."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope.get("path", "")).startswith("/api/") and scope.get("query_string"):
            seen: set[str] = set()
            for key, _ in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
                if key in seen:
                    await problem(422, "invalid_input",
                                  f"query parameter {key!r} is given more than once; give it once")(scope, receive,
                                                                                                       send)
                    return
                seen.add(key)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Read the whole body first, refusing it with 413 once it exceeds ``max_bytes`` (declared or sent)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ASGIApp:
        return problem(413, "content_too_large",
                       f"the request body is larger than the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: http.disconnect, which streamed responses listen for

        await self.app(scope, replay, send)
