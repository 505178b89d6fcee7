"""The attacker at the MCP tools, the pooled connections, the explorer's SQL box and grid, undo ids and error
texts: a malicious agent, user or platform client trying to exceed what its tool or permissions allow (write
WAL from a read, rewrite a table through the reading tool, leave state in a pooled session, inject through
grid filters, reach another user's checkpoint or copy, read a secret in an error).

Each test asserts the safe outcome, never an error string alone. Attacks run for real, through the MCP
tools over HTTP (one ``agentpg serve`` app on loopback) and the explorer's pages, against the suite's
embedded PostgreSQL server; outcomes are checked as the superuser (WAL written, a table's file rewritten,
tables still there), never by an error string alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from attack_support import open_world
from helpers import agent_db_uri, global_uri
from mcp import ClientSession
from mcp_support import http_session, text

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings
from agentpg.web.security import COOKIE, seal_session

pytestmark = pytest.mark.anyio

ORIGIN = {"Origin": "http://testserver"}
#: Bytes of WAL one attacking call asks for; a read may cause a little WAL of its own (hint bits, pruning).
BLOB = 8_000_000
WAL_SLACK = 2_000_000


@dataclass
class RW:
    runtime: Runtime
    url: str
    user: str
    other: str
    ws: dict[str, str]
    tokens: dict[str, str]
    user_token: str
    other_token: str
    admin: str


@pytest.fixture(scope="module")
def rw(runtime: Runtime, settings: Settings) -> Iterator[RW]:
    """One user with agents ``full`` (default permissions) and ``ro`` (may only read table ``pub``; no write,
    per ``can_write=false``), and another user with agent ``o``."""
    perms = {"ro": {"can_write": False, "allowed_tables": ["pub"]}}
    with open_world(runtime, settings, "rt", ("full", "ro", "c"), perms) as world:
        with psycopg.connect(global_uri(runtime, world.user), autocommit=True) as conn:
            conn.execute("CREATE TABLE pub (id int PRIMARY KEY, x text)")
            conn.execute("INSERT INTO pub VALUES (1, 'a'), (2, 'b')")
        ws, tokens = dict(world.ws), dict(world.tokens)
        ws["o"], tokens["o"] = ws.pop("c"), tokens.pop("c")  # the other user's agent
        yield RW(runtime, world.base_url, world.user, world.other_user, ws, tokens, world.user_token,
                 runtime.service.issue_user_token(world.other_user).secret, world.admin_token)


async def call(s: ClientSession, tool: str, **args: Any) -> tuple[bool, str]:
    """(ran, text) of one tool call."""
    result = await s.call_tool(tool, args)
    return (not result.is_error), text(result)


def wal_lsn(rt: Runtime) -> int:
    with psycopg.connect(rt.admin_dsn, autocommit=True) as su:
        row = su.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint").fetchone()
    assert row is not None
    return int(row[0])


def sql_box(api_client: Any, rw: RW, statement: str, page: str = "global") -> tuple[int, str]:
    api_client.cookies.set(COOKIE, seal_session(rw.runtime.service, rw.user_token))
    try:
        r = api_client.post(f"/explorer/u/{rw.user}/{page}/sql", data={"sql": statement}, headers=ORIGIN)
    finally:
        api_client.cookies.clear()
    return r.status_code, r.text


# -- 1. read-only tools that write ------------------------------------------------------------------------

EMIT = f"SELECT pg_logical_emit_message(false, 'x', repeat('x', {BLOB}))::text"


@pytest.mark.parametrize("way", ["query", "explain_analyze", "sql_box"])
async def test_a_read_only_path_cannot_write_wal(rw: RW, api_client: Any, way: str) -> None:
    """FINDING if it fails: ``pg_logical_emit_message`` is executable by PUBLIC and allowed in a READ ONLY
    transaction, so agent ``ro`` (can_write=false, only table ``pub``) stores arbitrary bytes in the shared
    server's WAL (and so in every tenant's backups) through the read-only ``query``/``explain`` tools, and the
    user's read-only SQL box does the same. Unbounded by storage limits, budgets or permissions."""
    async with http_session(rw.url, rw.tokens["ro"]) as s:
        before = wal_lsn(rw.runtime)
        if way == "sql_box":
            answer = str(sql_box(api_client, rw, EMIT))
        elif way == "query":
            answer = (await call(s, "query", database="global", sql=EMIT))[1]
        else:
            answer = (await call(s, "explain", database="global", sql=EMIT, analyze=True))[1]
        written = wal_lsn(rw.runtime) - before
    assert written < WAL_SLACK, f"a read-only {way} call wrote {written:,} bytes of WAL: {answer[:200]}"


async def test_the_query_tool_does_not_rewrite_or_lock_tables(rw: RW) -> None:
    """FINDING if it fails: ``query`` (read-only annotation, the OAuth ``mcp:read`` scope) accepts VACUUM,
    ANALYZE and CLUSTER (Postgres allows them in READ ONLY transactions): CLUSTER rewrites the table into a new
    file under an ACCESS EXCLUSIVE lock, VACUUM (FREEZE) rewrites its pages."""
    async with http_session(rw.url, rw.tokens["full"]) as s:
        assert (await call(s, "execute", database="agent",
                           sql="CREATE TABLE cl (id int PRIMARY KEY, v text)"))[0]
        assert (await call(s, "execute", database="agent",
                           sql="INSERT INTO cl SELECT g, 'x' FROM generate_series(1, 200) g"))[0]
        with psycopg.connect(agent_db_uri(rw.runtime, rw.ws["full"]), autocommit=True) as conn:
            before = conn.execute("SELECT pg_relation_filenode('cl')").fetchone()
            ran = {sql: (await call(s, "query", database="agent", sql=sql))[0]
                   for sql in ("CLUSTER cl USING cl_pkey", "VACUUM (FREEZE) cl", "ANALYZE cl")}
            after = conn.execute("SELECT pg_relation_filenode('cl')").fetchone()
    assert before == after, "the read-only query tool rewrote table cl (CLUSTER)"
    assert not any(ran.values()), f"the read-only query tool ran maintenance commands: {ran}"


async def test_reads_cannot_write_through_functions_locks_or_sequences(rw: RW) -> None:
    """The query tool's READ ONLY transaction holds: a volatile function that writes, FOR UPDATE, a
    data-modifying CTE, nextval, large objects, ALTER ROLE from a function, multiple statements."""
    async with http_session(rw.url, rw.tokens["full"]) as s:
        for sql in ("CREATE TABLE wr (id int)",
                    "CREATE FUNCTION wr_f() RETURNS int LANGUAGE plpgsql AS $$BEGIN INSERT INTO wr VALUES (1); "
                    "RETURN 1; END$$",
                    "CREATE FUNCTION wr_x(t text) RETURNS text LANGUAGE plpgsql AS $$BEGIN EXECUTE t; RETURN t; END$$",
                    "CREATE SEQUENCE wr_s"):
            assert (await call(s, "execute", database="agent", sql=sql))[0], sql
        attempts = [
            "SELECT wr_f()", "SELECT * FROM wr FOR UPDATE",
            "WITH i AS (INSERT INTO wr VALUES (2) RETURNING 1) SELECT 1",
            "SELECT nextval('wr_s')", "SELECT lo_from_bytea(0, 'x')", "SELECT wr_x('INSERT INTO wr VALUES (3)')",
            "SELECT wr_x('SET TRANSACTION READ WRITE')", "SELECT wr_x('COMMIT')",
            "SELECT 1; INSERT INTO wr VALUES (4)", "SELECT 1 /* ; */ ; INSERT INTO wr VALUES (5)",
            "SELECT $$;$$; INSERT INTO wr VALUES (6)", "SET ROLE NONE", "RESET ROLE",
            "SET SESSION AUTHORIZATION DEFAULT", "DO $$BEGIN INSERT INTO wr VALUES (7); END$$",
            "CALL nothing()", "PREPARE p AS INSERT INTO wr VALUES (8)", "EXECUTE p",
            "COPY wr FROM STDIN", "U&\"wr\"", "SELECT wr_x(U&'\\0049NSERT INTO wr VALUES (9)')",
        ]
        for sql in attempts:
            await call(s, "query", database="agent", sql=sql)
            await call(s, "explain", database="agent", sql=sql, analyze=True)
    with psycopg.connect(agent_db_uri(rw.runtime, rw.ws["full"]), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM wr").fetchone() == (0,)
        assert conn.execute("SELECT last_value, is_called FROM wr_s").fetchone() == (1, False)


async def test_a_restricted_agent_stays_within_its_tables(rw: RW) -> None:
    """Agent ``ro`` (only ``pub``, no write) reaches nothing else through any tool."""
    with psycopg.connect(global_uri(rw.runtime, rw.user), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS hid (s text)")
        conn.execute("INSERT INTO hid VALUES ('zqhiddenrow')")
    out: list[str] = []
    async with http_session(rw.url, rw.tokens["ro"]) as s:
        for sql in ("SELECT * FROM hid", "SELECT * FROM public.hid", "TABLE hid", "SELECT (SELECT s FROM hid)",
                    "SELECT * FROM pub WHERE EXISTS (SELECT FROM hid)", "SELECT * FROM pub, LATERAL (TABLE hid) h",
                    "SELECT query_to_xml('select * from hid', true, true, '')", "ANALYZE hid", "VACUUM hid"):
            out.append((await call(s, "query", database="global", sql=sql))[1])
            out.append((await call(s, "explain", database="global", sql=sql, analyze=True))[1])
        out.append((await call(s, "describe_table", database="global", table="hid"))[1])
        for sql in ("INSERT INTO pub VALUES (9, 'w')", "UPDATE pub SET x = 'w'", "DELETE FROM pub",
                    "CREATE TABLE pub2 AS SELECT * FROM pub", "TRUNCATE pub", "MERGE INTO pub USING pub p2 ON "
                    "false WHEN NOT MATCHED THEN INSERT VALUES (10, 'w')"):
            out.append((await call(s, "execute", database="global", sql=sql))[1])
    assert not [t for t in out if "zqhiddenrow" in t]
    with psycopg.connect(global_uri(rw.runtime, rw.user), autocommit=True) as conn:
        assert conn.execute("SELECT id, x FROM pub ORDER BY id").fetchall() == [(1, "a"), (2, "b")]
        assert conn.execute("SELECT to_regclass('public.pub2')").fetchone() == (None,)


# -- 2. pooled connections ------------------------------------------------------------------------------

async def test_session_state_from_a_call_never_reaches_the_next(rw: RW) -> None:
    """A write call's function leaves every kind of session state behind; the next calls (on every pooled
    connection) see none of it, and nobody else holds its advisory lock."""
    leave = ("CREATE FUNCTION dirty() RETURNS text LANGUAGE plpgsql AS $$BEGIN "
             "PERFORM set_config('work_mem', '900MB', false); PERFORM set_config('search_path', 'evil', false); "
             "PERFORM set_config('app.secret', 'zqsessionleak', false); "
             "CREATE TEMP TABLE tmp_leak AS SELECT 'zqsessionleak'::text AS s; "
             "PERFORM pg_advisory_lock(4242); EXECUTE 'PREPARE leak_p AS SELECT 1'; EXECUTE 'LISTEN leakchan'; "
             "EXECUTE 'DECLARE leak_c CURSOR WITH HOLD FOR SELECT 1'; "
             "RETURN 'dirty'; END$$")
    probe = ("SELECT current_setting('work_mem'), current_setting('search_path'), "
             "coalesce(current_setting('app.secret', true), ''), to_regclass('pg_temp.tmp_leak')::text, "
             "(SELECT count(*) FROM pg_prepared_statements), (SELECT count(*) FROM pg_cursors WHERE name = 'leak_c'), "
             "(SELECT count(*) FROM pg_listening_channels()), current_user = session_user")
    async with http_session(rw.url, rw.tokens["full"]) as s:
        assert (await call(s, "execute", database="agent", sql=leave))[0]
        for _ in range(6):
            await call(s, "execute", database="agent", sql="SELECT dirty()")
        seen = [(await call(s, "query", database="agent", sql=probe))[1] for _ in range(12)]
    for answer in seen:
        assert '["4MB","\\"$user\\", public","",null,0,0,0,true]' in answer, answer
    with psycopg.connect(agent_db_uri(rw.runtime, rw.ws["full"]), autocommit=True) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)


async def test_altering_its_own_role_does_not_lift_agentpg_limits(rw: RW) -> None:
    """An agent may ALTER ROLE itself from a function in its agent database (Postgres lets a role change its
    own defaults): agentpg's sessions still start with their limits, and temp_file_limit cannot be lifted."""
    async with http_session(rw.url, rw.tokens["full"]) as s:
        await call(s, "execute", database="agent",
                   sql="CREATE FUNCTION self_alter(t text) RETURNS text LANGUAGE plpgsql AS "
                       "$$BEGIN EXECUTE format(t, current_user); RETURN 'ok'; END$$")
        for t in ("ALTER ROLE %I RESET ALL", "ALTER ROLE %I SET temp_file_limit = -1",
                  "ALTER ROLE %I SET default_transaction_read_only = off", "ALTER ROLE %I CONNECTION LIMIT -1"):
            await call(s, "execute", database="agent", sql=f"SELECT self_alter('{t}')")
        ran, answer = await call(s, "query", database="agent",
                                 sql="SELECT current_setting('work_mem'), current_setting('temp_file_limit'), "
                                     "current_setting('transaction_read_only')")
        assert ran and '["4MB","1GB","on"]' in answer, answer
        ran, _ = await call(s, "query", database="agent", sql="SELECT self_alter('CREATE TABLE ro_escape ()')")
        assert not ran


# -- 3. the explorer's grid and SQL box -------------------------------------------------------------------

def test_grid_filters_and_sort_keys_are_not_sql(rw: RW, api_client: Any) -> None:
    api_client.cookies.set(COOKIE, seal_session(rw.runtime.service, rw.user_token))
    page = f"/explorer/u/{rw.user}/global/table"
    evil = ['id" ; DROP TABLE pub; --', "id) OR (1=1", "x\x00", "ID", '"id"', "pg_catalog.now()"]
    try:
        statuses = []
        for value in evil:
            for params in ({"name": "pub", "fc": value, "fo": "eq", "fv": "1"},
                           {"name": "pub", "fc": "id", "fo": value, "fv": "1"},
                           {"name": "pub", "fc": "id", "fo": "eq", "fv": value},
                           {"name": "pub", "fc": "x", "fo": "in", "fv": f'"{value}", a'},
                           {"name": "pub", "sort": value, "dir": "desc; DROP TABLE pub"},
                           {"name": "pub", "q": f"%' OR 1=1; DROP TABLE pub; --{value}"},
                           {"name": f"pub; DROP TABLE pub; --{value}"}):
                r = api_client.get(page, params=params)
                statuses.append((r.status_code, params))
        sql_statuses = [sql_box(api_client, rw, sql)[0] for sql in
                        ("SELECT * FROM pub; DROP TABLE pub", "DROP TABLE pub",
                         "WITH d AS (DELETE FROM pub RETURNING *) SELECT * FROM d",
                         "SELECT * FROM agentpg_internal.x", "SELECT rolname FROM pg_roles",
                         "EXPLAIN ANALYZE DELETE FROM pub", "SELECT * FROM pub FOR UPDATE")]
    finally:
        api_client.cookies.clear()
    assert not [s for s in statuses if s[0] >= 500], statuses
    assert all(s >= 400 for s in sql_statuses), sql_statuses
    with psycopg.connect(global_uri(rw.runtime, rw.user), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pub").fetchone() == (2,)


# -- 4. undo ids across principals -----------------------------------------------------------------------

async def test_undo_ids_of_others_are_not_found(rw: RW, api_client: Any) -> None:
    """An audit entry, restored copy or operation of another user (or a malformed id) is "not found"."""
    async with http_session(rw.url, rw.tokens["o"]) as s:  # the other user's agent leaves an audit entry
        await call(s, "query", database="agent", sql="SELECT 1")
    items: list[dict[str, Any]] = []
    for _ in range(60):  # the live server writes its audit entries behind the call (~100 ms)
        items = api_client.get(f"/api/users/{rw.other}/audit",
                               headers={"Authorization": f"Bearer {rw.admin}"}).json()["items"]
        if items:
            break
        time.sleep(0.1)
    other_id = items[0]["id"]
    async with http_session(rw.url, rw.tokens["full"]) as s:
        for args in ({"before_audit_id": other_id}, {"before_audit_id": other_id, "mode": "new"},
                     {"checkpoint_id": "00000000-0000-0000-0000-000000000000"}, {"checkpoint_id": "' OR 1=1 --"}):
            ran, message = await call(s, "restore", **args)
            assert not ran and ("does not exist" in message or "not a statement" in message), (args, message)
    auth = {"Authorization": f"Bearer {rw.user_token}"}
    for path in (f"/api/users/{rw.other}/restored-copies",
                 f"/api/users/{rw.user}/restored-copies/00000000-0000-0000-0000-000000000000/tables",
                 f"/api/users/{rw.user}/restored-copies/%ff/tables", "/api/operations/%00",
                 "/api/operations/00000000-0000-0000-0000-000000000000",
                 f"/api/workspaces/{rw.ws['o']}/database/checkpoints",
                 f"/api/users/{rw.user}/workspaces/{rw.ws['o']}/database/checkpoints"):
        assert api_client.get(path, headers=auth).status_code == 404, path
    r = api_client.post(f"/api/workspaces/{rw.ws['full']}/database/restore", json={"before_audit_id": other_id},
                        headers=auth)
    assert r.status_code == 404, r.text


# -- 5. secrets in errors ----------------------------------------------------------------------------------

async def test_errors_carry_no_secret(rw: RW, api_client: Any) -> None:
    """Errors forced from every tool and a few routes name no URI, password, role or database."""
    uri = agent_db_uri(rw.runtime, rw.ws["full"])
    password = uri.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    texts: list[str] = []
    async with http_session(rw.url, rw.tokens["full"]) as s:
        texts.append((await call(s, "query", database="agent", sql="SELECT pg_sleep(30)"))[1])  # the timeout
        texts.append((await call(s, "query", database="global", sql="SELECT repeat('x', 300000000)"))[1])
        for sql in ("SELECT current_user", "SELECT current_database()", "SELECT 1/0", "SELECT * FROM nope",
                    "SELECT has_database_privilege('x', 'c')",
                    "SELECT 'x'::regrole", "SELECT current_setting('data_directory')", "SELECT inet_server_port()",
                    "CREATE EXTENSION dblink", "SELECT pg_terminate_backend(pg_backend_pid())"):
            for tool in ("query", "execute"):
                texts.append((await call(s, tool, database="agent", sql=sql))[1])
                texts.append((await call(s, tool, database="global", sql=sql))[1])
        texts.append((await call(s, "describe_table", database="global", table="x\x01\"'"))[1])
        texts.append((await call(s, "list_tables", database="global", schema="pg_toast"))[1])
        texts.append((await call(s, "restore", checkpoint_id="x" * 64))[1])
        texts.append((await call(s, "checkpoint", database="both", name="\x00"))[1])
    _, body = sql_box(api_client, rw, "SELECT current_user, current_database()")
    texts.append(body)
    # what the tools legitimately return (current_user, current_database) is the agent's own; errors must not
    # carry the password, a URI, or agentpg's internal role and database names
    errors = [t for t in texts if "current_user" not in t and "current_database" not in t]
    leaks = [t[:200] for t in errors if password in t or "postgresql://" in t or "apg_" in t]
    assert not leaks, leaks
    assert password not in body
