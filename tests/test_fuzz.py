"""Issue 7 item 6: hypothesis-driven fuzzing of REST bodies and MCP tool arguments.

Odd unicode, NUL bytes, huge strings, wrong JSON types and deeply nested JSON: the REST API answers a 4xx
problem (never a 5xx), MCP answers a tool error or a JSON-RPC error (never a 5xx, never a dead session), and
nothing changes (users, the tenant's tables and rows). Example counts are bounded (``AGENTPG_FUZZ_EXAMPLES``,
default 40 per test) and derandomized, so the default run is quick and repeatable; raise it for a long run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from helpers import global_uri
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp_support import MCP_HEADERS, Tenants, live_server, make_tenants

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

EXAMPLES = int(os.environ.get("AGENTPG_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

_ODD = st.sampled_from(["\x00", "\u202e", "\ufeff", "\U0001f600", "\u200b", "'", '"',
                        ";", "--", "$1", "%s", "\\", "\n", "é", "\u3000", "\uffff", "a" * 70_000])
text_values = st.one_of(st.text(max_size=40), st.builds(lambda a, b: a + b, st.text(max_size=10), _ODD))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), text_values)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
#: A user id is 1-128 of [A-Za-z0-9._:@-] starting with a letter or digit; these never are.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
bad_ids = st.one_of(json_values.filter(lambda v: not (isinstance(v, str) and _ID.fullmatch(v))))


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth



def _snapshot(api_client: Any, uri: str, admin_h: dict[str, str]) -> tuple[Any, ...]:
    users = api_client.get("/api/users", params={"limit": 500}, headers=admin_h).json()["items"]
    with psycopg.connect(uri) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
        rows = conn.execute("SELECT count(*), sum(id) FROM victims").fetchone()
    return sorted(u["id"] for u in users), tables, rows


def _is_4xx_problem(response: Any) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == response.status_code and body["code"] and body["detail"]


def test_rest_bodies_are_refused_cleanly(api_client: Any, victims: tuple[str, str, dict[str, str]]) -> None:
    user, uri, admin_h = victims
    before = _snapshot(api_client, uri, admin_h)

    @FUZZ
    @given(user_id=bad_ids, extra=st.dictionaries(st.text(max_size=6), json_values, max_size=2),
           email=json_values)
    def register(user_id: Any, extra: dict[str, Any], email: Any) -> None:
        body = {"id": user_id, "email": email, **{k: v for k, v in extra.items() if k not in ("id", "email")}}
        _is_4xx_problem(api_client.post("/api/users", json=body, headers=admin_h))

    @FUZZ
    @given(body=st.one_of(json_values, st.fixed_dictionaries(
        {"table": json_values}, optional={"limit": json_values, "offset": json_values, "order_by": json_values,
                                          "columns": json_values})))
    def query(body: Any) -> None:
        response = api_client.post(f"/api/users/{user}/global-database/query", json=body, headers=admin_h)
        if response.status_code != 200:  # a body that happens to be a valid read is fine: reads change nothing
            _is_4xx_problem(response)

    @FUZZ
    @given(name=text_values, value=json_values)
    def env(name: str, value: Any) -> None:
        if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,127}", name) and isinstance(value, str) and "\x00" not in value:
            value = {"not": "text"}
        response = api_client.put(f"/api/users/{user}/env/{quote(name[:300], safe='')}", json={"value": value},
                                  headers=admin_h)
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])

    @FUZZ
    @given(raw=st.one_of(st.binary(max_size=200), st.sampled_from([
        deep(100_000).encode(), b'{"id": ' + deep(5000).encode() + b"}", b'{"id": "\\u0000"}', b"\xff\xfe",
        b'{"id": "a", "id": 1}', b"null", b"[]", b'"' + b"x" * 500_000 + b'"'])))
    def raw_bodies(raw: bytes) -> None:
        for path in ("/api/users", f"/api/users/{user}/global-database/query", f"/api/users/{user}/tokens"):
            response = api_client.post(path, content=raw, headers={**admin_h, "Content-Type": "application/json"})
            if path.endswith("/tokens") and response.status_code == 201:
                continue  # {} or null may be a valid token request: nothing the fuzz checks
            _is_4xx_problem(response)

    register()
    query()
    env()
    raw_bodies()
    after = _snapshot(api_client, uri, admin_h)
    assert after == before


@pytest.fixture(scope="module")
def mcp_target(runtime: Runtime, settings: Settings) -> Iterator[tuple[Tenants, str, str]]:
    t = make_tenants(runtime)
    with psycopg.connect(global_uri(runtime, t.user1), autocommit=True) as conn:
        conn.execute("CREATE TABLE victims (id int PRIMARY KEY, name text)")
        conn.execute("INSERT INTO victims VALUES (1, 'a'), (2, 'b')")
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0,
                                                 "mcp_statement_timeout_s": 2.0})) as url:
        yield t, url, global_uri(runtime, t.user1)
    runtime.service.delete_user(t.user1)
    runtime.service.delete_user(t.user2)


def _mcp_session(client: httpx.Client, url: str) -> dict[str, str]:
    """Initialize; the headers later requests carry (the session id, if the server issued one)."""
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "f", "version": "1"}}}
    response = client.post(f"{url}/mcp", json=init, headers=MCP_HEADERS)
    assert response.status_code == 200, response.text
    session = {"mcp-session-id": response.headers["mcp-session-id"]} if "mcp-session-id" in response.headers else {}
    client.post(f"{url}/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers={**MCP_HEADERS, **session})
    return session


def _mcp_catalog(uri: str) -> tuple[Any, ...]:
    with psycopg.connect(uri) as conn:
        tables = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
        rows = conn.execute("SELECT count(*), sum(id) FROM victims").fetchone()
    return tables, rows


_SQLISH = st.one_of(text_values, st.sampled_from([
    "DROP TABLE victims", "DELETE FROM victims", "SELECT 1; DROP TABLE victims", "COMMIT", "SET ROLE postgres",
    "COPY victims TO PROGRAM 'id'", "SELECT pg_read_file('/etc/passwd')", "CREATE EXTENSION dblink",
    "SELECT \x00", "SELECT '" + "x" * 200_000 + "'", "UPDATE victims SET id = id + 1 WHERE $1",
    "SELECT " + "(" * 5000 + "1" + ")" * 5000]))


def test_mcp_tool_arguments_are_refused_cleanly(mcp_target: tuple[Tenants, str, str]) -> None:
    tenants, url, uri = mcp_target
    before = _mcp_catalog(uri)
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {tenants.token_b}"}) as client:
        # Agent b may read but not write or drop in user1's global DB, so no fuzzed statement may change it.
        perms = {"can_read": True, "can_write": False, "can_create_tables": False, "can_drop_tables": False,
                 "allowed_tables": None}
        admin_client = httpx.put(f"{url}/api/workspaces/{tenants.ws_b}/global-database-permissions", json=perms,
                                 headers={"Authorization": f"Bearer {tenants.admin_token}"}, timeout=30)
        assert admin_client.status_code == 200, admin_client.text
        session = _mcp_session(client, url)
        counter = iter(range(1, 10**9))

        def call(name: Any, arguments: Any, raw_arguments: str | None = None) -> dict[str, Any]:
            body = json.dumps({"jsonrpc": "2.0", "id": next(counter), "method": "tools/call",
                               "params": {"name": name, "arguments": arguments}})
            if raw_arguments is not None:
                body = body.replace('"arguments": null', '"arguments": ' + raw_arguments)
            response = client.post(f"{url}/mcp", content=body, headers={**MCP_HEADERS, **session})
            assert response.status_code in (200, 400, 413, 422), (response.status_code, response.text[:300])
            if response.status_code != 200:
                return {}
            message = response.json()
            assert "result" in message or "error" in message, message
            rendered = json.dumps(message)
            assert "Traceback" not in rendered and "postgresql://" not in rendered and "apg_" not in rendered
            return dict(message)

        tools = st.sampled_from(["query", "execute", "list_tables", "describe_table", "list_databases"])
        arguments = st.one_of(
            json_values,
            st.fixed_dictionaries({"database": st.one_of(st.sampled_from(["global", "agent"]), json_values),
                                   "sql": _SQLISH},
                                  optional={"params": st.one_of(json_values, st.lists(json_values, max_size=5)),
                                            "max_rows": json_values, "table": json_values,
                                            "schema": json_values}))

        @FUZZ
        @given(name=st.one_of(tools, text_values), args=arguments)
        def fuzz_call(name: Any, args: Any) -> None:
            out = call(name, args)
            if out.get("result", {}).get("isError") is False:
                # Only a read can have succeeded; writes in the global DB are refused by b's grants.
                assert name in ("query", "list_tables", "describe_table", "list_databases") or (
                    isinstance(args, dict) and args.get("database") == "agent"), (name, args, out)

        fuzz_call()
        # Deeply nested JSON: as the arguments themselves, and as one parameter (too deep for the parser,
        # and parseable but deep).
        for depth in (200, 5_000, 100_000):
            call("query", None, raw_arguments=deep(depth))
            call("query", None, raw_arguments='{"database": "global", "sql": "SELECT $1", "params": ['
                                              + deep(depth) + "]}")
        # The session still works.
        good = call("query", {"database": "global", "sql": "SELECT count(*) FROM victims"})
        assert good["result"]["isError"] is False and good["result"]["structuredContent"]["rows"] == [[2]]
    assert _mcp_catalog(uri) == before
