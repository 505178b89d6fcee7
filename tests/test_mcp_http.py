"""MCP over real streamable HTTP (the SDK's client against ``agentpg serve``'s app on a loopback port), and the
REST routes that go with it: permissions, audit log, MCP config."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from mcp_support import INIT, MCP_HEADERS, Tenants, http_session, live_server, ok, refused, rss_kib, text
from psycopg.conninfo import make_conninfo

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio





@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "mcp_statement_timeout_s": 1.0})) as url:
        yield url


def post_mcp(base_url: str, token: str | None, body: dict[str, Any] = INIT, **headers: str) -> httpx.Response:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{base_url}/mcp", json=body, headers={**MCP_HEADERS, **auth, **headers}, timeout=10)


async def test_tools_are_listed_with_truthful_annotations(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_a) as s:
        tools = {t.name: t for t in (await s.list_tools()).tools}
        out = await ok(s, "query", database="agent", sql="SELECT 1 AS one")
    assert {"columns", "rows", "row_count", "truncated", "duration_ms"} <= set(out)
    assert set(tools) == {"list_databases", "list_tables", "describe_table", "query", "explain", "execute",
                          "checkpoint", "list_checkpoints", "restore"}
    for name in ("list_databases", "list_tables", "describe_table", "query", "explain", "list_checkpoints"):
        assert tools[name].annotations is not None and tools[name].annotations.read_only_hint is True
    execute = tools["execute"].annotations
    assert execute is not None and execute.read_only_hint is False and execute.destructive_hint is True
    restore, checkpoint = tools["restore"].annotations, tools["checkpoint"].annotations
    assert restore is not None and restore.destructive_hint is True  # it replaces the current state
    assert checkpoint is not None and checkpoint.read_only_hint is False and checkpoint.destructive_hint is False
    assert tools["query"].input_schema["properties"]["database"]["enum"] == ["global", "agent"]
    # query/execute return structured content of the documented shape but declare no outputSchema: the SDK
    # client re-validates a declared one with jsonschema on every call (6-10 ms). The other tools keep theirs.
    assert tools["query"].output_schema is None and tools["execute"].output_schema is None
    assert tools["list_tables"].output_schema is not None


async def test_two_agents_share_the_global_database(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    """The design's "Agent A creates customers → Agent B can SELECT" — and only the agent DBs stay apart."""
    async with http_session(base_url, tenants.token_a) as a, http_session(base_url, tenants.token_b) as b:
        await ok(a, "execute", database="global", sql="CREATE TABLE customers (id serial PRIMARY KEY, name text)")
        inserted = await ok(a, "execute", database="global",
                            sql="INSERT INTO customers (name) VALUES ($1) RETURNING id", params=["ada"])
        assert inserted["rows"] == [[1]] and inserted["rows_affected"] == 1
        assert (await ok(b, "query", database="global", sql="SELECT name FROM customers"))["rows"] == [["ada"]]
        written = await ok(b, "execute", database="global", sql="INSERT INTO customers (name) VALUES ($1), ($2)",
                           params=["grace", None])
        assert written["command"] == "INSERT 0 2" and written["rows_affected"] == 2
        counted = await ok(a, "query", database="global", sql="SELECT count(*) AS n FROM customers")
        assert counted["rows"] == [[3]] and counted["columns"] == [{"name": "n", "type": "int8"}]
        described = await ok(b, "describe_table", database="global", table="customers")
        assert described["primary_key"] == ["id"] and [c["name"] for c in described["columns"]] == ["id", "name"]
        # Agent databases: each its own.
        await ok(a, "execute", database="agent", sql="CREATE TABLE orders (id int)")
        assert [t["name"] for t in (await ok(a, "list_tables", database="agent"))["tables"]] == ["orders"]
        assert (await ok(b, "list_tables", database="agent"))["tables"] == []
        assert "does not exist" in await refused(b, "query", database="agent", sql="SELECT * FROM orders")
    glob = runtime.service.get_user(tenants.user1).global_database
    assert glob is not None
    with psycopg.connect(make_conninfo(runtime.admin_dsn, dbname=glob.name)) as conn:
        owner = conn.execute("SELECT r.rolname, r.rolcanlogin FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
                             " WHERE c.relname = 'customers'").fetchone()
    assert owner is not None and owner[0].endswith("_owner") and owner[1] is False  # not agent A: nobody logs in
    async with http_session(base_url, tenants.token_c) as c:  # another user's agent sees none of it
        assert (await ok(c, "list_tables", database="global"))["tables"] == []
        assert "does not exist" in await refused(c, "query", database="global", sql="SELECT * FROM customers")


async def test_no_tool_argument_reaches_another_database(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    other_global = runtime.service.get_user(tenants.user2).global_database
    other_agent = runtime.service.get_workspace(tenants.ws_b).database
    assert other_global is not None and other_agent is not None
    async with http_session(base_url, tenants.token_a) as s:
        for database in ("postgres", other_global.name, other_agent.name, "GLOBAL", "", "global;", "agent "):
            message = await refused(s, "query", database=database, sql="SELECT 1")
            assert "Input should be 'global' or 'agent'" in message
        for extra in ({"dsn": "postgresql://x"}, {"host": "127.0.0.1"}, {"user": "postgres"}):
            assert "Extra inputs are not permitted" in await refused(s, "query", database="global", sql="SELECT 1",
                                                                     **extra)
        for name in (other_global.name, other_agent.name):
            message = await refused(s, "query", database="global", sql=f'SELECT * FROM "{name}".public.customers')
            assert "cross-database references are not implemented" in message
        assert "cross-database" in await refused(s, "describe_table", database="global",
                                                 table=f'"{other_global.name}".public.customers')
        reach = f"SELECT * FROM dblink('dbname={other_global.name}', 'SELECT 1') AS t(x int)"
        assert "dblink() is not allowed" in await refused(s, "query", database="agent", sql=reach)


async def test_http_auth_host_and_origin(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    response = post_mcp(base_url, None)
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")
    assert post_mcp(base_url, "apg_g_not-a-token").status_code == 401
    for token in (tenants.user1_token, tenants.admin_token):
        response = post_mcp(base_url, token)
        assert response.status_code == 403 and "agent tokens" in response.json()["error_description"]
    assert post_mcp(base_url, tenants.token_a, Host="evil.example:8080").status_code == 421
    assert post_mcp(base_url, tenants.token_a, Host="localhost:1@evil.example").status_code == 421
    assert post_mcp(base_url, tenants.token_a, Origin="http://evil.example").status_code == 403
    port = base_url.rsplit(":", 1)[1]
    opened = post_mcp(base_url, tenants.token_a, Origin=f"http://localhost:{port}")
    assert opened.status_code == 200
    # Stateless: no session to ride on; each request is whoever its own token says, checked every time.
    assert "mcp-session-id" not in opened.headers
    tools_list = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    headers = {"Mcp-Protocol-Version": "2025-06-18"}
    issued = runtime.service.issue_agent_token(tenants.ws_a)
    assert post_mcp(base_url, issued.secret, tools_list, **headers).status_code == 200
    runtime.service.revoke_token(issued.id)  # a revocation stops the very next request
    assert post_mcp(base_url, issued.secret, tools_list, **headers).status_code == 401
    query = {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
             "params": {"name": "query", "arguments": {"database": "agent", "sql": "SELECT 1"}}}
    assert post_mcp(base_url, issued.secret, query, **headers).status_code == 401


async def test_generate_series_is_truncated_and_memory_stays_flat(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_a) as s:
        await ok(s, "query", database="agent", sql="SELECT generate_series(1, 100000)")  # warm-up
        before = rss_kib()
        result = await s.call_tool("query", {"database": "agent", "sql": "SELECT generate_series(1, 10000000)"})
        grown = rss_kib() - before
        out = result.structured_content
        assert not result.is_error and out is not None
        assert out["row_count"] == 500 and out["truncated"] is True and out["rows"][-1] == [500]
        assert "TRUNCATED" in text(result)
        print(f"RSS growth for SELECT generate_series(1, 10000000): {grown} KiB")
        assert grown < 5 * 1024, f"RSS grew by {grown} KiB"
        fewer = await ok(s, "query", database="agent", sql="SELECT generate_series(1, 50)", max_rows=10)
        assert fewer["row_count"] == 10 and fewer["truncated"] is True
        # A write returning more rows than the cap still runs whole; the surplus rows are not kept.
        await ok(s, "execute", database="agent", sql="CREATE TABLE big (x int)")
        written = await ok(s, "execute", database="agent",
                           sql="INSERT INTO big SELECT generate_series(1, 20000) RETURNING x")
        assert written["row_count"] == 500 and written["truncated"] and written["rows_affected"] == 20000
        assert (await ok(s, "query", database="agent", sql="SELECT count(*) FROM big"))["rows"] == [[20000]]


async def test_errors_are_clear_and_leak_nothing(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_a) as s:
        assert "Syntax error" in await refused(s, "query", database="agent", sql="SELEC 1")
        message = await refused(s, "query", database="global", sql="SELECT * FROM nowhere")
        assert 'relation "nowhere" does not exist' in message and "SQLSTATE 42P01" in message
        # Internal names in the server's messages are replaced by words (refused() also checks for "apg_").
        message = await refused(s, "execute", database="global", sql="CREATE SCHEMA mine")
        assert "permission denied for database this database" in message
        message = await refused(s, "query", database="global",
                                sql="SELECT pg_has_role(current_user, 'apg_0123456789abcdef_owner', 'member')")
        assert "role an internal name does not exist" in message
        rows = await ok(s, "query", database="global", sql="SELECT $1::int + 1 AS n, $2::jsonb ->> 'k' AS k",
                        params=[41, {"k": "v"}])
        assert rows["rows"] == [[42, "v"]]
        percent = await ok(s, "query", database="agent", sql="SELECT '100%s' AS p, $1 LIKE 'a%' AS q", params=["abc"])
        assert percent["rows"] == [["100%s", True]]  # % is never a placeholder
        assert "unknown tool" in await refused(s, "drop_everything")


async def test_rest_permissions_route(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    url = f"{base_url}/api/workspaces/{tenants.ws_b}/global-database-permissions"

    def put(token: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.put(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    assert put(tenants.user2_token, {"can_write": False}).status_code == 404  # another user's workspace
    assert put(tenants.token_b, {"can_write": False}).status_code == 403  # agents cannot change their rights
    assert put(tenants.user1_token, {"can_drop_tables": True, "allowed_tables": ["x"]}).status_code == 422
    assert put(tenants.user1_token, {"can_drop_tables": True, "can_read": False}).status_code == 422
    response = put(tenants.user1_token, {"can_write": False})
    assert response.status_code == 200 and response.json()["can_write"] is False
    got = httpx.get(url, headers={"Authorization": f"Bearer {tenants.admin_token}"}, timeout=10).json()
    assert got == {"can_read": True, "can_write": False, "can_create_tables": True, "can_drop_tables": False,
                   "allowed_tables": None}
    async with http_session(base_url, tenants.token_b) as s:
        assert "can_write is false" in await refused(s, "execute", database="global",
                                                     sql="UPDATE customers SET name = upper(name)")
        assert (await ok(s, "list_databases"))["databases"][0]["permissions"]["can_write"] is False
    assert put(tenants.admin_token, {}).json()["can_write"] is True  # the defaults again


async def test_audit_log(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_b) as s:
        await ok(s, "query", database="agent", sql="SELECT 'a-secret-literal' AS x, 42 AS y")
        await refused(s, "query", database="global", sql="SELECT 1; SELECT 2")
        await refused(s, "query", database="global", sql="SELECT pg_sleep(5)")
    headers = {"Authorization": f"Bearer {tenants.user1_token}"}
    url = f"{base_url}/api/users/{tenants.user1}/audit"
    page = httpx.get(url, params={"workspace_id": tenants.ws_b, "limit": 3}, headers=headers, timeout=10).json()
    timeout, refusal, read = page["items"]
    assert (read["tool"], read["database"], read["outcome"], read["rows"]) == ("query", "agent", "ok", 1)
    assert "a-secret-literal" not in json.dumps(page) and "42" not in read["statement"]
    assert read["statement"] == "SELECT $1 AS x, $2 AS y" and read["fingerprint"]
    assert (refusal["outcome"], refusal["error"]) == ("refused", "multiple_statements")
    assert (timeout["outcome"], timeout["error"]) == ("timeout", "57014 QueryCanceled")
    assert all(item["workspace_id"] == tenants.ws_b for item in page["items"])
    older = httpx.get(url, params={"workspace_id": tenants.ws_b, "limit": 3, "cursor": page["next_cursor"]},
                      headers=headers, timeout=10).json()
    assert older["items"] and max(i["id"] for i in older["items"]) < min(i["id"] for i in page["items"])
    other = {"Authorization": f"Bearer {tenants.user2_token}"}
    assert httpx.get(url, headers=other, timeout=10).status_code == 404
    assert httpx.get(url, headers={"Authorization": f"Bearer {tenants.token_a}"}, timeout=10).status_code == 403


async def test_mcp_config(base_url: str, tenants: Tenants) -> None:
    response = httpx.get(f"{base_url}/api/workspaces/{tenants.ws_a}/mcp-config",
                         headers={"Authorization": f"Bearer {tenants.user1_token}"}, timeout=10)
    assert response.status_code == 200
    server = response.json()["mcpServers"]["agentpg"]
    assert server["url"] == f"{base_url}/mcp"
    assert server["headers"] == {"Authorization": "Bearer <AGENT_TOKEN>"}
    assert "apg_" not in response.text
    assert httpx.get(f"{base_url}/api/workspaces/{tenants.ws_a}/mcp-config",
                     headers={"Authorization": f"Bearer {tenants.user2_token}"}, timeout=10).status_code == 404
