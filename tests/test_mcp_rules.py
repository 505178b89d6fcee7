"""Each rule twice: through MCP (a clear tool error before the server is asked) and with the pre-check
bypassed (as the agent's own Postgres role, or through the query path without the classifier), where
Postgres itself must refuse."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest
from helpers import workspace_global_uri
from mcp_support import Tenants, http_session, live_server, make_tenants, ok, refused, uid
from psycopg.conninfo import conninfo_to_dict

from agentpg.access.permissions import GlobalDbPermissions
from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import QueryLimits, TenantQueries
from agentpg.access.results import StatementFailed
from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio
Conn = psycopg.Connection[tuple[object, ...]]



@pytest.fixture(scope="module")
def tenants(runtime: Runtime) -> Iterator[Tenants]:
    t = make_tenants(runtime)
    svc = runtime.service
    for name in ("ws_d",):  # a third agent of user1, for table lists
        t.extra[name] = uid("wd")
        _, issued = svc.create_workspace_with_token(t.user1, t.extra[name])
        t.extra["token_d"] = issued.secret
    with psycopg.connect(workspace_global_uri(runtime, t.ws_a), autocommit=True) as a:
        a.execute("CREATE TABLE shared (id int PRIMARY KEY, note text)")
        a.execute("INSERT INTO shared VALUES (1, 'one'), (2, 'two')")
        a.execute("CREATE TABLE secret (x int)")
        a.execute("INSERT INTO secret VALUES (42)")
        a.execute("CREATE TABLE allowed (x int)")
    yield t
    svc.delete_user(t.user1)
    svc.delete_user(t.user2)


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings.model_copy(update={"warm_pool_size": 0, "mcp_statement_timeout_s": 1.0})) as url:
        yield url


def as_agent(runtime: Runtime, workspace_id: str) -> Conn:
    """A direct connection as the workspace's own role in the global database: no pre-check at all."""
    return psycopg.connect(workspace_global_uri(runtime, workspace_id), autocommit=True)


def denied(conn: Conn, statement: str) -> str:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(statement)
    return str(info.value)


def set_perms(runtime: Runtime, workspace_id: str, **flags: object) -> None:
    runtime.service.set_agent_permissions(workspace_id, GlobalDbPermissions.model_validate(flags))


# -- permission flags -----------------------------------------------------------------------------------


async def test_can_read_false(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    set_perms(runtime, tenants.ws_b, can_read=False)
    try:
        async with http_session(base_url, tenants.token_b) as s:
            assert "may not read" in await refused(s, "query", database="global", sql="SELECT * FROM shared")
            assert (await ok(s, "query", database="agent", sql="SELECT 1 AS one"))["rows"] == [[1]]
        with as_agent(runtime, tenants.ws_b) as b:
            assert "permission denied for table shared" in denied(b, "SELECT * FROM shared")
    finally:
        set_perms(runtime, tenants.ws_b)


async def test_can_write_false(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    set_perms(runtime, tenants.ws_b, can_write=False)
    try:
        async with http_session(base_url, tenants.token_b) as s:
            message = await refused(s, "execute", database="global", sql="INSERT INTO shared VALUES ($1, $2)",
                                    params=[3, "three"])
            assert "may not write to the global database" in message and "can_write" in message
            assert (await ok(s, "query", database="global", sql="SELECT count(*) FROM shared"))["rows"] == [[2]]
        with as_agent(runtime, tenants.ws_b) as b:
            for statement in ("INSERT INTO shared VALUES (3, 'x')", "UPDATE shared SET note = 'x'",
                              "DELETE FROM shared", "TRUNCATE shared"):
                assert "permission denied" in denied(b, statement)
    finally:
        set_perms(runtime, tenants.ws_b)


async def test_can_create_tables_false(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    set_perms(runtime, tenants.ws_b, can_create_tables=False)
    try:
        async with http_session(base_url, tenants.token_b) as s:
            assert "may not create" in await refused(s, "execute", database="global", sql="CREATE TABLE nope (x int)")
            assert "may not create" in await refused(s, "execute", database="global",
                                                     sql="CREATE VIEW nope AS SELECT 1")
        with as_agent(runtime, tenants.ws_b) as b:
            assert "permission denied for schema public" in denied(b, "CREATE TABLE nope (x int)")
            # No code at all in the shared database, whatever the permissions (tests/test_attack_postgres.py)
            assert "not allowed in the shared global database" in denied(b, "CREATE FUNCTION nope() RETURNS int "
                                                                              "LANGUAGE sql AS 'SELECT 1'")
    finally:
        set_perms(runtime, tenants.ws_b)


async def test_can_drop_tables(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    # Off by default: neither DROP nor owner-only DDL, through MCP or directly.
    async with http_session(base_url, tenants.token_b) as s:
        assert "may not drop tables" in await refused(s, "execute", database="global", sql="DROP TABLE shared")
        assert "can_drop_tables" in await refused(s, "execute", database="global",
                                                  sql="ALTER TABLE shared ADD COLUMN y int")
    with as_agent(runtime, tenants.ws_b) as b:
        assert "must be owner" in denied(b, "DROP TABLE shared")
        assert "must be owner" in denied(b, "CREATE INDEX ON shared (note)")
        owner = b.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'shared'").fetchone()
        assert owner is not None
        # Even a member of the owner role (can_drop_tables) may not become it (PG16+: SET FALSE).
        assert "permission denied to set role" in denied(b, f'SET ROLE "{owner[0]}"')
    set_perms(runtime, tenants.ws_b, can_drop_tables=True)
    try:
        async with http_session(base_url, tenants.token_b) as s:
            await ok(s, "execute", database="global", sql="CREATE TABLE dropme (x int)")
            await ok(s, "execute", database="global", sql="CREATE INDEX ON dropme (x)")
            await ok(s, "execute", database="global", sql="DROP TABLE dropme")
        with as_agent(runtime, tenants.ws_b) as b:
            b.execute("CREATE TABLE dropme2 (x int)")
            b.execute("DROP TABLE dropme2")
            assert "permission denied to set role" in denied(b, f'SET ROLE "{owner[0]}"')
    finally:
        set_perms(runtime, tenants.ws_b)


async def test_allowed_tables(runtime: Runtime, base_url: str, tenants: Tenants) -> None:
    set_perms(runtime, tenants.ws_b, allowed_tables=["allowed", "v_allowed"])
    try:
        async with http_session(base_url, tenants.token_b) as s:
            message = await refused(s, "query", database="global", sql="SELECT * FROM secret")
            assert "may not read secret" in message and "allowed, v_allowed" in message
            assert "may not write to shared" in await refused(s, "execute", database="global",
                                                              sql="DELETE FROM shared")
            await ok(s, "execute", database="global", sql="INSERT INTO allowed VALUES (7)")
            assert (await ok(s, "query", database="global", sql="SELECT x FROM allowed"))["rows"] == [[7]]
            tables = {t["name"]: t["privileges"] for t in
                      (await ok(s, "list_tables", database="global"))["tables"]}
            assert tables["allowed"] == ["select", "insert", "update", "delete"] and tables["secret"] == []
        with as_agent(runtime, tenants.ws_b) as b:
            assert "permission denied for table secret" in denied(b, "SELECT * FROM secret")
            assert "permission denied for table shared" in denied(b, "DELETE FROM shared")
            # The tricks that would reach a table through an object the owner role ends up owning:
            b.execute("CREATE VIEW v_allowed AS SELECT * FROM secret")  # a view runs as its invoker...
            assert "permission denied for table secret" in denied(b, "SELECT * FROM v_allowed")
            assert "not allowed in the shared global database" in denied(  # ...and no routine can exist
                b, "CREATE FUNCTION peek() RETURNS SETOF int LANGUAGE sql SECURITY DEFINER AS "
                   "'SELECT x FROM secret'")
            assert "not allowed in the shared global database" in denied(  # one agent's code never runs as another's
                b, "CREATE TRIGGER t BEFORE UPDATE ON allowed FOR EACH ROW "
                   "EXECUTE FUNCTION suppress_redundant_updates_trigger()")
    finally:
        set_perms(runtime, tenants.ws_b)


async def test_new_table_is_at_once_usable_by_every_agent_allowed_to(runtime: Runtime, base_url: str,
                                                                    tenants: Tenants) -> None:
    ws_d, token_d = tenants.extra["ws_d"], tenants.extra["token_d"]
    set_perms(runtime, ws_d, allowed_tables=["shared"])
    try:
        async with http_session(base_url, tenants.token_b) as b, http_session(base_url, token_d) as d:
            async with http_session(base_url, tenants.token_a) as a:
                await ok(a, "execute", database="global", sql="CREATE TABLE fresh (id int)")
                await ok(a, "execute", database="global", sql="INSERT INTO fresh VALUES (1)")
            # B's session was open before the table existed: it reads it at once.
            assert (await ok(b, "query", database="global", sql="SELECT id FROM fresh"))["rows"] == [[1]]
            await ok(b, "execute", database="global", sql="INSERT INTO fresh VALUES (2)")
            assert "may not read fresh" in await refused(d, "query", database="global", sql="SELECT * FROM fresh")
        with as_agent(runtime, ws_d) as conn:
            assert "permission denied for table fresh" in denied(conn, "SELECT * FROM fresh")
        with as_agent(runtime, tenants.ws_a) as conn:
            assert conn.execute("SELECT count(*) FROM fresh").fetchone() == (2,)
    finally:
        set_perms(runtime, ws_d)


def test_inconsistent_permissions_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot be combined with allowed_tables"):
        GlobalDbPermissions(can_drop_tables=True, allowed_tables=["a"])
    with pytest.raises(ValueError, match="requires can_read, can_write and can_create_tables"):
        GlobalDbPermissions(can_drop_tables=True, can_write=False)
    assert GlobalDbPermissions(allowed_tables=["a", "a", "b"]).allowed_tables == ["a", "b"]


# -- the known bypasses ---------------------------------------------------------------------------------

BYPASSES = [
    ("query", "SELECT 1; COMMIT; DROP TABLE shared", "3 statements"),
    ("execute", "SELECT 1; COMMIT; DROP TABLE shared", "3 statements"),
    ("query", "WITH d AS (DELETE FROM shared RETURNING *) SELECT * FROM d", "Use the execute tool"),
    ("query", "SET TRANSACTION READ WRITE", "SET TRANSACTION is not allowed"),
    ("query", "SELECT set_config('default_transaction_read_only', 'off', false)", "set_config() is not allowed"),
    ("execute", "SET statement_timeout = 0", "SET statement_timeout is not allowed"),
    ("query", "SELECT pg_read_file('/etc/passwd')", "pg_read_file() is not allowed"),
    ("execute", "COPY (SELECT 1) TO PROGRAM 'id'", "would run a shell command"),
    ("execute", "CREATE EXTENSION dblink", "agentpg never installs it"),
    ("execute", "SET ROLE postgres", "SET ROLE is not allowed"),
    ("query", "SELECT * FROM dblink('dbname=postgres', 'SELECT 1') AS t(x int)", "dblink() is not allowed"),
]


async def test_known_bypasses_are_refused_through_mcp(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_a) as s:
        for tool, statement, why in BYPASSES:
            assert why in await refused(s, tool, database="global", sql=statement), statement
        assert (await ok(s, "query", database="global", sql="SELECT count(*) FROM shared"))["rows"] == [[2]]
        # The refused SET did not stick: a long statement is still cancelled (it would otherwise succeed).
        assert "cancelled" in await refused(s, "query", database="global", sql="SELECT pg_sleep(10)")


async def test_known_bypasses_fail_as_the_agent_role(runtime: Runtime, tenants: Tenants) -> None:
    with as_agent(runtime, tenants.ws_a) as a:
        assert "pg_read_file" in denied(a, "SELECT pg_read_file('/etc/passwd')")
        assert "external program" in denied(a, "COPY (SELECT 1) TO PROGRAM 'id'")
        assert "permission denied" in denied(a, "COPY shared TO '/tmp/x'")
        denied(a, "CREATE EXTENSION dblink")
        other_role = urlsplit(workspace_global_uri(runtime, tenants.ws_b)).username
        superuser = conninfo_to_dict(runtime.admin_dsn)["user"]
        for role in (other_role, superuser):
            assert "permission denied to set role" in denied(a, f'SET ROLE "{role}"')
        me = a.execute("SELECT current_user").fetchone()
        # Role catalogs are hidden from agents (tests/test_attack_postgres.py); the admin looks instead.
        assert "permission denied" in denied(a, "SELECT rolname FROM pg_roles")
    with psycopg.connect(runtime.admin_dsn, autocommit=True) as admin:
        attrs = admin.execute("SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
                              "FROM pg_roles WHERE rolname = %s", me).fetchone()
        assert attrs == (False,) * 5
        assert admin.execute("SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
                             "WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = %s)", me).fetchone() == (0,)


async def test_query_path_holds_without_the_classifier(runtime: Runtime, tenants: Tenants) -> None:
    """TenantQueries.run has no pre-check: what it refuses, the server refused."""
    queries = TenantQueries(TenantPools(PoolLimits(max_size=1)), QueryLimits(statement_timeout_s=1.0))
    uri = workspace_global_uri(runtime, tenants.ws_a)
    try:
        for read_only in (True, False):  # one statement only, even without parameters
            with pytest.raises(StatementFailed, match="cannot insert multiple commands"):
                await queries.run(uri, "SELECT 1; COMMIT; DROP TABLE shared", read_only=read_only)
        with pytest.raises(StatementFailed, match="read-only transaction") as info:
            await queries.run(uri, "WITH d AS (DELETE FROM shared RETURNING *) SELECT * FROM d", read_only=True)
        assert info.value.outcome == "denied"
        # The read's transaction is read only from its start: once the statement runs, nothing can lift it.
        # (In the shared database set_config is not even available to agents.)
        with pytest.raises(StatementFailed, match=r"read-write mode must be set|permission denied for function"):
            await queries.run(uri, "SELECT set_config('transaction_read_only', 'off', true)", read_only=True)
        # SET TRANSACTION alone is the whole (implicit) transaction: it may run, and changes nothing after it.
        await queries.run(uri, "SET TRANSACTION READ WRITE", read_only=True)
        await queries.run(uri, "SET default_transaction_read_only = off", read_only=False)
        with pytest.raises(StatementFailed, match="read-only transaction"):
            await queries.run(uri, "INSERT INTO shared VALUES (9, 'x')", read_only=True)
        # A session-level SET in one call does not survive into the next on the same (pooled) connection.
        pid = (await queries.run(uri, "SELECT pg_backend_pid()", read_only=True)).rows
        await queries.run(uri, "SET statement_timeout = 0", read_only=False)
        await queries.run(uri, "SET search_path = pg_catalog", read_only=False)
        assert (await queries.run(uri, "SELECT current_setting('statement_timeout'), current_setting("
                                  "'search_path'), pg_backend_pid()", read_only=True)).rows == [
            ["1s", '"$user", public', pid[0][0]]]
        # Advisory locks (a channel between sessions) are not available to agents in the shared database.
        with pytest.raises(StatementFailed, match="permission denied for function"):
            await queries.run(uri, "SELECT pg_advisory_lock(4242)", read_only=True)
        # A read's columns are known even when no row matched.
        empty = await queries.run(uri, "SELECT 1 AS a, 'x'::text AS b WHERE false", read_only=True)
        assert [(c.name, c.type) for c in empty.columns] == [("a", "int4"), ("b", "text")] and empty.rows == []
        for sql, params in (("SELECT 1 -- \x00", None), ("SELECT $1::text", ["a\x00b"])):
            with pytest.raises(StatementFailed, match="NUL"):
                await queries.run(uri, sql, params, read_only=True)
        with pytest.raises(StatementFailed, match="cancelled") as info:
            await queries.run(uri, "SELECT pg_sleep(10)", read_only=True)
        assert info.value.outcome == "timeout"
        assert (await queries.run(uri, "SELECT count(*) FROM shared", read_only=True)).rows == [[2]]
        # Cancelled from outside even when the server-side timeout would not fire (e.g. raised by the tenant).
        patient = TenantQueries(queries.pools, QueryLimits(statement_timeout_s=60))
        with pytest.raises(StatementFailed, match="cancelled"):  # pg_sleep(10) would succeed within 60 s
            await patient.run(uri, "SELECT pg_sleep(10)", read_only=True, cancel_after_s=0.5)
        assert (await queries.run(uri, "SELECT 1", read_only=True)).rows == [[1]]  # the connection is fine
    finally:
        await queries.close()


async def test_reads_stay_read_only_whatever_the_role_sets_for_itself(runtime: Runtime, tenants: Tenants) -> None:
    """The read-only default and the timeout come in the startup packet, which outranks the role's own
    ``ALTER ROLE ... SET`` (an ordinary role may set defaults for itself) and is what ``RESET ALL`` restores."""
    uri = workspace_global_uri(runtime, tenants.ws_a)
    queries = TenantQueries(TenantPools(PoolLimits(max_size=1)), QueryLimits(statement_timeout_s=1.0))
    try:
        await queries.run(uri, "ALTER ROLE CURRENT_USER SET default_transaction_read_only = off", read_only=False)
        await queries.run(uri, "ALTER ROLE CURRENT_USER SET statement_timeout = 0", read_only=False)
        await queries.pools.forget(uri)  # fresh connections: the role's settings would apply now
        settings = await queries.run(uri, "SELECT current_setting('default_transaction_read_only'), "
                                          "current_setting('statement_timeout')", read_only=True)
        assert settings.rows == [["on", "1s"]]
        with pytest.raises(StatementFailed, match="read-only transaction"):
            await queries.run(uri, "SELECT * FROM shared FOR UPDATE", read_only=True)
        await queries.run(uri, "RESET ALL", read_only=False)
        assert (await queries.run(uri, "SELECT current_setting('statement_timeout')", read_only=True)).rows == [["1s"]]
    finally:
        await queries.run(uri, "ALTER ROLE CURRENT_USER RESET ALL", read_only=False)
        await queries.close()


async def test_values_and_the_byte_cap(runtime: Runtime, tenants: Tenants) -> None:
    queries = TenantQueries(TenantPools(), QueryLimits(max_result_bytes=2_000))
    try:
        uri = runtime.service.uris.agent(tenants.ws_c, "agent")
        capped = await queries.run(uri, "SELECT repeat('x', 500) FROM generate_series(1, 10)", read_only=True)
        assert capped.truncated and capped.truncated_by == "max_result_bytes" and 1 <= capped.row_count < 4
        values = await queries.run(uri, "SELECT 1.5::numeric, 12345678901234567890.5::numeric, 'NaN'::float8, "
                                   "'2024-05-01 12:00+00'::timestamptz, '\\x00ff'::bytea, '{\"a\": [1]}'::jsonb, "
                                   "ARRAY[1, NULL], interval '1 month 2 days', NULL::int, true", read_only=True)
        assert values.rows == [[1.5, "12345678901234567890.5", "nan", "2024-05-01T12:00:00+00:00", "\\x00ff",
                                {"a": [1]}, [1, None], "1 mon 2 days", None, True]]
        assert [c.type for c in values.columns][:3] == ["numeric", "numeric", "float8"]
    finally:
        await queries.close()
