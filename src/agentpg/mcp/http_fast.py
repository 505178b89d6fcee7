"""The hot path of ``/mcp``: ``tools/call``, ``tools/list``, ``ping`` and ``notifications/cancelled`` answered
directly, every other request handed to the SDK's streamable-HTTP transport untouched.

Why: the SDK routes each POST through its session manager, a per-request memory stream into the session's
server task, pydantic validation of the JSON-RPC message and of the result, and back (py-spy: about a third
of ``serve``'s CPU per ``query`` call, ~0.7 ms on this VM even for a ``ping``). The calls an agent makes
all session long are few and simple, so they are answered here with the same :class:`ToolCalls` the SDK's
server runs, and the same wire shapes.

Contract of :meth:`FastPath.serve`: it answers only a POST that the SDK would accept as it stands
(``Content-Type: application/json``, an ``Accept`` that includes ``application/json``, an
``MCP-Protocol-Version`` that is absent or supported) whose body is ONE JSON-RPC 2.0 message: a request
for ``tools/call`` (``params.name`` a string, ``params.arguments`` an object or absent), ``tools/list`` or
``ping`` with a string or integer id, or a ``notifications/cancelled``. A body that is not one well-formed
JSON-RPC message (not JSON, a batch, an id that is not a string or an integer, ...) is refused here, 400 with
the JSON-RPC error :mod:`agentpg.mcp.envelope` finds (the SDK would take an object id for a notification
and answer 202, or quote pydantic). Anything else (``initialize``, other notifications, client responses,
GET, DELETE, headers the SDK refuses) is handed on with its body replayed, so those answers are the SDK's.
The SDK server runs stateless (no ``Mcp-Session-Id``): the bearer
token, checked on every request before this runs, is what identifies the caller.

Cancellation: a ``notifications/cancelled`` cancels the in-flight ``tools/call`` with that request id *of
the same token* (the statement is cancelled in Postgres as the call unwinds); that call's POST is answered
with JSON-RPC error -32800 "request cancelled", which a client that cancelled ignores.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mcp import types
from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import HTTPConnection
from starlette.types import Message, Receive, Scope, Send

from agentpg.mcp import envelope
from agentpg.mcp.server import ToolCalls
from agentpg.tokens import Principal

RequestId = str | int
#: JSON-RPC error code for a request the client cancelled (as LSP defines it; MCP leaves it open).
REQUEST_CANCELLED = -32800
_HOT_REQUESTS = frozenset({"tools/call", "tools/list", "ping"})


class FastPath:
    """Answers the hot MCP requests of one app (see the module docstring). Create it in the app's lifespan."""

    def __init__(self, calls: ToolCalls, tool_list: list[types.Tool]) -> None:
        self._calls = calls
        self._tools_result = {"tools": [t.model_dump(by_alias=True, exclude_none=True, mode="json")
                                        for t in tool_list]}
        self._in_flight: dict[tuple[str | None, str], asyncio.Task[dict[str, Any]]] = {}

    async def serve(self, scope: Scope, receive: Receive, send: Send, principal: Principal) -> Receive | None:
        """Answer the request if it is a hot one and return ``None``; else return the ``receive`` to hand on
        (it replays whatever body was read here)."""
        if scope["method"] != "POST" or not _headers_acceptable(scope):
            return receive
        body, complete = await _read_body(receive)
        replay = _replaying(body, receive)
        if not complete:
            return replay
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting too deep
            await _refuse(send, envelope.Problem(None, types.PARSE_ERROR, envelope.NOT_JSON))
            return None
        problem = envelope.problem(message)
        if problem is not None:
            await _refuse(send, problem)
            return None
        method = message.get("method")
        params = message.get("params") or {}
        if method == "notifications/cancelled" and "id" not in message:
            self._cancel(principal, params.get("requestId"))
            await _respond(send, 202, b"")
            return None
        request_id = message.get("id")
        if method not in _HOT_REQUESTS or not _is_request_id(request_id):
            return await _handed_on(message, replay, send)
        if method == "ping":
            result: dict[str, Any] = {}
        elif method == "tools/list":  # the workspace's choice of tools (issue 20)
            result = await self._calls.tools_result(HTTPConnection(scope))
        else:
            name, arguments = params.get("name"), params.get("arguments")
            if not isinstance(name, str) or not (arguments is None or isinstance(arguments, dict)):
                await _refuse(send, envelope.Problem(request_id, types.INVALID_PARAMS, envelope.BAD_CALL))
                return None
            outcome = await self._call(principal, request_id, name, arguments, HTTPConnection(scope))
            if outcome is None:
                await _respond(send, 200, _encode({"jsonrpc": "2.0", "id": request_id, "error": {
                    "code": REQUEST_CANCELLED, "message": "request cancelled"}}))
                return None
            result = outcome
        await _respond(send, 200, _encode({"jsonrpc": "2.0", "id": request_id, "result": result}))
        return None

    async def _call(self, principal: Principal, request_id: RequestId, name: str, arguments: dict[str, Any] | None,
                    connection: HTTPConnection) -> dict[str, Any] | None:
        """The call's wire result, or ``None`` if the client cancelled it."""
        key = (principal.token_id, json.dumps(request_id))
        task = asyncio.ensure_future(self._calls.call(name, arguments, connection))
        self._in_flight[key] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # this request itself is being cancelled
                raise
            return None
        finally:
            if self._in_flight.get(key) is task:
                del self._in_flight[key]

    def _cancel(self, principal: Principal, request_id: Any) -> None:
        if _is_request_id(request_id):
            task = self._in_flight.get((principal.token_id, json.dumps(request_id)))
            if task is not None:
                task.cancel()


_is_request_id = envelope.is_request_id


async def _handed_on(message: dict[str, Any], replay: Receive, send: Send) -> Receive | None:
    """``replay`` if the SDK's model takes the message as what :func:`envelope.problem` found it to be, else
    refuse it here. Belt and braces (the hand checks are the stricter), so that no validation text of the
    SDK's (pydantic's) ever reaches a client; only messages handed on pay for it, not the hot ones."""
    try:
        root = types.JSONRPCMessage.model_validate(message).root
    except ValidationError:
        root = None
    if "method" not in message:
        accepted = isinstance(root, types.JSONRPCResponse | types.JSONRPCError)
    else:
        accepted = isinstance(root, types.JSONRPCRequest if "id" in message else types.JSONRPCNotification)
    if accepted:
        return replay
    await _refuse(send, envelope.Problem(message.get("id") if _is_request_id(message.get("id")) else None,
                                         types.INVALID_REQUEST, envelope.NOT_A_MESSAGE))
    return None


async def _refuse(send: Send, problem: envelope.Problem) -> None:
    """A malformed message: 400 (as the SDK answers what it cannot parse) with the JSON-RPC error."""
    await _respond(send, 400, _encode(problem.response()))


def _headers_acceptable(scope: Scope) -> bool:
    """What the SDK's transport checks before it reads a POST (else it answers 4xx itself)."""
    content_type = accept = b""
    version: bytes | None = None
    for key, value in scope["headers"]:
        if key == b"content-type":
            content_type = value
        elif key == b"accept":
            accept = value
        elif key == b"mcp-protocol-version":
            version = value
    if content_type.split(b";")[0].strip() != b"application/json":
        return False
    if not any(part.strip().startswith(b"application/json") for part in accept.split(b",")):
        return False
    return version is None or version.decode("latin-1") in SUPPORTED_PROTOCOL_VERSIONS


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request body, and whether it is complete (False if the client went away mid-body)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that first hands out ``body`` again, then whatever ``receive`` brings."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
