"""The attacker beyond tests/test_attack_postgres.py: an agent, through MCP and connected directly as its own
role, tries to get its code run by a more privileged principal (agentpg's superuser loading a restore, or
running the tenant SQL for ``reconcile --upgrade``), to store rows without write permission or past the
read-only switch, to own an object its workspace's deletion trips on, and to get a secret out of other
principals' reads through side effects of its view (a sequence it advances, its tables' scan counts).

Each test asserts the safe outcome (the superuser never ran the agent's function, no row was stored, the
agent read nothing), never an error string.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from attack_support import VIAS, World, db_of, open_world, relation_rows, role_of
from helpers import with_database
from mcp_support import archived_server, http_session, ok, uid
from psycopg import sql
from sqlalchemy import select

from agentpg.app.runtime import Runtime, admin_dsn
from agentpg.catalog.models import WorkspaceAgentDatabase
from agentpg.lifecycle.users import plan_of
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

#: Names agent ``a`` (restricted by allowed_tables) may use, per way in.
A_TABLES = ("sq", "sqv", "clk", "dg0", "dg1", "dg2", "dg3", "dg4", "dg5", "dg6", "dg7", "dg8", "dg9", "stv")


@pytest.fixture(params=VIAS)
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def world(runtime: Runtime, settings: Settings) -> Iterator[World]:
    """One user with agents a (allowed_tables), b (full rights), w (can_write=false); another user's c."""
    perms: dict[str, dict[str, Any]] = {"a": {"allowed_tables": [f"{t}_{v}" for v in VIAS for t in A_TABLES]},
                                        "w": {"can_write": False}}
    with open_world(runtime, settings, "rt", ("a", "b", "w", "c"), perms) as world:
        yield world


def recorder(role_target: str) -> str:
    """A VOLATILE function that notes who runs it (and whether as a superuser) in ``public.whom``, and tries to
    make ``role_target`` a superuser; everything it does is allowed to fail."""
    return f"""CREATE FUNCTION public.note_whom() RETURNS int LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  BEGIN INSERT INTO public.whom VALUES (current_user, current_setting('is_superuser'));
  EXCEPTION WHEN others THEN NULL; END;
  BEGIN EXECUTE 'ALTER ROLE "{role_target}" SUPERUSER'; EXCEPTION WHEN others THEN NULL; END;
  RETURN 1;
END $f$"""


# -- 1. agentpg's own superuser SQL resolving to an agent's function ----------------------------------------


async def test_reconcile_upgrade_never_runs_agent_db_functions_as_superuser(world: World, via: str) -> None:
    """``reconcile --upgrade`` re-runs the tenant SQL (BOOTSTRAP) in every agent database as agentpg's admin,
    with the default search_path ("$user", public). Its DO block calls ``format('…', text)`` unqualified: an
    agent's ``public.format(text, text)`` is a better match than ``pg_catalog.format(text, VARIADIC "any")``."""
    s = f"_{via}"
    uri = world.uri("a", "agent")
    own = role_of(uri)
    async with world.agent("a", via, database="agent") as a:
        assert await a.all(f"CREATE TABLE public.whom{s} (who text, su text)"), a.errors
        await a.run(recorder(own).replace("note_whom", f"note_whom{s}").replace("public.whom", f"public.whom{s}"))
        await a.run(f"""CREATE FUNCTION public.format(text, text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM public.note_whom{s}(); RETURN pg_catalog.format($1, $2); END $f$""")
    svc = world.runtime.service
    with svc.deps.sessions() as session:
        plan = plan_of(session.scalars(select(WorkspaceAgentDatabase).where(
            WorkspaceAgentDatabase.workspace_id == world.ws["a"])).one())
    try:
        svc.deps.provider.refresh_tenant_sql(plan)  # what `agentpg reconcile --upgrade` runs per database
    finally:
        with world.tenant_admin(db_of(uri)) as adm:
            who = relation_rows(world, f"whom{s}", db_of(uri))
            superuser = adm.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (own,)).fetchone()
            adm.execute("DROP FUNCTION IF EXISTS public.format(text, text)")
            adm.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(own)))
    assert superuser == (False,), "reconcile --upgrade ran the agent's public.format() and made it a superuser"
    assert "'on'" not in who, f"reconcile --upgrade ran the agent's public.format() as a superuser: {who[:300]}"


# -- 2. rows stored without write permission ---------------------------------------------------------------


async def test_no_rows_stored_without_write_permission_by_create_as(world: World, via: str) -> None:
    """Agent w (can_write=false, can_create_tables=true) fills a new table in the statement that creates it."""
    s = f"_{via}"
    payload = "pl" + uuid.uuid4().hex[:14]
    async with world.agent("w", via) as w:
        for statement in (f"CREATE TABLE wct{s} AS SELECT '{payload}'::text AS v",
                          f"SELECT '{payload}'::text AS v INTO wsi{s}",
                          f"CREATE MATERIALIZED VIEW wmv{s} AS SELECT '{payload}'::text AS v"):
            await w.run(statement)
    stored = {t: relation_rows(world, t) for t in (f"wct{s}", f"wsi{s}", f"wmv{s}")}
    written = [t for t, rows in stored.items() if payload in rows]
    assert not written, f"a can_write=false agent stored rows with CREATE ... AS: {written}"


async def test_read_only_database_stores_nothing_from_agents(world: World, via: str) -> None:
    """While the user is over its storage limit or budget every role of the database is read-only at the grant
    level. An agent that created a text search configuration before (it is not adopted: the agent owns it)
    keeps writing to the catalog through COMMENT (up to 1 GB a comment) while the database is read-only."""
    s = f"_{via}"
    payload = "pl" + uuid.uuid4().hex[:14]
    async with world.agent("b", via) as b:
        await b.run(f"CREATE TEXT SEARCH CONFIGURATION public.bcfg{s} (COPY = pg_catalog.simple)")
    with world.tenant_admin() as adm:
        adm.execute("SELECT agentpg_internal.set_read_only(true)")
    try:
        async with world.agent("b", via) as b:
            assert await b.rows("SELECT count(*) FROM secret") == [[1]], b.errors  # reads keep working
            await b.run(f"COMMENT ON TEXT SEARCH CONFIGURATION public.bcfg{s} IS '{payload}'")
    finally:
        with world.tenant_admin() as adm:
            adm.execute("SELECT agentpg_internal.set_read_only(false)")
            stored = adm.execute("SELECT count(*) FROM pg_description WHERE description = %s", (payload,)).fetchone()
    assert stored == (0,), "an agent wrote to a read-only database (COMMENT on an object it owns)"


# -- 3. side channels from other principals' reads of a restricted agent's view ---------------------------


async def test_views_never_advance_the_authors_sequences_with_the_readers_rights(world: World, via: str) -> None:
    """Restricted agent a (may not read ``secret``) makes a view that calls nextval() on its own sequence once per
    unit of the secret's first digit; agent b, who may read it, reads the view; a reads its sequence."""
    s = f"_{via}"
    digits = str(world.number)
    async with world.agent("a", via) as a:
        assert await a.run(f"CREATE SEQUENCE sq{s}"), a.errors
        await a.run(f"CREATE VIEW sqv{s} AS SELECT nextval('public.sq{s}') AS v FROM public.secret, "
                    f"generate_series(1, 10 + substr(secret.n::text, 1, 1)::int) g")
    async with world.agent("b", via) as b:
        await b.run(f"SELECT count(*) FROM sqv{s}")
    async with world.agent("a", via) as a:
        got = await a.rows(f"SELECT last_value FROM sq{s}")
    learned = str(int(got[0][0]) - 10) if got and got[0][0] is not None and int(got[0][0]) > 10 else None
    assert learned != digits[0], f"agent a read the secret's first digit ({learned}) off its own sequence"


async def test_reads_of_a_view_never_signal_through_its_authors_table_statistics(world: World, via: str,
                                                                                 api_client: Any) -> None:
    """Restricted agent a makes a view whose one row scans a's table dg<i> as many times as the secret's i-th
    digit (and clk once); the user reads it through REST (READ ONLY, pinned search_path); a reads
    pg_stat_user_tables of its own tables and rebuilds the number."""
    s = f"_{via}"
    digits = str(world.number)
    async with world.agent("a", via) as a:
        for t in ["clk", *(f"dg{i}" for i in range(len(digits)))]:
            assert await a.all(f"CREATE TABLE {t}{s} (id int)", f"INSERT INTO {t}{s} VALUES (1)"), a.errors
        cols = ", ".join(
            f"(SELECT sum((SELECT count(*) FROM public.dg{i}{s} WHERE g > 0)) "
            f"FROM generate_series(1, substr(sec.n::text, {i + 1}, 1)::int) g) AS d{i}" for i in range(len(digits)))
        if not await a.run(f"CREATE VIEW stv{s} AS SELECT (SELECT count(*) FROM public.clk{s}) AS c, {cols} "
                           "FROM public.secret sec"):
            return  # refused (the MCP classifier refuses a view over a table a may not read): nothing to signal
        before = {r[0]: int(r[1]) for r in await a.rows(
            f"SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname LIKE '%{s}'") or []}
    admin_h = {"Authorization": f"Bearer {world.admin_token}"}
    api_client.post(f"/api/users/{world.user}/global-database/query", json={"table": f"stv{s}", "limit": 1},
                    headers=admin_h)  # one read by the user's reader
    learned = ""
    deadline = time.monotonic() + 15  # a backend sends its statistics within 1-10 s of going idle
    while time.monotonic() < deadline:
        async with world.agent("a", via) as a:
            now = {r[0]: int(r[1]) for r in await a.rows(
                f"SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname LIKE '%{s}'") or []}
        clock = now.get(f"clk{s}", 0) - before.get(f"clk{s}", 0)
        if clock > 0:
            learned = "".join(str((now.get(f"dg{i}{s}", 0) - before.get(f"dg{i}{s}", 0)) // clock)
                              for i in range(len(digits)))
            break
        time.sleep(0.5)
    assert not world.leaked(learned), f"agent a rebuilt the secret number {learned} from its tables' statistics"


# -- 4. deleting an agent ----------------------------------------------------------------------------------


async def test_an_agent_cannot_make_its_workspace_undeletable(world: World, via: str) -> None:
    """Objects the adopt trigger does not hand to the owner role (a text search configuration) stay the agent's;
    deleting its workspace runs DROP OWNED BY its role. When a shared table depends on that object (a generated
    column), the drop fails: the workspace cannot be deleted and the agent's role keeps its access."""
    s, svc = f"_{via}", world.runtime.service
    key = f"e{s}"
    world.ws[key] = uid("rte")
    _, issued = svc.create_workspace_with_token(world.user, world.ws[key])
    world.tokens[key] = issued.secret
    uri = world.uri(key)
    async with world.agent(key, via) as e:
        await e.run(f"CREATE TEXT SEARCH CONFIGURATION public.ecfg{s} (COPY = pg_catalog.simple)")
        await e.run(f"CREATE TABLE et{s} (x text, v tsvector GENERATED ALWAYS AS "
                    f"(to_tsvector('public.ecfg{s}'::regconfig, x)) STORED)")
        await e.run(f"INSERT INTO et{s} (x) VALUES ('kept')")
    error = ""
    try:
        svc.delete_workspace(world.ws[key])
    except Exception as exc:  # what the user would see
        error = f"{type(exc).__name__}: {exc}"
    still = ""
    try:
        with psycopg.connect(uri, autocommit=True, connect_timeout=5) as conn:
            still = repr(conn.execute("SELECT current_user").fetchone())
    except psycopg.Error:
        pass
    if error:  # clean up what blocked the deletion, so the module's user can be deleted
        with world.tenant_admin() as adm:
            adm.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"et{s}")))
            adm.execute(sql.SQL("DROP TEXT SEARCH CONFIGURATION IF EXISTS {}").format(
                sql.Identifier("public", f"ecfg{s}")))
        svc.delete_workspace(world.ws[key])
    assert not error, f"the user could not delete the agent's workspace: {error[:300]}"
    assert not still, "the deleted agent's role can still connect to the global database"


# -- 5. restore: the dump of an agent database is loaded as agentpg's superuser ---------------------------


@pytest.fixture(scope="module")
def archived() -> Iterator[tuple[str, str, str]]:
    """A private archived server with ``serve`` (restore needs continuous archiving): base URL, an agent's
    token, the server's admin DSN."""
    with archived_server("agentpg-attack-") as (settings, url, api):
        user = uid("rtundo")
        assert api.post("/api/users", json={"id": user}).status_code == 201
        created = api.post(f"/api/users/{user}/workspaces", json={"id": "agent"})
        assert created.status_code == 201, created.text
        yield url, created.json()["agent_token"]["token"], admin_dsn(settings)[0]


async def test_restoring_an_agent_database_never_runs_its_code_as_superuser(
        archived: tuple[str, str, str]) -> None:
    """The agent puts its IMMUTABLE function in an index expression and a CHECK constraint of its own agent
    database (its own rights there: fine), checkpoints, and restores through its MCP ``restore`` tool. The dump
    is loaded by pg_restore as agentpg's admin with --no-owner, so tables and the function belong to the
    superuser while the index is built and the rows are copied: the function must not run as the superuser."""
    url, token, dsn = archived
    async with http_session(url, token, timeout=300) as session:
        own, database = (await ok(session, "query", database="agent",
                                  sql="SELECT current_user, current_database()"))["rows"][0]
        for statement in ("CREATE TABLE public.whom (who text, su text)", recorder(own),
                          "CREATE FUNCTION public.imm(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
                          "$f$BEGIN PERFORM public.note_whom(); RETURN $1; END$f$",
                          "CREATE TABLE public.ix (x int)", "INSERT INTO public.ix VALUES (1)",
                          "CREATE INDEX ON public.ix ((public.imm(x)))",
                          "CREATE TABLE public.ck (x int CHECK (public.imm(x) > 0))",
                          "INSERT INTO public.ck VALUES (1)",
                          "DELETE FROM public.whom"):
            await ok(session, "execute", database="agent", sql=statement)
        checkpoint = await ok(session, "checkpoint", database="agent", name="before")
        checkpoint_id = checkpoint["checkpoints"][0]["id"]
        await ok(session, "restore", checkpoint_id=checkpoint_id)
    with psycopg.connect(dsn, autocommit=True) as adm:
        superuser = adm.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (own,)).fetchone()
    with psycopg.connect(with_database(dsn, database), autocommit=True) as adm:
        who = adm.execute("SELECT who, su FROM public.whom").fetchall()
    assert superuser == (False,), "restoring its agent database made the agent a superuser"
    assert all(row[1] != "on" for row in who), f"the restore ran the agent's function as a superuser: {who}"
