"""Issue 20, item 3: ``explain``, a fuller ``describe_table``, and a per-workspace choice of tools — through
the real MCP SDK client over HTTP against a real ``serve`` app and real Postgres."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from api_support import assert_problem, bearer
from helpers import global_uri, workspace_global_uri
from mcp import Client
from mcp_support import Tenants, http_session, live_server, make_tenants, ok, refused, text

from agentpg.access.explain import bound_plan, summarize
from agentpg.access.permissions import GlobalDbPermissions
from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import QueryLimits, TenantQueries
from agentpg.app.runtime import Runtime
from agentpg.mcp import tools
from agentpg.mcp.jsonrpc import JsonRpcSession
from agentpg.mcp.server import ToolCalls, build_server
from agentpg.service import Service, TenantAccess
from agentpg.service.tool_choice import AGENT_TOOLS
from agentpg.settings import Settings
from agentpg.tokens import Principal

pytestmark = pytest.mark.anyio

READ_ONLY = GlobalDbPermissions(can_read=True, can_write=False, can_create_tables=False)


@pytest.fixture(scope="module")
def tenants(runtime: Runtime) -> Iterator[Tenants]:
    """user1's agents a (defaults) and b; a's global database holds parent/child (a foreign key, a check, an
    index) and a table b will be kept out of."""
    t = make_tenants(runtime)
    with psycopg.connect(global_uri(runtime, t.user1), autocommit=True) as a:
        a.execute("CREATE TABLE parent (id int PRIMARY KEY, code text UNIQUE)")
        a.execute("CREATE TABLE child (id serial PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id) "
                  "ON DELETE CASCADE, qty int CHECK (qty > 0))")
        a.execute("CREATE INDEX child_parent ON child (parent_id)")
        a.execute("INSERT INTO parent SELECT g, 'c' || g FROM generate_series(1, 50) g")
        a.execute("INSERT INTO child (parent_id, qty) SELECT 1 + g % 50, 1 + g % 7 FROM generate_series(1, 200) g")
        a.execute("CREATE TABLE secret (x int)")
    yield t
    runtime.service.delete_user(t.user1)
    runtime.service.delete_user(t.user2)


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as url:
        yield url


def test_every_tool_is_declared_and_choosable() -> None:
    """The service's tool names (what the REST choice accepts) are exactly the MCP edge's tools."""
    assert [t.name for t in tools.tool_list()] == list(AGENT_TOOLS) and set(tools.ARGS) == set(AGENT_TOOLS)


def test_a_large_plan_is_cut_not_dropped() -> None:
    leaf = {"Node Type": "Seq Scan", "Relation Name": "t", "Total Cost": 1.0, "Plan Rows": 1, "Filler": "x" * 500}
    node: dict[str, object] = leaf
    for _ in range(300):  # a deep plan, far over the bound
        node = {"Node Type": "Nested Loop", "Total Cost": 9.0, "Plan Rows": 5, "Plans": [node, leaf]}
    summary = summarize([{"Plan": node}], analyze=False)
    assert summary["plan_truncated"] and summary["seq_scans"] == ["t"] and summary["total_cost"] == 9.0
    assert summary["node_types"] == ["Nested Loop", "Seq Scan"] and not summary["uses_index"]
    small, cut = bound_plan({"Plan": leaf})
    assert not cut and small == {"Plan": leaf}


async def test_explain_shows_index_use_and_never_runs_a_write(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_a) as a:
        await ok(a, "execute", database="agent", sql="CREATE TABLE items (id int, tag text)")
        await ok(a, "execute", database="agent",
                 sql="INSERT INTO items SELECT g, 't' || (g % 10) FROM generate_series(1, 5000) g")
        await ok(a, "execute", database="agent", sql="ANALYZE items")
        lookup = "SELECT * FROM items WHERE id = $1"
        before = await ok(a, "explain", database="agent", sql=lookup, params=[42])
        assert not before["uses_index"] and before["seq_scans"] == ["items"] and before["total_cost"] > 0
        assert before["estimated_rows"] >= 1 and before["plan"]["Plan"]["Node Type"] == before["node_types"][0]
        await ok(a, "execute", database="agent", sql="CREATE INDEX items_id ON items (id)")
        after = await ok(a, "explain", database="agent", sql=lookup, params=[42])
        assert after["uses_index"] and after["indexes"] == ["items_id"] and after["total_cost"] < before["total_cost"]
        shown = text(await a.call_tool("explain", {"database": "agent", "sql": lookup, "params": [42]}))
        assert "indexes used: items_id" in shown and "nothing was executed" in shown
        analyzed = await ok(a, "explain", database="agent", sql=lookup, params=[42], analyze=True)
        assert analyzed["analyzed"] and analyzed["actual_rows"] == 1 and analyzed["execution_ms"] is not None
        # A write is planned, never executed: the rows are all still there.
        deleting = await ok(a, "explain", database="agent", sql="DELETE FROM items WHERE id > 10")
        assert deleting["node_types"][0] == "ModifyTable" and deleting["command"] == "DELETE"
        assert "executes the statement" in await refused(a, "explain", database="agent",
                                                         sql="DELETE FROM items", analyze=True)
        assert "executes the statement" in await refused(a, "explain", database="agent", analyze=True,
                                                         sql="WITH d AS (DELETE FROM items RETURNING 1) SELECT 1")
        count = await ok(a, "query", database="agent", sql="SELECT count(*) FROM items")
        assert count["rows"] == [[5000]]
        assert "without EXPLAIN" in await refused(a, "explain", database="agent", sql="EXPLAIN SELECT 1")
        assert "no plan" in await refused(a, "explain", database="agent", sql="DROP TABLE items")
        assert "2 statements" in await refused(a, "explain", database="agent", sql="SELECT 1; DELETE FROM items")
        # Errors point into the agent's statement, not agentpg's EXPLAIN prefix.
        assert "(at character 8)" in await refused(a, "explain", database="agent", sql="SELECT nope FROM items")


async def test_explain_follows_the_agents_permissions(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    """b may explain only what it could run in the global database; Postgres' lockdown holds for EXPLAIN."""
    runtime.service.set_agent_permissions(tenants.ws_b, GlobalDbPermissions(
        can_read=True, can_write=False, can_create_tables=False, allowed_tables=["parent", "child"]))
    try:
        async with http_session(base_url, tenants.token_b) as b:
            planned = await ok(b, "explain", database="global",
                               sql="SELECT * FROM child JOIN parent ON parent.id = child.parent_id")
            assert planned["total_cost"] > 0
            assert "may not read secret" in await refused(b, "explain", database="global", sql="SELECT * FROM secret")
            assert "may not write" in await refused(b, "explain", database="global", sql="DELETE FROM parent")
            # Revoked in the shared database (it runs SQL text with the caller's rights): refused by Postgres
            # when the plan is made, as the call itself would be.
            revoked = await refused(b, "explain", database="global",
                                    sql="SELECT query_to_xml('SELECT 1', true, true, '')")
            assert "permission denied for function query_to_xml" in revoked
        # Without agentpg's pre-check, as b's own role: Postgres itself refuses to plan what b may not read.
        with psycopg.connect(workspace_global_uri(runtime, tenants.ws_b), autocommit=True) as own, \
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for table secret"):
            own.execute("EXPLAIN (FORMAT JSON) SELECT * FROM secret")
        # Audited like every call (written behind by the server's own writer: wait for the batch).
        explains: list[str] = []
        for _ in range(200):
            page = runtime.service.list_audit(tenants.user1, workspace_id=tenants.ws_b)
            explains = sorted(e.outcome for e in page.items if e.tool == "explain")
            if len(explains) >= 4:
                break
            await anyio.sleep(0.05)
        assert explains == ["denied", "ok", "refused", "refused"]
    finally:
        runtime.service.set_agent_permissions(tenants.ws_b, GlobalDbPermissions())


async def test_describe_table_keys_indexes_and_own_privileges(runtime: Runtime, base_url: str,
                                                              tenants: Tenants) -> None:
    runtime.service.set_agent_permissions(tenants.ws_b, READ_ONLY)
    try:
        async with http_session(base_url, tenants.token_a) as a, http_session(base_url, tenants.token_b) as b:
            full = await ok(a, "describe_table", database="global", table="child")
            seen = await ok(b, "describe_table", database="global", table="child")
            shown = text(await b.call_tool("describe_table", {"database": "global", "table": "child"}))
    finally:
        runtime.service.set_agent_permissions(tenants.ws_b, GlobalDbPermissions())
    assert full["privileges"] == ["select", "insert", "update", "delete"] and seen["privileges"] == ["select"]
    assert seen["primary_key"] == ["id"]
    indexes = {i["name"]: i for i in seen["indexes"]}
    assert indexes["child_parent"]["columns"] == ["parent_id"] and not indexes["child_parent"]["unique"]
    assert indexes["child_pkey"]["primary"] and indexes["child_pkey"]["unique"]
    assert indexes["child_parent"]["method"] == "btree"
    [fk] = seen["foreign_keys"]
    assert (fk["columns"], fk["references"], fk["referenced_columns"], fk["on_delete"]) == (
        ["parent_id"], "parent", ["id"], "cascade")
    [check] = seen["constraints"]
    assert check["type"] == "check" and check["columns"] == ["qty"] and "qty > 0" in check["definition"]
    assert "index child_parent:" in shown and "foreign key" in shown and "you may: select" in shown
    assert "indexe " not in shown
    async with http_session(base_url, tenants.token_a) as a:
        parent = await ok(a, "describe_table", database="global", table="parent")
    assert [(c["type"], c["columns"]) for c in parent["constraints"]] == [("unique", ["code"])]


async def sdk_server_follows_the_choice(runtime: Runtime, token: str) -> None:
    """The SDK server (stdio without pipes, the gateway's built-in agentpg) lists and refuses the same way."""
    async def identify(_request: object) -> Principal:
        return runtime.service.tokens.authenticate(token)

    queries = TenantQueries(TenantPools(PoolLimits()), QueryLimits())
    try:
        async with Client(build_server(_attached(runtime.service, queries), identify), mode="legacy") as client:
            s = client.session  # in process, over memory streams
            assert {t.name for t in (await s.list_tools()).tools} == {"list_tables", "query"}
            assert "not enabled" in await refused(s, "execute", database="agent", sql="SELECT 1")
    finally:
        await queries.close()


async def stdio_loop_follows_the_choice(runtime: Runtime, token: str) -> None:
    """The stdio JSON-RPC loop (``agentpg mcp``'s) lists and refuses the same way, on a socket pair."""
    async def identify(_request: object) -> Principal:
        return runtime.service.tokens.authenticate(token)

    queries = TenantQueries(TenantPools(PoolLimits()), QueryLimits())
    server_end, client_end = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=server_end)
    session = JsonRpcSession(ToolCalls(_attached(runtime.service, queries), identify), server_reader, server_writer,
                             drain_timeout_s=1)
    serving = asyncio.create_task(session.serve())
    reader, writer = await asyncio.open_connection(sock=client_end)

    async def request(request_id: int, method: str, params: dict[str, object]) -> dict[str, Any]:
        writer.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}).encode()
                     + b"\n")
        answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
        assert answer["id"] == request_id, answer
        result: dict[str, Any] = answer["result"]
        return result

    try:
        await request(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "t", "version": "1"}})
        listed = await request(2, "tools/list", {})
        assert [t["name"] for t in listed["tools"]] == ["list_tables", "query"]
        called = await request(3, "tools/call", {"name": "describe_table",
                                                 "arguments": {"database": "global", "table": "parent"}})
        assert called["isError"] and "not enabled" in json.dumps(called)
    finally:
        writer.close()
        await asyncio.wait_for(serving, 10)
        await queries.close()


async def test_a_workspace_chooses_its_tools(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    url = f"{base_url}/api/workspaces/{tenants.ws_b}/mcp-tools"
    user = bearer(tenants.user1_token)
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(url, headers=user)).json() == {
            "tools": list(AGENT_TOOLS), "all_tools": True, "available": list(AGENT_TOOLS)}
        chosen = await http.put(url, headers=user, json={"tools": ["query", "list_tables", "query"]})
        assert chosen.status_code == 200 and chosen.json()["tools"] == ["list_tables", "query"]
        assert not chosen.json()["all_tools"]
        async with http_session(base_url, tenants.token_b) as b:
            assert {t.name for t in (await b.list_tools()).tools} == {"list_tables", "query"}
            assert (await ok(b, "query", database="agent", sql="SELECT 1 AS one"))["rows"] == [[1]]
            message = await refused(b, "execute", database="agent", sql="CREATE TABLE t (x int)")
            assert "'execute' is not enabled" in message and "list_tables, query" in message
            assert "not enabled" in await refused(b, "explain", database="agent", sql="SELECT 1")
        async with http_session(base_url, tenants.token_a) as a:  # another workspace keeps every tool
            assert len((await a.list_tools()).tools) == len(AGENT_TOOLS)
        bad = await http.put(url, headers=user, json={"tools": ["query", "drop_everything"]})
        body = assert_problem(bad, 422, "drop_everything", "explain", "describe_table")
        assert "query'" not in body["detail"]  # only the unknown name is quoted as unknown
        assert_problem(await http.put(url, headers=user, json={"tools": "query"}), 422)
        assert_problem(await http.get(url, headers=bearer(tenants.user2_token)), 404)  # another user's
        assert (await http.get(url, headers=bearer(tenants.admin_token))).json()["tools"] == ["list_tables", "query"]
        by_user = f"{base_url}/api/users/{tenants.user1}/workspaces/{tenants.ws_b}/mcp-tools"
        assert (await http.get(by_user, headers=bearer(tenants.admin_token))).json()["tools"] == [
            "list_tables", "query"]
        refusals: list[tuple[str, str]] = []
        for _ in range(200):  # audited (written behind by the server's own writer: wait for the batch)
            page = runtime.service.list_audit(tenants.user1, workspace_id=tenants.ws_b)
            refusals = sorted((e.tool, e.outcome) for e in page.items if e.error == "tool_disabled")
            if len(refusals) >= 2:
                break
            await anyio.sleep(0.05)
        assert refusals == [("execute", "refused"), ("explain", "refused")]
        await sdk_server_follows_the_choice(runtime, tenants.token_b)
        await stdio_loop_follows_the_choice(runtime, tenants.token_b)
        assert (await http.put(url, headers=user, json={"tools": None})).json()["all_tools"]
        async with http_session(base_url, tenants.token_b) as b:
            assert len((await b.list_tools()).tools) == len(AGENT_TOOLS)
            await ok(b, "execute", database="agent", sql="CREATE TABLE t (x int)")


def _attached(service: Service, queries: TenantQueries) -> Service:
    """The service, reaching tenants through ``queries`` (this test's own limits)."""
    service.attach_tenant(TenantAccess.of(queries))
    return service
