"""Concurrent changes to one user's objects, as a platform makes them under load: every request succeeds or is
refused cleanly (never a 5xx), the grants Postgres enforces match the catalog afterwards, and ``reconcile``
finds nothing to repair. Then the server's ordinary connection slots are filled by a tenant role and agentpg's
REST routes still answer (its own connections come from the superuser reserve).

Real HTTP from real threads against a real uvicorn; the grants are read back from Postgres itself.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
from api_support import LiveServer, bearer, uid
from helpers import global_uri, with_database, workspace_global_uri
from mcp_support import MCP_HEADERS, live_server
from sqlalchemy import select

from agentpg.app.runtime import Runtime, open_runtime
from agentpg.catalog.models import AgentGlobalDbPermissions, UserGlobalDatabase, Workspace, WorkspaceAgentDatabase
from agentpg.embedded import EmbeddedPostgres
from agentpg.lifecycle.reconcile import reconcile
from agentpg.settings import Settings

T = TypeVar("T")
N_WORKSPACES = 20
N_CHANGED = 10


@pytest.fixture(scope="module")
def base_url(settings: Settings, runtime: Runtime) -> Iterator[str]:
    # No rate limit (the platform's admin token is exempt anyway) and no warm pool: every creation makes its
    # database, the slowest and most contended path.
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "rate_limit_per_s": 0.0})) as url:
        yield url


def _at_once(count: int, fn: Callable[[int], T]) -> list[T]:
    """``fn(0) … fn(count - 1)``, each on its own thread, released together by a barrier."""
    barrier = threading.Barrier(count)

    def run(i: int) -> T:
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def _statuses(responses: list[httpx.Response]) -> list[int]:
    return [r.status_code for r in responses]


def _no_5xx(responses: list[httpx.Response]) -> None:
    bad = [(r.request.method, r.request.url.path, r.status_code, r.text[:300]) for r in responses
           if r.status_code >= 500]
    assert not bad, bad


def _expected_grants(runtime: Runtime, user: str) -> dict[str, tuple[str, AgentGlobalDbPermissions]]:
    """Per active workspace of ``user``: its role in the global database and its permissions row."""
    with runtime.service.deps.sessions() as s:
        rows = s.execute(select(Workspace.id, Workspace.agent_role, AgentGlobalDbPermissions)
                         .join(AgentGlobalDbPermissions, AgentGlobalDbPermissions.workspace_id == Workspace.id)
                         .where(Workspace.user_id == user, Workspace.status == "active")).all()
    return {ws: (role, perms) for ws, role, perms in rows}


def _check_grants(admin: psycopg.Connection[tuple[Any, ...]], runtime: Runtime, user: str) -> int:
    """What Postgres enforces for every agent role of ``user`` is exactly what the catalog says; returns how
    many roles were checked."""
    expected = _expected_grants(runtime, user)
    with runtime.service.deps.sessions() as s:
        glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user)).one()
    with psycopg.connect(with_database(runtime.admin_dsn, glob.database_name), autocommit=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r'").fetchall()]
        assert tables, "the global database has the shared table"
        for ws, (role, p) in expected.items():
            row = conn.execute(
                "SELECT can_read, can_write, can_create, can_drop, allowed_tables FROM agentpg_internal.agent_grants "
                "WHERE role_name = %s", (role,)).fetchone()
            assert row == (p.can_read, p.can_write, p.can_create_tables, p.can_drop_tables, p.allowed_tables), ws
            powers = conn.execute(
                "SELECT has_database_privilege(%(r)s, current_database(), 'CONNECT'), "
                "has_schema_privilege(%(r)s, 'public', 'USAGE'), has_schema_privilege(%(r)s, 'public', 'CREATE'), "
                "pg_has_role(%(r)s, %(o)s, 'USAGE')", {"r": role, "o": glob.owner_role}).fetchone()
            assert powers == (True, True, p.can_create_tables, p.can_drop_tables), (ws, powers)
            for table in tables:
                allowed = p.allowed_tables is None or table in p.allowed_tables
                got = conn.execute("SELECT has_table_privilege(%(r)s, %(t)s, 'SELECT'), "
                                   "has_table_privilege(%(r)s, %(t)s, 'INSERT')",
                                   {"r": role, "t": f'public."{table}"'}).fetchone()
                assert got == (p.can_read and allowed, p.can_write and allowed), (ws, table, got)
    roles = {r[0] for r in admin.execute("SELECT rolname FROM pg_roles").fetchall()}
    assert all(role in roles for role, _ in expected.values())
    return len(expected)


def test_one_users_workspaces_created_changed_and_deleted_at_once(
        base_url: str, runtime: Runtime, admin_token: str, admin: psycopg.Connection[tuple[Any, ...]]) -> None:
    admin_h = bearer(admin_token)
    user = uid("busy")
    timings: dict[str, float] = {}
    with httpx.Client(base_url=base_url, headers=admin_h, timeout=120) as client:
        assert client.post("/api/users", json={"id": user}).status_code == 201
    # A table every agent shares, so each grant change also rewrites grants on a relation (and its sequence).
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id bigserial PRIMARY KEY, ws text NOT NULL, n int NOT NULL)")
    ids = [f"{user}-w{i:02d}" for i in range(N_WORKSPACES)]

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(base_url + path, json=body, headers=admin_h, timeout=120)

    # 1. Twenty workspaces of one user, created at the same moment by twenty workers.
    started = time.monotonic()
    created = _at_once(N_WORKSPACES, lambda i: post(f"/api/users/{user}/workspaces", {"id": ids[i]}))
    timings["create_20"] = time.monotonic() - started
    _no_5xx(created)
    assert _statuses(created) == [201] * N_WORKSPACES, [(r.status_code, r.text[:200]) for r in created]
    tokens = {ids[i]: r.json()["agent_token"]["token"] for i, r in enumerate(created)}
    assert _check_grants(admin, runtime, user) == N_WORKSPACES

    # 2. Ten permission changes at once while the other ten agents write through MCP.
    changed, writers = ids[:N_CHANGED], ids[N_CHANGED:]
    stop = threading.Event()
    agent_answers: list[tuple[str, int, bool]] = []

    def write(ws: str) -> None:
        n = 0
        with httpx.Client(timeout=60) as mcp:
            while not stop.is_set() or n < 3:
                n += 1
                body = {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                        "params": {"name": "execute", "arguments": {
                            "database": "global", "sql": f"INSERT INTO notes (ws, n) VALUES ('{ws}', {n})"}}}
                r = mcp.post(base_url + "/mcp", json=body, headers={**MCP_HEADERS, **bearer(tokens[ws])})
                error = r.status_code != 200 or bool(r.json().get("result", {}).get("isError"))
                agent_answers.append((ws, r.status_code, error))

    def perms(i: int) -> dict[str, Any]:
        if i % 2:  # co-owner: a role membership granted
            return {"can_read": True, "can_write": True, "can_create_tables": True, "can_drop_tables": True}
        return {"can_read": True, "can_write": False, "can_create_tables": False, "allowed_tables": ["notes"]}

    writer_threads = [threading.Thread(target=write, args=(ws,)) for ws in writers]
    for t in writer_threads:
        t.start()
    started = time.monotonic()
    put = _at_once(N_CHANGED, lambda i: httpx.put(f"{base_url}/api/workspaces/{changed[i]}/global-database-permissions",
                                                  json=perms(i), headers=admin_h, timeout=120))
    timings["permissions_10"] = time.monotonic() - started
    stop.set()
    for t in writer_threads:
        t.join(60)
    _no_5xx(put)
    assert _statuses(put) == [200] * N_CHANGED, [(r.status_code, r.text[:200]) for r in put]
    assert agent_answers and not [a for a in agent_answers if a[2]], [a for a in agent_answers if a[2]][:5]
    assert _check_grants(admin, runtime, user) == N_WORKSPACES

    # 3. Ten deletions at once.
    with runtime.service.deps.sessions() as s:
        doomed_roles = set(s.scalars(select(Workspace.agent_role).where(Workspace.id.in_(changed))))
        doomed_dbs = set(s.scalars(select(WorkspaceAgentDatabase.database_name)
                                   .where(WorkspaceAgentDatabase.workspace_id.in_(changed))))
    assert len(doomed_roles) == len(doomed_dbs) == N_CHANGED
    started = time.monotonic()
    deleted = _at_once(N_CHANGED, lambda i: httpx.delete(f"{base_url}/api/workspaces/{changed[i]}",
                                                         headers=admin_h, timeout=120))
    timings["delete_10"] = time.monotonic() - started
    _no_5xx(deleted)
    assert _statuses(deleted) == [204] * N_CHANGED, [(r.status_code, r.text[:200]) for r in deleted]
    assert _check_grants(admin, runtime, user) == N_WORKSPACES - N_CHANGED
    with runtime.service.deps.sessions() as s:
        gone = select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.workspace_id.in_(changed))
        assert not s.scalars(gone).all()
    # Nothing of a deleted workspace is left on the server: no role, no agent database.
    assert not admin.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (list(doomed_roles),)).fetchall()
    assert not admin.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (list(doomed_dbs),)).fetchall()

    report = reconcile(runtime.service.deps)
    assert (report.finished, report.undone, report.failed, report.in_flight) == ([], [], [], []), report
    assert (report.orphan_databases, report.orphan_roles) == ([], []), report
    print(f"\none user, at once: {timings}; {len(agent_answers)} agent writes meanwhile")
    runtime.service.delete_user(user)


def test_one_users_tokens_env_and_budget_changed_at_once(base_url: str, runtime: Runtime, admin_token: str) -> None:
    admin_h = bearer(admin_token)
    user = uid("busy")
    with httpx.Client(base_url=base_url, headers=admin_h, timeout=120) as client:
        assert client.post("/api/users", json={"id": user}).status_code == 201
        ws = f"{user}-w"
        assert client.post(f"/api/users/{user}/workspaces", json={"id": ws}).status_code == 201

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return httpx.request(method, base_url + path, json=body, headers=admin_h, timeout=120)

    issued = _at_once(10, lambda i: call("POST", f"/api/workspaces/{ws}/tokens" if i % 2 else
                                         f"/api/users/{user}/tokens", {"name": f"t{i}"}))
    _no_5xx(issued)
    assert _statuses(issued) == [201] * 10
    revoked = _at_once(10, lambda i: call("DELETE", f"/api/tokens/{issued[i // 2 * 2].json()['id']}"))
    _no_5xx(revoked)  # each token revoked twice at once: one 204, the other 204 or 404, never a 5xx
    assert set(_statuses(revoked)) <= {204, 404}
    env = _at_once(10, lambda i: call("PUT", f"/api/users/{user}/env/SHARED_{i % 2}", {"value": f"v{i}"}))
    _no_5xx(env)
    assert set(_statuses(env)) <= {200, 201} and _statuses(env).count(201) == 2, _statuses(env)
    # Budgets flipping between exceeded and not: each flip revokes or restores write grants everywhere.
    budgets = _at_once(10, lambda i: call("PUT", f"/api/users/{user}/budget", {"budget_cents": 0 if i % 2 else 10**6}))
    _no_5xx(budgets)
    assert _statuses(budgets) == [200] * 10
    # Whatever order they finished in, the last budget decides: over it, read-only; raised again, writable.
    for cents, read_only in ((0, "on"), (10**6, "off")):
        assert call("PUT", f"/api/users/{user}/budget", {"budget_cents": cents}).status_code == 200
        assert call("GET", f"/api/users/{user}/usage").json()["read_only"] is (read_only == "on")
        with psycopg.connect(with_database(runtime.admin_dsn, _global_database(runtime, user))) as conn:
            assert conn.execute("SELECT value FROM agentpg_internal.config WHERE key = 'read_only'").fetchone() \
                == (read_only,)
    runtime.service.delete_user(user)


def _global_database(runtime: Runtime, user: str) -> str:
    with runtime.service.deps.sessions() as s:
        return s.scalars(select(UserGlobalDatabase.database_name).where(UserGlobalDatabase.user_id == user)).one()


def test_an_agents_lock_delays_a_grant_change_only_boundedly(
        base_url: str, runtime: Runtime, admin_token: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewriting grants on a table waits for the locks agents hold on it. An agent that keeps a table locked
    makes a permission change wait at most the lock timeout, then answer a retryable 503 (not hang with the
    workspace row and a catalog connection held)."""
    from agentpg.providers import local_roles

    monkeypatch.setattr(local_roles, "GRANT_LOCK_TIMEOUT", "1s")  # the in-process server reads it per change
    admin_h = bearer(admin_token)
    user = uid("busy")
    with httpx.Client(base_url=base_url, headers=admin_h, timeout=60) as client:
        assert client.post("/api/users", json={"id": user}).status_code == 201
        ws = f"{user}-w"
        assert client.post(f"/api/users/{user}/workspaces", json={"id": ws}).status_code == 201
        read_only = {"can_read": True, "can_write": False, "can_create_tables": False}
        with psycopg.connect(workspace_global_uri(runtime, ws), autocommit=True) as agent:
            agent.execute("CREATE TABLE mine (id int)")
            agent.execute("BEGIN")
            agent.execute("LOCK TABLE mine IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            held = client.put(f"/api/workspaces/{ws}/global-database-permissions", json=read_only)
            waited = time.monotonic() - started
        assert held.status_code == 503 and held.headers.get("Retry-After"), (held.status_code, held.text)
        assert held.json()["code"] == "busy" and "retry" in held.json()["detail"] and waited < 10
        assert client.get(f"/api/workspaces/{ws}/global-database-permissions").json()["can_write"] is True
        # The agent's session is gone, and with it the lock: the same change now goes through.
        assert client.put(f"/api/workspaces/{ws}/global-database-permissions", json=read_only).status_code == 200
    runtime.service.delete_user(user)


# -- the connection reserve ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_home() -> Iterator[Path]:
    """A separate embedded server with few connection slots, so filling them starves nobody else."""
    home = Path(tempfile.mkdtemp(prefix="agentpg-slots-", dir="/tmp"))
    home.chmod(0o711)
    server = EmbeddedPostgres(home, fsync=False, extra_conf={"max_connections": "100"})
    server.ensure_running()
    try:
        yield home
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_agentpg_answers_when_tenants_hold_every_ordinary_slot(small_home: Path,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    # One tenant role may hold every ordinary slot here (its CONNECTION LIMIT is above them all).
    serve = LiveServer(small_home, tmp_path_factory.mktemp("slots") / "serve.log",
                       extra_env={"AGENTPG_TENANT_CONNECTION_LIMIT": "500"})
    held: list[psycopg.Connection[tuple[Any, ...]]] = []
    try:
        serve.wait_ready()
        token = (small_home / "admin-token").read_text().strip()
        user = uid("slots")
        with httpx.Client(base_url=serve.base_url, headers=bearer(token), timeout=60) as client:
            assert client.post("/api/users", json={"id": user}).status_code == 201
            assert client.post(f"/api/users/{user}/workspaces", json={"id": f"{user}-a"}).status_code == 201
            with open_runtime(Settings(home=small_home, embedded_fsync=False), migrate_catalog=False) as rt:
                tenant_uri = global_uri(rt, user)
            refusal = ""
            for _ in range(200):
                try:
                    held.append(psycopg.connect(tenant_uri, connect_timeout=5))
                except psycopg.OperationalError as exc:
                    refusal = str(exc)
                    break
            assert "reserved" in refusal, refusal
            # Every ordinary slot is taken by the tenant; agentpg's own routes still answer, several at once as
            # under load (each creation opens admin connections of its own).
            def route(i: int) -> tuple[str, httpx.Response]:
                with httpx.Client(base_url=serve.base_url, headers=bearer(token), timeout=120) as c:
                    if i < 8:
                        return "create workspace", c.post(f"/api/users/{user}/workspaces", json={"id": f"{user}-{i}"})
                    if i < 10:
                        return "register", c.post("/api/users", json={"id": f"{user}-u{i}"})
                    if i < 12:
                        return "get user", c.get(f"/api/users/{user}")
                    if i < 14:
                        return "env", c.put(f"/api/users/{user}/env/NAME_{i}", json={"value": "v"})
                    return "user token", c.post(f"/api/users/{user}/tokens", json={"name": "t"})

            started = time.monotonic()
            answers = _at_once(16, route)
            answers += [("readyz", client.get("/readyz")), ("workspaces", client.get(f"/api/users/{user}/workspaces")),
                        ("permissions", client.put(f"/api/workspaces/{user}-0/global-database-permissions",
                                                   json={"can_read": True, "can_write": False,
                                                         "can_create_tables": False})),
                        ("delete workspace", client.delete(f"/api/workspaces/{user}-1")),
                        ("delete user", client.delete(f"/api/users/{user}-u8"))]
            elapsed = time.monotonic() - started
            wrong = [(k, r.status_code, r.text[:300]) for k, r in answers if r.status_code >= 300]
            assert not wrong, wrong
            # Reading tenant data needs a tenant slot: the governor sees the server refuse for want of one and
            # answers server_busy (429, retryable), never "cannot be reached" and never a 500.
            tables = client.get(f"/api/users/{user}/global-database/tables")
            assert tables.status_code in (200, 429), (tables.status_code, tables.text[:300])
            if tables.status_code == 429:
                assert tables.json()["code"] == "server_busy" and tables.headers.get("Retry-After"), tables.headers
            print(f"\n{len(held)} tenant connections held; {len(answers)} agentpg routes answered in {elapsed:.2f} s; "
                  f"reading tenant data: {tables.status_code}")
        for conn in held:
            conn.close()
        held.clear()
        with httpx.Client(base_url=serve.base_url, headers=bearer(token), timeout=60) as client:
            assert client.delete(f"/api/users/{user}").status_code == 204
    finally:
        for conn in held:
            conn.close()
        serve.stop()


def test_an_unreachable_catalog_is_a_retryable_answer(small_home: Path,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    serve = LiveServer(small_home, tmp_path_factory.mktemp("down") / "serve.log")
    server = EmbeddedPostgres(small_home, fsync=False, extra_conf={"max_connections": "100"})
    try:
        serve.wait_ready()
        token = (small_home / "admin-token").read_text().strip()
        user = uid("down")
        with httpx.Client(base_url=serve.base_url, headers=bearer(token), timeout=60) as client:
            assert client.post("/api/users", json={"id": user}).status_code == 201
            created = client.post(f"/api/users/{user}/workspaces", json={"id": f"{user}-a"})
            assert created.status_code == 201
            agent = {**MCP_HEADERS, **bearer(created.json()["agent_token"]["token"])}
            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "query", "arguments": {"database": "global", "sql": "SELECT 1 AS one"}}}
            first = client.post("/mcp", json=call, headers=agent)
            assert first.status_code == 200 and not first.json()["result"].get("isError"), first.text
            server.stop()  # the catalog (and every tenant database) is gone
            time.sleep(2.5)  # past the hot path's 2 s cache of the agent's target
            got = client.get(f"/api/users/{user}")
            assert got.status_code == 503 and got.headers.get("Retry-After"), (got.status_code, got.text)
            assert "retry" in got.json()["detail"]
            tool = client.post("/mcp", json=call, headers=agent)
            assert tool.status_code in (200, 503), (tool.status_code, tool.text)
            if tool.status_code == 200:
                result = tool.json()["result"]
                text = " ".join(c.get("text", "") for c in result["content"])
                assert result["isError"] and "retry" in text and "internal error" not in text, text
            else:
                assert tool.headers.get("Retry-After"), tool.headers
            print(f"\ncatalog down: REST {got.status_code} {got.json()['code']}; MCP {tool.status_code} "
                  f"{tool.text[:200]}")
        log = serve.output()
        assert "unexpected" not in log, log[-3000:]
    finally:
        serve.stop()
        server.ensure_running()  # the fixture stops it
