"""The JSON-RPC 2.0 envelope of one MCP message, checked by hand, with errors in plain words.

Both transports (:mod:`agentpg.mcp.http` for ``/mcp``, :mod:`agentpg.mcp.jsonrpc` for stdio) run
:func:`problem` on every parsed message before anything else looks at it, so a malformed message gets the
JSON-RPC error the spec asks for instead of being mistaken for a notification (the SDK's message union
accepts ``{"id": {...}, "method": "ping"}`` as a notification and answers 202 with no body) or answered
with the validation library's own wording.

The rules (JSON-RPC 2.0, narrowed as MCP narrows it):

- one JSON object per message. A batch (a JSON array) is refused with -32600: MCP 2025-06-18 removed
  JSON-RPC batching, the SDK never accepted it, and agentpg speaks the versions the SDK speaks. An empty
  array is -32600 too, as JSON-RPC says.
- ``id`` (when present) is a string or an integer: MCP forbids null, and the SDK refuses fractions and
  booleans. When the id is not one, the error's id is null (JSON-RPC: "if there was an error in detecting
  the id"); otherwise the error carries it.
- ``"jsonrpc": "2.0"``; ``method`` a string; ``params`` absent, null or an object (MCP uses named params
  only: an array is -32602).
- a message without ``method`` is a response: it needs an id and exactly one of ``result`` (an object) or
  ``error`` (an object with an integer ``code`` and a string ``message``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeGuard

from mcp import types

RequestId = str | int

BATCH_REFUSED = ("Invalid Request: batches are not supported (MCP removed JSON-RPC batching in protocol "
                 "version 2025-06-18); send one message at a time")
EMPTY_BATCH = "Invalid Request: an empty batch; send one JSON-RPC message at a time"
NOT_JSON = "Parse error: the message is not valid JSON"
NOT_A_MESSAGE = "Invalid Request: not a JSON-RPC 2.0 request, notification or response"
BAD_CALL = "Invalid params: tools/call needs a string name and an object of arguments"


class Problem(NamedTuple):
    """The JSON-RPC error to answer a malformed message with."""

    id: RequestId | None
    code: int
    message: str

    def response(self) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": self.id, "error": {"code": self.code, "message": self.message}}


def is_request_id(value: Any) -> TypeGuard[RequestId]:
    """A JSON-RPC request id MCP allows: a string or an integer (not a bool, not a fraction, not null)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def problem(message: Any) -> Problem | None:
    """``None`` if ``message`` (parsed JSON) is one well-formed request, notification or response; else the
    error to answer it with (see the module docstring)."""
    if isinstance(message, list):
        return Problem(None, types.INVALID_REQUEST, BATCH_REFUSED if message else EMPTY_BATCH)
    if not isinstance(message, dict):
        return Problem(None, types.INVALID_REQUEST, "Invalid Request: a message must be a JSON object")
    has_id = "id" in message
    request_id = message.get("id")
    if has_id and not is_request_id(request_id):
        return Problem(None, types.INVALID_REQUEST, f"Invalid Request: id must be a string or an integer, "
                                                    f"not {_kind(request_id)}")
    known_id = request_id if is_request_id(request_id) else None
    if message.get("jsonrpc") != "2.0":
        return Problem(known_id, types.INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"')
    if "method" in message:
        if not isinstance(message["method"], str):
            return Problem(known_id, types.INVALID_REQUEST, "Invalid Request: method must be a string")
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            return Problem(known_id, types.INVALID_PARAMS, "Invalid params: params must be an object")
        return None
    if not has_id:
        return Problem(None, types.INVALID_REQUEST, "Invalid Request: a message needs a method (a request or a "
                                                    "notification), or an id and a result or an error (a response)")
    if ("result" in message) == ("error" in message):
        return Problem(known_id, types.INVALID_REQUEST, "Invalid Request: a request needs a method; a response "
                                                        "needs exactly one of result and error")
    if "result" in message and not isinstance(message["result"], dict):
        return Problem(known_id, types.INVALID_REQUEST, "Invalid Request: a response's result must be an object")
    error = message.get("error", {"code": 0, "message": ""})
    if not (isinstance(error, dict) and is_request_id(error.get("code")) and not isinstance(error["code"], str)
            and isinstance(error.get("message"), str)):
        return Problem(known_id, types.INVALID_REQUEST, "Invalid Request: a response's error must be an object "
                                                        "with an integer code and a string message")
    return None


def call_problem(message: dict[str, Any]) -> Problem | None:
    """For a well-formed ``tools/call`` request: -32602 unless ``params`` has a string ``name`` and an object
    (or no) ``arguments``, in plain words (the SDK would quote its validation library)."""
    params = message.get("params") or {}
    name, arguments = params.get("name"), params.get("arguments")
    if isinstance(name, str) and (arguments is None or isinstance(arguments, dict)):
        return None
    return Problem(message.get("id") if is_request_id(message.get("id")) else None, types.INVALID_PARAMS, BAD_CALL)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a floating-point number"
    if isinstance(value, list):
        return "an array"
    return "an object"
