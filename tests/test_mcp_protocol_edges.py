"""Malformed JSON-RPC on both MCP transports (issue 17, class 9): every message that is not one well-formed
request, notification or response gets the JSON-RPC error the spec asks for, in plain words: never a 202
with no body (the SDK takes ``{"id": {...}, "method": "ping"}`` for a notification), never the validation
library's wording, never a traceback. Over real HTTP on loopback (``/mcp`` of a live ``agentpg serve`` app)
and over the real ``agentpg mcp`` on pipes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import types
from mcp_support import INIT, MCP_HEADERS, Tenants, live_server, mcp_answer
from test_mcp_jsonrpc import agentpg_mcp, error_code

from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

PING = {"jsonrpc": "2.0", "method": "ping"}
DEEP = 0
"""Code of the answer to JSON nested too deep: the REST side's body check refuses it over HTTP (-32600,
"nested more than 64 levels deep"), the stdio loop as unparseable (-32700); the words must say so."""
#: (what is sent, JSON-RPC error code, the id the error must carry, words its message must contain)
CASES: list[tuple[str, Any, int, int | str | None, str]] = [
    ("object id", {**PING, "id": {"a": 1}}, types.INVALID_REQUEST, None, "id must be a string or an integer"),
    ("array id", {**PING, "id": [1]}, types.INVALID_REQUEST, None, "not an array"),
    ("boolean id", {**PING, "id": True}, types.INVALID_REQUEST, None, "not a boolean"),
    ("fractional id", {**PING, "id": 1.5}, types.INVALID_REQUEST, None, "not a floating-point number"),
    ("float id", {**PING, "id": 2.0}, types.INVALID_REQUEST, None, "not a floating-point number"),
    ("null id", {**PING, "id": None}, types.INVALID_REQUEST, None, "not null"),
    ("missing method", {"jsonrpc": "2.0", "id": 7}, types.INVALID_REQUEST, 7, "needs a method"),
    ("method not a string", {"jsonrpc": "2.0", "id": "m", "method": 5}, types.INVALID_REQUEST, "m",
     "method must be a string"),
    ("wrong jsonrpc version", {"jsonrpc": "1.0", "id": 9, "method": "ping"}, types.INVALID_REQUEST, 9,
     '"jsonrpc" must be "2.0"'),
    ("no jsonrpc member", {"id": 10, "method": "ping"}, types.INVALID_REQUEST, 10, '"jsonrpc" must be "2.0"'),
    ("params an array", {"jsonrpc": "2.0", "id": 11, "method": "tools/list", "params": [1]},
     types.INVALID_PARAMS, 11, "params must be an object"),
    ("notification with array params", {"jsonrpc": "2.0", "method": "notifications/x", "params": [1]},
     types.INVALID_PARAMS, None, "params must be an object"),
    ("response with an object id", {"jsonrpc": "2.0", "id": {}, "result": {}}, types.INVALID_REQUEST, None,
     "id must be a string or an integer"),
    ("response with a result and an error", {"jsonrpc": "2.0", "id": 12, "result": {}, "error": {}},
     types.INVALID_REQUEST, 12, "exactly one of result and error"),
    ("empty batch", [], types.INVALID_REQUEST, None, "an empty batch"),
    ("batch", [{**PING, "id": 1}, {**PING, "id": 2}], types.INVALID_REQUEST, None, "batches are not supported"),
    ("batch with invalid members", [1, {"id": {}}, "x"], types.INVALID_REQUEST, None, "batches are not supported"),
    ("a bare string", "ping", types.INVALID_REQUEST, None, "must be a JSON object"),
    ("not JSON", b"this is not json", types.PARSE_ERROR, None, "not valid JSON"),
    ("truncated JSON", b'{"jsonrpc": "2.0", "id": 1, "method": ', types.PARSE_ERROR, None, "not valid JSON"),
    ("not UTF-8", b'{"jsonrpc": "2.0", "id": "\xff", "method": "ping"}', types.PARSE_ERROR, None, "not valid JSON"),
    ("nested too deep", b"[" * 100_000 + b"]" * 100_000, DEEP, None, "nested"),
]
#: What no answer may contain: the validation library's (pydantic's) or the SDK's internals, a traceback.
INTERNALS = ("Input should", "pydantic", "JSONRPC", "validation error", "Validation error", "Traceback",
             "errors.pydantic.dev", "server-error", "Expecting value")


def _body(sent: Any) -> bytes:
    return sent if isinstance(sent, bytes) else json.dumps(sent).encode()


def _assert_plain(answer: dict[str, Any], code: int, request_id: int | str | None, words: str) -> None:
    assert answer["jsonrpc"] == "2.0" and answer["id"] == request_id and "result" not in answer, answer
    assert answer["error"]["code"] == code or (code == DEEP and answer["error"]["code"] in (
        types.INVALID_REQUEST, types.PARSE_ERROR)), answer
    assert words in answer["error"]["message"] or (code == DEEP and "not valid JSON" in
                                                   answer["error"]["message"]), answer
    assert not any(bad in json.dumps(answer) for bad in INTERNALS), answer


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})) as url:
        yield url


@pytest.mark.parametrize(("sent", "code", "request_id", "words"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
async def test_http_answers_malformed_messages_with_a_jsonrpc_error(
        base_url: str, tenants: Tenants, sent: Any, code: int, request_id: int | str | None, words: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(f"{base_url}/mcp", content=_body(sent),
                                   headers={**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"})
    assert answer.status_code == 400, (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/json")
    _assert_plain(answer.json(), code, request_id, words)


async def test_http_well_formed_messages_are_still_served(base_url: str, tenants: Tenants) -> None:
    """The checks refuse nothing valid: requests (string, integer and negative ids), notifications and a
    client's responses, hot or handed on to the SDK; and the SDK's own errors stay plain too."""
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {tenants.token_a}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        url = f"{base_url}/mcp"
        for request_id in ("p", 0, -3, 2**53):
            pong = await client.post(url, json={**PING, "id": request_id})
            assert pong.status_code == 200 and mcp_answer(pong) == {"jsonrpc": "2.0", "id": request_id, "result": {}}
        null_params = await client.post(url, json={**PING, "id": 1, "params": None})
        assert null_params.status_code == 200 and mcp_answer(null_params)["result"] == {}
        opened = await client.post(url, json=INIT)
        assert opened.status_code == 200 and mcp_answer(opened)["result"]["serverInfo"]["name"] == "agentpg"
        for accepted in ({"jsonrpc": "2.0", "method": "notifications/initialized"},
                         {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 404}},
                         {"jsonrpc": "2.0", "id": 99, "result": {}},
                         {"jsonrpc": "2.0", "id": 98, "error": {"code": -1, "message": "no"}}):
            answer = await client.post(url, json=accepted)
            assert answer.status_code == 202 and answer.content == b"", (accepted, answer.text)
        unknown = await client.post(url, json={"jsonrpc": "2.0", "id": 6, "method": "nope/x"})
        assert mcp_answer(unknown)["id"] == 6 and mcp_answer(unknown)["error"]["code"] in (
            types.METHOD_NOT_FOUND, types.INVALID_PARAMS), unknown.text
        assert not any(bad in unknown.text for bad in INTERNALS), unknown.text
        bad_call = await client.post(url, json={"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                                                "params": {"name": "query", "arguments": [1]}})
        assert bad_call.status_code == 400, bad_call.text
        _assert_plain(bad_call.json(), types.INVALID_PARAMS, 5, "tools/call needs a string name")


async def test_stdio_answers_malformed_messages_with_a_jsonrpc_error(agentpg_home: Path, tenants: Tenants) -> None:
    async with agentpg_mcp(agentpg_home, tenants.token_a, 5) as (client, _):
        await client.initialize()
        for name, sent, code, request_id, words in CASES:
            await client.send(sent + b"\n" if isinstance(sent, bytes) else sent)
            answer = await client.receive()
            assert error_code(answer) < 0, (name, answer)
            _assert_plain(answer, code, request_id, words)
            # The session goes on: the next request is answered normally.
            assert (await client.request(f"after {name}", "ping"))["result"] == {}, name
