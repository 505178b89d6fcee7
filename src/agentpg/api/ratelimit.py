"""Per-token limits on the HTTP edge, in process: rate (token buckets), MCP call concurrency, failed auth.

One :class:`LimitMiddleware` sits just inside the body limit (so the body it may look at is bounded) and
before every route, REST and ``/mcp`` alike. What it enforces (settings and defaults in docs/limits.md):

* **Rate**: each bearer token (each client address when there is none) has a token bucket of
  ``rate_limit_burst`` requests refilled at ``rate_limit_per_s``. The admin token is exempt (it is the
  platform's own backend). ``/healthz``, ``/readyz`` and ``/metrics`` are never limited.
* MCP notifications and responses (POSTs without a request id) are never limited: they do no work, and an
  HTTP error on one ends an SDK client's session.
* **Concurrency of MCP tool calls**: at most ``mcp_max_concurrent_calls`` ``tools/call`` requests of one
  agent token run at once.
* **Failed authentication**: every 401 costs the client address one unit of a bucket of
  ``auth_failures_burst`` refilled at ``auth_failures_per_s``; when it is empty, requests from that address
  whose token has not been seen to work get 429 before any token lookup.

How a refusal reads: on REST, and for an MCP request that opens a session, **429** problem+json with
``Retry-After``. Inside an MCP session, a refused ``tools/call`` is answered in-band as a tool error
(``isError: true``, "… retry in N s") and any other refused request as a JSON-RPC error, so the client's
session survives (the SDK clients tear a session down on an HTTP error status). For the same reason a
``tools/call`` that would be answered with a 5xx (the catalog unreachable while the server restarts, say)
becomes a tool error saying to retry.

Tokens are never stored: buckets are keyed by a SHA-256 prefix of the token. State is per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentpg.problems import problem
from agentpg.settings import Settings

log = logging.getLogger(__name__)

_EXEMPT_PATHS = ("/healthz", "/readyz", "/metrics")
_MCP_PATH = "/mcp"
#: Most distinct keys remembered per table; the least recently used are forgotten (a full bucket again).
MAX_KEYS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float
    trusted: bool = False
    """A request with this key was once answered with something other than 401."""


class TokenBuckets:
    """Token buckets keyed by string, refilled continuously. Not thread-safe: used on the event loop only."""

    def __init__(self, rate_per_s: float, burst: int, *, max_keys: int = MAX_KEYS) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=self.burst, updated=now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        return bucket

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one unit: 0.0 if there was one, else the seconds until there will be (nothing spent)."""
        if not self.enabled:
            return 0.0
        bucket = self._bucket(key, time.monotonic() if now is None else now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def wait(self, key: str, now: float | None = None) -> float:
        """Like :meth:`take` without spending: how long until one unit is there."""
        if not self.enabled:
            return 0.0
        bucket = self._bucket(key, time.monotonic() if now is None else now)
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def trust(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.trusted = True

    def trusted(self, key: str) -> bool:
        bucket = self._buckets.get(key)
        return bucket is not None and bucket.trusted


def _retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def _bearer(headers: Headers) -> str | None:
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


#: Deepest JSON nesting accepted in an MCP message (the SDK answers a bare 500 to some deeper ones).
MAX_JSON_DEPTH = 64


class _TooDeep(Exception):
    pass


def _depth_within(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers at most ``limit`` deep (iterative: no recursion of our own)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return True


def _json_rpc_call(body: bytes) -> tuple[str | None, Any]:
    """(method, id) of a JSON-RPC request body; (None, None) for anything else (a notification, a batch, junk).
    Raises ``_TooDeep`` for a body nested deeper than :data:`MAX_JSON_DEPTH`."""
    try:
        message = json.loads(body)
    except RecursionError:
        raise _TooDeep from None
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not _depth_within(message, MAX_JSON_DEPTH):
        if isinstance(message, dict) and isinstance(message.get("id"), str | int):
            raise _TooDeep(message["id"], message.get("method"))
        raise _TooDeep
    if not isinstance(message, dict) or "id" not in message or not isinstance(message.get("method"), str):
        return None, None
    request_id = message["id"]
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        return None, None
    return message["method"], request_id


async def _send_json(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _in_band(send: Send, method: str, request_id: Any, message: str, retry_after: str | None) -> None:
    """Answer an MCP request inside the protocol: a tool error for tools/call, a JSON-RPC error otherwise."""
    if method == "tools/call":
        payload: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id,
                                   "result": {"content": [{"type": "text", "text": message}], "isError": True}}
    else:
        payload = {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32000, "message": message}}
    await _send_json(send, 200, payload, {"Retry-After": retry_after} if retry_after else {})


class LimitMiddleware:
    """See the module docstring. ``settings`` gives the limits; the admin token is resolved on first use."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.rates = TokenBuckets(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.auth_failures = TokenBuckets(settings.auth_failures_per_s, settings.auth_failures_burst)
        self.max_calls = settings.mcp_max_concurrent_calls
        self.in_flight: dict[str, int] = {}

    @staticmethod
    def _is_admin(scope: Scope, token: str) -> bool:
        """The admin token is exempt from the rate limit (checked by the service's token store)."""
        app = scope.get("app")
        service = getattr(getattr(app, "state", None), "service", None)
        tokens = getattr(service, "tokens", None)
        return tokens is not None and bool(tokens.is_admin_secret(token))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in _EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        token = _bearer(headers)
        client = scope.get("client")
        address = f"ip:{client[0] if client else '?'}"
        key = "t:" + hashlib.sha256(token.encode()).hexdigest()[:32] if token else address
        is_mcp_post = path == _MCP_PATH and scope["method"] == "POST"
        method: str | None = None
        request_id: Any = None
        if is_mcp_post:
            receive, body = await _buffer(receive)
            try:
                method, request_id = _json_rpc_call(body)
            except _TooDeep as exc:
                message = f"the message is nested more than {MAX_JSON_DEPTH} levels deep; flatten it"
                if exc.args:  # the request id is known: answer that request (a tool error for a tool call)
                    await _in_band(send, str(exc.args[1]), exc.args[0], message, None)
                else:
                    await _send_json(send, 400, {"jsonrpc": "2.0", "id": None,
                                                 "error": {"code": -32600, "message": message}}, {})
                return
            if method is None:
                # A notification or a response: cheap, and refusing one with an HTTP error would end the
                # client's session (the SDK treats it as fatal), so it is never limited.
                await self.app(scope, receive, send)
                return
        in_session = method is not None and method != "initialize"

        async def refuse(detail: str, retry: float) -> None:
            if in_session:
                await _in_band(send, method or "", request_id, detail, _retry_after(retry))
            else:
                await problem(429, "rate_limited", detail, headers={"Retry-After": _retry_after(retry)})(
                    scope, receive, send)

        if not self.rates.trusted(key):
            wait = self.auth_failures.wait(address)
            if wait > 0:
                await refuse(f"too many failed authentications from this address; retry in {_retry_after(wait)} s",
                             wait)
                return
        if token is None or not self._is_admin(scope, token):
            wait = self.rates.take(key)
            if wait > 0:
                await refuse(f"rate limit exceeded ({self.settings.rate_limit_per_s:g} requests/s per token, "
                             f"bursts of {self.settings.rate_limit_burst}); retry in {_retry_after(wait)} s", wait)
                return
        counted = method == "tools/call"
        if counted:
            running = self.in_flight.get(key, 0)
            if running >= self.max_calls:
                await refuse(f"too many concurrent calls from this agent token (at most {self.max_calls} at once); "
                             "retry when one of your calls has finished", 1.0)
                return
            self.in_flight[key] = running + 1
        try:
            await self._forward(scope, receive, send, key=key, address=address,
                                guard_tool_call=method == "tools/call", request_id=request_id)
        finally:
            if counted:
                left = self.in_flight.get(key, 1) - 1
                if left > 0:
                    self.in_flight[key] = left
                else:
                    self.in_flight.pop(key, None)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, *, key: str, address: str,
                       guard_tool_call: bool, request_id: Any) -> None:
        """Run the app; note 401s against the address and other answers as proof the key works. A tools/call
        the app answers with a 5xx (or an exception) is answered in-band as a retryable tool error instead."""
        state = {"started": False, "swallowed": False}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status == 401:
                    self.auth_failures.take(address)
                elif status < 500:
                    self.rates.trust(key)
                if guard_tool_call and status >= 500:
                    state["swallowed"] = True
                    return
                state["started"] = True
            elif state["swallowed"]:
                return
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if not guard_tool_call or state["started"]:
                raise
            log.error("an MCP tool call failed unexpectedly with %s; answered as a retryable tool error\n%s",
                      type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
            state["swallowed"] = True
        if state["swallowed"] and not state["started"]:
            await _in_band(send, "tools/call", request_id,
                           "agentpg could not complete the call right now (a database or its catalog is "
                           "unavailable, e.g. restarting); retry shortly", "1")


async def _buffer(receive: Receive) -> tuple[Receive, bytes]:
    """Read the whole request body (the body limit outside has bounded it) and a receive that replays it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay, body
