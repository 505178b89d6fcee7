"""The attacker's module (issue 17): agents trying to run their code with more rights than their own, to
write without write permission and to see other tenants, in the user's shared global database and in
their own agent database.

Every attack is driven twice, through the MCP tools and connected directly as the agent's Postgres role,
and its consequence is triggered for real: the operator's ANALYZE/VACUUM/REINDEX/CLUSTER, the user's reads
through the REST rows and export routes, the explorer's grid and SQL box, another agent's writes and reads.
Any step may be refused (that is one way of blocking the attack); a test fails only on the outcome: the
secret reached something the attacker can read, a function became SECURITY DEFINER, a view stopped being
``security_invoker``, a write happened, another tenant's names or sessions showed. Where the lockdown could
be "passed" by breaking what agents legitimately do, the test checks that this still works too.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

import psycopg
import pytest
from attack_support import (
    VIAS,
    World,
    db_of,
    is_invoker,
    maintain,
    open_world,
    relation_rows,
    role_of,
    sql_box,
    user_reads,
    watching,
)
from helpers import agent_db_uri, global_uri, workspace_global_uri
from mcp_support import uid

from agentpg.access.permissions import GlobalDbPermissions
from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio

#: Names agent ``a`` (restricted by allowed_tables) may use, each once per way in (``_mcp``, ``_direct``).
A_TABLES = ("loot", "ix1", "ix2", "ix3", "ix4", "okix", "okt", "v3f", "v3b", "v3l", "v3n", "v3t", "v3ok",
            "cust", "sv", "sv2", "d1", "d2", "d3", "d4", "d5", "d6", "chk", "gen", "vts", "vqx", "pol",
            "pol1", "own", "own1", "mv", "sq", "vw", "tas", "rul", "loot5", "loot6", "v3r", "v3w", "chk2", "vtr",
            "cust2")


def names(via: str) -> dict[str, str]:
    return {base: f"{base}_{via}" for base in A_TABLES}


@pytest.fixture(params=VIAS)
def via(request: pytest.FixtureRequest) -> str:
    """Each attack through the MCP tools, and connected directly as the agent's own Postgres role."""
    return str(request.param)


@pytest.fixture(scope="module")
def world(runtime: Runtime, settings: Settings) -> Iterator[World]:
    allowed = [f"{base}_{via}" for via in VIAS for base in A_TABLES]
    perms: dict[str, dict[str, Any]] = {"a": {"allowed_tables": allowed}, "d": {"can_drop_tables": True},
                                        "r": {"can_read": False},
             "w": {"can_write": False}}

    def forbidden(ws: dict[str, str], other: str) -> set[str]:
        found = {db_of(global_uri(runtime, other)), role_of(workspace_global_uri(runtime, ws["c"]))}
        for name in ("b", "c"):  # other agents' own databases, and their roles
            uri = agent_db_uri(runtime, ws[name])
            found |= {db_of(uri), role_of(uri)}
        with psycopg.connect(runtime.admin_dsn, autocommit=True) as adm:  # owner/login roles of those databases
            for db in [n for n in found if n.startswith("apg_")]:
                found |= {r[0] for r in adm.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)",
                                                    (db,)).fetchall()}
        return found

    with open_world(runtime, settings, "atk", ("a", "b", "d", "r", "w", "c"), perms, forbidden) as world:
        yield world


def prosecdef(world: World, *functions: str) -> list[str]:
    """Those of ``functions`` (names in public) that are SECURITY DEFINER now."""
    with world.tenant_admin() as adm:
        return [r[0] for r in adm.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace "
            "AND p.proname = ANY(%s) AND p.prosecdef", (list(functions),)).fetchall()]


def not_owned_by_owner_role(world: World) -> list[str]:
    with world.tenant_admin() as adm:
        owner = f"{world.global_db}_owner"
        return [r[0] for r in adm.execute(
            "SELECT c.relname || ' (' || c.relkind::text || ')' FROM pg_class c WHERE c.relnamespace = "
            "'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') "
            "AND pg_get_userbyid(c.relowner) <> %s", (owner,)).fetchall()]


# -- 2. agent code run as the owner role by maintenance -------------------------------------------------


def leak_function(world: World, s: str) -> str:
    """VOLATILE: copy the secret into loot, make another agent's function SECURITY DEFINER, grant the
    attacker the secret, make it a superuser; each step on its own, failures swallowed (run as the attacker
    it all fails). Names are schema-qualified: maintenance and the adopt trigger pin search_path."""
    attacker = world.roles["a"]
    return f"""CREATE FUNCTION public.leak{s}() RETURNS int LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  BEGIN INSERT INTO public.loot{s} SELECT x FROM public.secret; EXCEPTION WHEN others THEN NULL; END;
  BEGIN EXECUTE 'ALTER FUNCTION public.bfn{s}() SECURITY DEFINER'; EXCEPTION WHEN others THEN NULL; END;
  BEGIN EXECUTE 'GRANT SELECT ON public.secret TO "{attacker}"'; EXCEPTION WHEN others THEN NULL; END;
  BEGIN EXECUTE 'ALTER ROLE "{attacker}" SUPERUSER'; EXCEPTION WHEN others THEN NULL; END;
  RETURN 1;
END $f$"""


async def test_maintenance_never_runs_agent_code_as_the_owner(world: World, via: str) -> None:
    n, s = names(via), f"_{via}"
    async with world.agent("b", via) as b:  # another agent's function, which the attack would turn
        await b.run(f"CREATE FUNCTION bfn{s}() RETURNS text LANGUAGE sql AS "
                    "$f$SELECT string_agg(x, ',') FROM secret$f$")
    async with world.agent("a", via) as a:
        assert await a.run(f"CREATE TABLE {n['loot']} (v text)"), a.errors  # must keep working
        await a.run(leak_function(world, s))
        await a.run(f"CREATE FUNCTION public.imm{s}(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
                    f"$f$BEGIN PERFORM public.leak{s}(); RETURN $1; END$f$")
        tables = {n["ix1"]: f"(x int, EXCLUDE USING btree ((public.imm{s}(x)) WITH =))",
                  n["ix2"]: f"(x int, EXCLUDE USING btree ((public.imm{s}(1)) WITH =))",
                  n["ix3"]: f"(x int, EXCLUDE USING btree (x WITH =) WHERE (public.imm{s}(x) > 0))",
                  n["ix4"]: f"(x int, EXCLUDE USING btree (x WITH =) WHERE (public.imm{s}(1) > 0))"}
        for table, body in tables.items():
            if await a.run(f"CREATE TABLE {table} {body}"):
                await a.run(f"INSERT INTO {table} VALUES (1)")
    maintain(world, [*tables, n["loot"]])
    loot = relation_rows(world, n["loot"])
    assert not world.leaked(loot), f"maintenance ran the agent's index code as the owner: loot = {loot}"
    assert not prosecdef(world, f"bfn{s}"), "maintenance made another agent's function SECURITY DEFINER"
    with world.tenant_admin() as adm:
        granted = adm.execute("SELECT has_table_privilege(%s, 'public.secret', 'SELECT'), "
                              "(SELECT rolsuper FROM pg_roles WHERE rolname = %s)",
                              (world.roles["a"], world.roles["a"])).fetchone()
    assert granted == (False, False), "maintenance granted the attacker the secret table, or made it a superuser"
    async with world.agent("a", via) as a:
        seen = [await a.text(f"SELECT * FROM {n['loot']}"), await a.text(f"SELECT bfn{s}()"),
                await a.text("SELECT * FROM secret")]
    assert not world.leaked(*seen), seen


async def test_agent_db_code_never_runs_with_more_rights_than_the_agent(world: World, via: str) -> None:
    """In its own database the agent may create functions (that keeps working); neither agentpg's own
    machinery (the adopt trigger, which changes owners) nor the operator's maintenance may run them as a
    role with more rights than the agent's: its index code notes who runs it, and tries to become superuser."""
    s = f"_{via}"
    uri = world.uri("a", "agent")
    database, own = db_of(uri), role_of(uri)
    async with world.agent("a", via, database="agent") as a:
        assert await a.all(
            f"CREATE TABLE whom{s} (who text)",
            f"""CREATE FUNCTION public.note{s}() RETURNS int LANGUAGE plpgsql VOLATILE AS $f$
BEGIN
  BEGIN INSERT INTO public.whom{s} VALUES (current_user);
  EXCEPTION WHEN others THEN NULL; END;
  BEGIN EXECUTE 'ALTER ROLE "{own}" SUPERUSER'; EXCEPTION WHEN others THEN NULL; END;
  RETURN 1;
END $f$""",
            f"CREATE FUNCTION public.imm2{s}(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS "
            f"$f$BEGIN PERFORM public.note{s}(); RETURN $1; END$f$",
            f"SELECT public.imm2{s}(1)"), a.errors
        tables = {f"jx1{s}": f"(x int, EXCLUDE USING btree ((public.imm2{s}(x)) WITH =))",
                  f"jx2{s}": f"(x int, EXCLUDE USING btree ((public.imm2{s}(1)) WITH =))",
                  f"jx3{s}": f"(x int, EXCLUDE USING btree (x WITH =) WHERE (public.imm2{s}(x) > 0))"}
        for table, body in tables.items():
            if await a.run(f"CREATE TABLE {table} {body}"):
                await a.run(f"INSERT INTO {table} VALUES (1)")
        await a.run(f"CREATE INDEX ON jx1{s} ((public.imm2{s}(x + 1)))")
    maintain(world, list(tables), database)
    with world.tenant_admin(database) as adm:
        who = {r[0] for r in adm.execute(f"SELECT who FROM whom{s}").fetchall()}  # type: ignore[arg-type]
        superuser = adm.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (own,)).fetchone()
    assert superuser == (False,), "the agent's code made it a superuser"
    # The agent's login role is a member of its database's owner role: the same rights, never more.
    assert who and who <= {own, f"{database}_owner"}, f"the agent's code ran as: {who}"


async def test_tables_with_builtin_expression_indexes_still_work(world: World, via: str) -> None:
    """The lockdown must not be passed by breaking what agents legitimately do: tables with constraints on
    built-in expressions (the adopt trigger once failed on them: '"…_excl" is an index'), views they read."""
    n = names(via)
    async with world.agent("a", via) as a:
        assert await a.all(
            f"CREATE TABLE {n['okix']} (id int PRIMARY KEY, s text, r int4range, "
            f"EXCLUDE USING btree (lower(s) WITH =), EXCLUDE USING gist (r WITH &&) WHERE (id > 0))",
            f"INSERT INTO {n['okix']} VALUES (1, 'Alice', '[1,5)')",
            f"CREATE TABLE {n['okt']} (id int PRIMARY KEY, v text DEFAULT now()::text CHECK (length(v) < 100), "
            f"g int GENERATED ALWAYS AS (id * 2) STORED)",
            f"INSERT INTO {n['okt']} (id) VALUES (1)",
            f"CREATE VIEW {n['v3ok']} AS SELECT lower(s) AS l FROM {n['okix']}"), a.errors
        assert await a.rows(f"SELECT l FROM {n['v3ok']}") == [["alice"]], a.errors
        assert await a.rows(f"SELECT g FROM {n['okt']}") == [[2]], a.errors
        assert await a.rows(f"INSERT INTO {n['okix']} VALUES (2, 'ALICE', '[7,9)') RETURNING id") is None
    async with world.agent("b", via) as b:  # and another agent uses them at once
        assert await b.rows(f"SELECT s FROM {n['okix']}") == [["Alice"]], b.errors


# -- 3. agent code run as the REST/explorer reader ------------------------------------------------------

XML_TEXT = "regexp_replace(query_to_xml('select x from secret', true, true, '')::text, '<[^>]*>|\\s', '', 'g')"
# The embedded server is built without libxml (the *_to_xml built-ins fail there, they matter on servers that
# have it); ts_rewrite(tsquery, text) and ts_stat(text) run SQL text on every build.
TS_REWRITE = ("ts_rewrite(to_tsquery('simple', 'zz'), "
              "'select to_tsquery(''simple'', ''zz''), to_tsquery(''simple'', x) from secret')::text")
TS_STAT = "(SELECT string_agg(word, ',') FROM ts_stat('select to_tsvector(''simple'', x) from secret'))"


async def test_views_never_run_code_as_the_reader(world: World, via: str, api_client: Any) -> None:
    n, s = names(via), f"_{via}"
    channel = f"chan{s}"
    async with world.agent("a", via) as a:
        await a.run(f"""CREATE FUNCTION spy{s}() RETURNS text LANGUAGE plpgsql AS $f$
DECLARE v_x text; v_n int;
BEGIN
  SELECT string_agg(x, ','), max(n) INTO v_x, v_n FROM secret;
  PERFORM set_config('application_name', left(v_x, 60), false);
  PERFORM pg_advisory_lock(v_n);
  PERFORM pg_notify('{channel}', v_x);
  PERFORM pg_sleep(0.1);
  RETURN 'ran';
EXCEPTION WHEN others THEN RETURN 'blocked';
END $f$""")
        views = {
            n["v3f"]: f"SELECT spy{s}() AS c",
            n["v3b"]: f"SELECT set_config('application_name', left({XML_TEXT}, 60), false) AS c, "
                      "pg_sleep(0.1)::text AS z",
            n["v3l"]: "SELECT pg_try_advisory_lock((SELECT n FROM secret LIMIT 1)) AS c, pg_sleep(0.1)::text AS z",
            n["v3n"]: f"SELECT pg_notify('{channel}', (SELECT x FROM secret LIMIT 1))::text AS c",
            n["v3t"]: f"SELECT set_config('application_name', {TS_STAT}, false) AS c, pg_sleep(0.1)::text AS z",
            n["v3w"]: f"SELECT set_config('application_name', {TS_REWRITE}, false) AS c, pg_sleep(0.1)::text AS z",
        }
        for view, body in views.items():
            await a.run(f"CREATE VIEW {view} AS {body}")
        assert await a.run(f"CREATE TABLE {n['v3r']} (v text)"), a.errors  # creating keeps working
    seen: list[str] = []
    with watching(world.uri("a"), [channel]) as watcher:
        for view in views:
            user_reads(api_client, world, view)  # what the user sees may hold the secret: the user may read it
    seen += watcher.seen
    async with world.agent("a", via) as a:
        seen.append(await a.text("SELECT application_name FROM pg_stat_activity"))
        seen.append(await a.text("SELECT objid FROM pg_locks WHERE locktype = 'advisory'"))
    assert not world.leaked(*seen), f"the reader ran the agent's view code: {world.leaked(*seen)}"
    # Reading a plain table keeps working, for the user and the agent.
    rows = api_client.post(f"/api/users/{world.user}/global-database/query", json={"table": "secret"},
                           headers={"Authorization": f"Bearer {world.admin_token}"})
    assert rows.status_code == 200 and rows.json()["rows"][0]["x"] == world.marker, rows.text[:500]


async def test_agent_db_views_run_with_the_agents_rights_only(world: World, via: str, api_client: Any) -> None:
    """In its own database the agent may create functions; the user's reads of its views must not run them
    with more rights than the agent's own role."""
    s = f"_{via}"
    view = f"whov{s}"
    async with world.agent("a", via, database="agent") as a:
        assert await a.all(
            f"""CREATE FUNCTION who{s}() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
  PERFORM set_config('application_name', 'who:' || current_user || ':' || current_setting('is_superuser'), false);
  PERFORM pg_sleep(0.1);
  RETURN 'ok';
END $f$""",
            f"CREATE VIEW {view} AS SELECT who{s}() AS c"), a.errors  # must keep working in its own database
        assert await a.rows(f"SELECT c FROM {view}") == [["ok"]], a.errors
    own = role_of(world.uri("a", "agent"))
    with watching(world.uri("a", "agent")) as watcher:
        user_reads(api_client, world, view, workspace=world.ws["a"])
    who = {part for seen in watcher.seen for part in seen.split("'") if part.startswith("who:")}
    assert who <= {f"who:{own}:off"}, f"the agent's code ran as another role: {who}"


# -- 4. search-path hijack in the explorer's SQL box ----------------------------------------------------


async def test_sql_box_never_runs_agent_functions(world: World, via: str, api_client: Any) -> None:
    n, s = names(via), f"_{via}"
    spy = ("PERFORM set_config('application_name', coalesce((SELECT string_agg(x, ',') FROM secret), 'none'), "
           "false); PERFORM pg_sleep(0.1)")
    async with world.agent("a", via) as a:
        assert await a.all(f"CREATE TABLE {n['cust']} (id int, name varchar(40))",
                           f"INSERT INTO {n['cust']} VALUES (1, 'ALICE'), (2, 'Bob')"), a.errors
        for fn in ("lower", "upper"):
            await a.run(f"""CREATE OR REPLACE FUNCTION public.{fn}(varchar) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN BEGIN {spy}; EXCEPTION WHEN others THEN NULL; END; RETURN 'hijacked'; END $f$""")
        await a.run(f"""CREATE FUNCTION eqspy{s}(varchar, varchar) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN BEGIN {spy}; EXCEPTION WHEN others THEN NULL; END; RETURN $1::text = $2::text; END $f$""")
        await a.run(f"CREATE OPERATOR public.= (LEFTARG = varchar, RIGHTARG = varchar, FUNCTION = eqspy{s})")
        # Built-ins only: max(varchar) beats pg_catalog.max(text), and ts_rewrite runs each value as SQL.
        await a.run(f"CREATE TABLE {n['cust2']} (name varchar(200))")
        await a.run(f"INSERT INTO {n['cust2']} VALUES ('select ''zz''::tsquery, "
                    "set_config(''application_name'', x, false)::tsquery from secret')")
        await a.run("CREATE AGGREGATE public.max(varchar) (sfunc = pg_catalog.ts_rewrite, stype = tsquery, "
                    "initcond = 'zz')")
    results: list[tuple[int, str]] = []
    with watching(world.uri("a")) as watcher:
        for statement in (f"SELECT lower(name) AS l FROM {n['cust']} ORDER BY id",
                          f"SELECT upper(name) AS u FROM {n['cust']} ORDER BY id",
                          f"SELECT id FROM {n['cust']} WHERE name = 'ALICE'",
                          f"SELECT max(name) AS m FROM {n['cust2']}"):
            results.append(sql_box(api_client, world, statement))
        async with world.agent("b", via) as b:  # another agent's own reads must not run it either
            await b.run(f"SELECT max(name) FROM {n['cust2']}")
            await b.run(f"SELECT lower(name) FROM {n['cust']}")
    assert not world.leaked(*watcher.seen), f"the SQL box ran the agent's function: {world.leaked(*watcher.seen)}"
    (s1, lower), (s2, upper), (s3, eq), (s4, top) = results
    assert s1 == 200 and ">alice<" in lower and "hijacked" not in lower, lower[-1500:]
    assert s2 == 200 and ">BOB<" in upper and "hijacked" not in upper, upper[-1500:]
    assert s3 == 200 and "1 row" in eq, eq[-1500:]
    assert s4 == 200 and "set_config" in top, top[-1500:]


# -- 5. SECURITY DEFINER and security_invoker through the back door -------------------------------------


async def test_functions_and_views_never_gain_the_owners_rights(world: World, via: str) -> None:
    """A co-owner (can_drop_tables) tries every way to make a function SECURITY DEFINER or a view run as
    its owner; then a restricted agent (allowed_tables) and a can_read=false agent try to read through them."""
    n, s = names(via), f"_{via}"
    body = "$f$SELECT string_agg(x, ',') FROM secret$f$"
    alter_fn = f"ALTER FUNCTION sf{s}() SECURITY DEFINER"
    alter_views = [f"ALTER VIEW {n['sv']} SET (security_invoker = false)",
                   f"ALTER VIEW {n['sv']} RESET (security_invoker)",
                   f"ALTER TABLE {n['sv']} SET (security_invoker = off)",
                   f"ALTER VIEW {n['sv2']} SET (security_invoker = false)"]
    async with world.agent("d", via) as d:
        # What a co-owner legitimately does keeps working.
        mine = f"{n['own']}d"
        assert await d.all(f"CREATE TABLE {mine} (x text)", f"ALTER TABLE {mine} ADD COLUMN y int",
                           f"CREATE INDEX ON {mine} (lower(x))", f"DROP TABLE {mine}"), d.errors
        assert await d.rows("SELECT count(*) FROM secret") == [[1]], d.errors
        await d.run(f"CREATE FUNCTION sf{s}() RETURNS text LANGUAGE sql AS {body}")
        await d.run(f"CREATE VIEW {n['sv']} AS SELECT x FROM secret")
        await d.run(f"CREATE VIEW {n['sv2']} WITH (security_invoker = false) AS SELECT x FROM secret")
        for statement in (alter_fn, f"ALTER ROUTINE sf{s}() SECURITY DEFINER", *alter_views,
                          f"CREATE OR REPLACE VIEW {n['sv']} WITH (security_invoker = false) AS SELECT x FROM secret",
                          f"DO $d$BEGIN EXECUTE '{alter_fn}'; END$d$",
                          f"CREATE OR REPLACE FUNCTION sf{s}() RETURNS text LANGUAGE sql SECURITY DEFINER AS {body}"):
            await d.run(statement)
        executes = " ".join(f"BEGIN EXECUTE {psycopg.sql.quote(st)}; EXCEPTION WHEN others THEN NULL; END;"
                            for st in (alter_fn, *alter_views))
        await d.run(f"CREATE FUNCTION esc{s}() RETURNS int LANGUAGE plpgsql AS $f$BEGIN {executes} RETURN 1; END$f$")
        await d.run(f"SELECT esc{s}()")
        await d.run(f"DO $d$BEGIN {executes} END$d$")
        await d.run(f"CREATE PROCEDURE escp{s}() LANGUAGE plpgsql AS $f$BEGIN {executes} END$f$")
        await d.run(f"CALL escp{s}()")
    assert not prosecdef(world, f"sf{s}"), "a function became SECURITY DEFINER"
    with world.tenant_admin() as adm:
        views = adm.execute("SELECT relname, reloptions FROM pg_class WHERE relkind = 'v' AND relname = ANY(%s)",
                            ([n["sv"], n["sv2"]],)).fetchall()
    assert all(is_invoker(opts) for _, opts in views), f"a view runs as its owner: {views}"
    seen: list[str] = []
    for name in ("a", "r"):
        async with world.agent(name, via) as reader:
            seen += [await reader.text(f"SELECT sf{s}()"), await reader.text(f"SELECT * FROM {n['sv']}"),
                     await reader.text(f"SELECT * FROM {n['sv2']}")]
    assert not world.leaked(*seen), f"a restricted agent read the secret: {world.leaked(*seen)}"


async def test_co_owners_cannot_hand_out_or_take_rights(world: World, via: str) -> None:
    """A co-owner (can_drop_tables) may drop and alter, but may not hand other agents rights their
    permissions deny, nor take a table for itself, nor attach rules (which run as the table's owner): a grant
    to PUBLIC, or a table it owns, outlives its can_drop_tables and every later permission change."""
    n, s = names(via), f"_{via}"
    vault = f"vault{s}"
    with psycopg.connect(global_uri(world.runtime, world.user), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {vault} (x text)")  # type: ignore[arg-type]
        conn.execute(f"INSERT INTO {vault} VALUES (%s)", (world.marker,))  # type: ignore[arg-type]
    async with world.agent("d", via) as d:
        for statement in (f"GRANT SELECT ON {vault} TO PUBLIC", f'GRANT SELECT ON {vault} TO "{world.roles["a"]}"',
                          f'GRANT SELECT ON {vault} TO "{world.roles["r"]}" WITH GRANT OPTION',
                          f"ALTER TABLE {vault} OWNER TO CURRENT_USER",
                          "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO PUBLIC",
                          "GRANT CREATE ON SCHEMA public TO PUBLIC",
                          # a rule's actions run with its table owner's rights: the owner role's
                          f"CREATE TABLE {n['loot5']} (v text)", f"CREATE TABLE {n['rul']} (v text)",
                          f"CREATE RULE r AS ON INSERT TO {n['rul']} DO ALSO "
                          f"INSERT INTO {n['loot5']} SELECT x FROM {vault}"):
            await d.run(statement)
    async with world.agent("a", via) as a:
        await a.run(f"INSERT INTO {n['rul']} VALUES ('x')")
    with world.tenant_admin() as adm:
        owner = adm.execute("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = %s", (vault,)).fetchone()
        rights = adm.execute("SELECT has_table_privilege(%s, %s, 'SELECT'), has_table_privilege(%s, %s, 'SELECT')",
                             (world.roles["a"], vault, world.roles["r"], vault)).fetchone()
        defaults = adm.execute("SELECT count(*) FROM pg_default_acl").fetchone()
        public = adm.execute("SELECT has_schema_privilege('public', 'public', 'CREATE')").fetchone()
        # Undo what got through, so the other way in starts from the same state.
        adm.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        adm.execute(f'ALTER DEFAULT PRIVILEGES FOR ROLE "{world.roles["d"]}" '  # type: ignore[arg-type]
                    "REVOKE SELECT ON TABLES FROM PUBLIC")
    assert owner == (f"{world.global_db}_owner",), "a co-owner took a table for itself"
    assert rights == (False, False), "a co-owner granted other agents a table their permissions deny"
    assert defaults == (0,), "a co-owner changed default privileges"
    assert public == (False,), "a co-owner let every role create in schema public"
    for name in ("a", "r"):
        async with world.agent(name, via) as reader:
            got = await reader.text(f"SELECT * FROM {vault}") + await reader.text(f"SELECT * FROM {n['loot5']}")
            assert not world.leaked(got), f"agent {name} read a table its permissions deny"


async def test_deleting_an_agent_never_drops_shared_data(world: World, via: str) -> None:
    """Deleting a workspace drops what its role owns (DROP OWNED). A co-owner that made itself the owner of
    the user's table, or an agent whose partitioned table was never handed to the owner role, must not take
    shared data with it when the workspace is deleted."""
    s, svc = f"_{via}", world.runtime.service
    key = f"e{s}"
    world.ws[key] = uid("atke")
    _, issued = svc.create_workspace_with_token(world.user, world.ws[key])
    world.tokens[key] = issued.secret
    svc.set_agent_permissions(world.ws[key], GlobalDbPermissions(can_drop_tables=True))
    keep = f"keep{s}"
    with psycopg.connect(global_uri(world.runtime, world.user), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {keep} (x text)")  # type: ignore[arg-type]
        conn.execute(f"INSERT INTO {keep} VALUES ('kept')")  # type: ignore[arg-type]
    async with world.agent(key, via) as e:
        assert await e.all(f"CREATE TABLE kt{s} (v text)", f"INSERT INTO kt{s} VALUES ('kept')"), e.errors
        for statement in (f"ALTER TABLE {keep} OWNER TO CURRENT_USER",
                          f"CREATE TABLE kp{s} (v text) PARTITION BY LIST (v)",
                          f"CREATE TABLE kp1{s} PARTITION OF kp{s} DEFAULT", f"INSERT INTO kp{s} VALUES ('kept')"):
            await e.run(statement)
    existed = relation_rows(world, f"kp{s}")
    svc.delete_workspace(world.ws[key])
    assert "kept" in relation_rows(world, keep), "deleting an agent dropped the user's table"
    assert "kept" in relation_rows(world, f"kt{s}"), "deleting an agent dropped the table it created"
    assert relation_rows(world, f"kp{s}") == existed, "deleting an agent dropped the partitioned table it created"


# -- 6. writes without write permission -----------------------------------------------------------------


async def test_no_writes_without_write_permission(world: World, via: str) -> None:
    """Agent w has can_write=false (it may still read and create): nothing it sends stores data."""
    n = names(via)
    payload = "pl" + uuid.uuid4().hex[:14]
    hexed = payload.encode().hex()
    async with world.agent("w", via) as w:
        assert await w.rows("SELECT count(*) FROM secret") == [[1]], w.errors  # reads keep working
        assert await w.run(f"CREATE TABLE {n['okt']}w (v text)"), w.errors  # so does creating (can_create)
        for statement in (f"SELECT lo_from_bytea(0, '\\x{hexed}'::bytea)",
                          f"SELECT lo_put(lo_create(0), 0, '\\x{hexed}'::bytea)",
                          "SELECT lo_create(0)",
                          f"WITH l AS (SELECT lo_from_bytea(0, '\\x{hexed}'::bytea) AS o) SELECT o FROM l",
                          f"INSERT INTO {n['okt']}w VALUES ('{payload}')",
                          f"CREATE TABLE {n['own']} (v text) PARTITION BY LIST (v)",
                          f"CREATE TABLE {n['own1']} PARTITION OF {n['own']} DEFAULT",
                          f"INSERT INTO {n['own']} VALUES ('{payload}')",
                          f"INSERT INTO {n['own1']} VALUES ('{payload}')"):
            await w.run(statement)
    with world.tenant_admin() as adm:
        objects = adm.execute("SELECT count(*) FROM pg_largeobject_metadata WHERE lomowner = %s::regrole",
                              (world.roles["w"],)).fetchone()
        stored = adm.execute("SELECT count(*) FROM pg_largeobject WHERE position(%s::bytea in data) > 0",
                             (payload.encode(),)).fetchone()
    assert objects == (0,) and stored == (0,), f"large objects written without write permission: {objects}"
    for table in (n["own"], n["own1"], f"{n['okt']}w"):
        rows = relation_rows(world, table)
        assert payload not in rows, f"{table} was written without write permission: {rows}"


async def test_every_relation_an_agent_creates_belongs_to_the_owner_role(world: World, via: str) -> None:
    """What an agent creates is the owner role's, so no agent owns (alters, triggers, grants, writes past its
    permissions) anything: also partitioned tables, their partitions, materialized views, sequences."""
    n = names(via)
    async with world.agent("b", via) as b:
        for statement in (f"CREATE TABLE {n['tas']}b (x int)", f"CREATE SEQUENCE {n['sq']}b",
                          f"CREATE VIEW {n['vw']}b AS SELECT 1 AS x"):
            assert await b.run(statement), b.errors  # creating keeps working
        for statement in (f"CREATE TABLE {n['pol']}b (id int, v text) PARTITION BY LIST (id)",
                          f"CREATE TABLE {n['pol1']}b PARTITION OF {n['pol']}b DEFAULT",
                          f"CREATE TABLE {n['tas']}b2 AS SELECT 1 AS x",
                          f"CREATE MATERIALIZED VIEW {n['mv']}b AS SELECT 1 AS x",
                          f"CREATE TABLE {n['tas']}b3 (LIKE {n['tas']}b INCLUDING ALL)",
                          f"CREATE TABLE {n['tas']}b4 () INHERITS ({n['tas']}b)",
                          f"SELECT 1 AS x INTO {n['tas']}b5"):
            await b.run(statement)  # each may be refused, but what exists must be the owner role's
    stray = not_owned_by_owner_role(world)
    assert not stray, f"relations an agent created are not the owner role's: {stray}"


async def test_agent_owned_tables_cannot_run_code_as_others(world: World, via: str, api_client: Any) -> None:
    """Agent a makes itself the owner of a table (a partitioned table is not adopted today), then attaches
    code to it (trigger, row-level security policy, default) and shares it: when agent b, who may read the
    secret, writes to or reads that table (or the user reads it), the code runs with their rights."""
    n, s = names(via), f"_{via}"
    channel_text = f"set_config('application_name', {TS_STAT}, false) IS NOT NULL"
    async with world.agent("a", via) as a:
        await a.run(f"CREATE TABLE {n['loot6']} (v text)")
        await a.run(f"""CREATE FUNCTION trg{s}() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  BEGIN INSERT INTO {n['loot6']} SELECT x FROM secret; EXCEPTION WHEN others THEN NULL; END;
  BEGIN NEW.v := (SELECT string_agg(x, ',') FROM secret); EXCEPTION WHEN others THEN NULL; END;
  RETURN NEW;
END $f$""")
        for statement in (f"CREATE TABLE {n['pol']} (id int, v text) PARTITION BY LIST (id)",
                          f"CREATE TABLE {n['pol1']} PARTITION OF {n['pol']} DEFAULT",
                          f"CREATE TRIGGER t BEFORE INSERT ON {n['pol']} FOR EACH ROW EXECUTE FUNCTION trg{s}()",
                          f"ALTER TABLE {n['pol']} ALTER COLUMN v SET DEFAULT {TS_REWRITE}",
                          f"ALTER TABLE {n['pol']} ENABLE ROW LEVEL SECURITY",
                          f"ALTER TABLE {n['pol']} FORCE ROW LEVEL SECURITY",
                          f"CREATE POLICY p ON {n['pol']} USING ({channel_text}) WITH CHECK ({channel_text})",
                          f"GRANT ALL ON {n['pol']} TO PUBLIC", f"GRANT ALL ON {n['pol1']} TO PUBLIC"):
            await a.run(statement)
    with watching(world.uri("a")) as watcher:
        async with world.agent("b", via) as b:
            await b.run(f"INSERT INTO {n['pol']} (id) VALUES (1)")
            await b.run(f"SELECT * FROM {n['pol']}")
            await b.run("SELECT pg_sleep(0.1)")
        user_reads(api_client, world, n["pol"])  # a policy also applies to the user's reader (not its owner)
    async with world.agent("a", via) as a:
        seen = [await a.text(f"SELECT * FROM {n['loot6']}"), await a.text(f"SELECT * FROM {n['pol']}")]
    seen += [*watcher.seen, relation_rows(world, n["loot6"]), relation_rows(world, n["pol"])]
    assert not world.leaked(*seen), f"agent a's code ran with agent b's rights: {world.leaked(*seen)}"


# -- SQL-running built-ins in defaults, checks, generated columns, views --------------------------------


async def test_sql_running_builtins_never_run_with_another_agents_rights(world: World, via: str) -> None:
    """Restricted agent a puts built-ins that run SQL text with the caller's rights where agent b (who may
    read the secret) evaluates them: column defaults, a CHECK, a generated column, views b reads."""
    n = names(via)
    query = "'select x, n from secret'"
    defaults = {
        n["d1"]: f"query_to_xml({query}, true, true, '')::text",
        n["d2"]: "table_to_xml('public.secret'::regclass, true, true, '')::text",
        n["d3"]: "schema_to_xml('public', true, true, '')::text",
        n["d4"]: "database_to_xml(true, true, '')::text",
        n["d5"]: f"query_to_xml_and_xmlschema({query}, true, true, '')::text",
        n["d6"]: TS_REWRITE,
    }
    async with world.agent("a", via) as a:
        for table, default in defaults.items():
            await a.run(f"CREATE TABLE {table} (id int, v text DEFAULT {default})")
        await a.run(f"CREATE TABLE {n['chk']} (id int CHECK (set_config('application_name', left({XML_TEXT}, 60), "
                    "false) IS NOT NULL))")
        await a.run(f"CREATE TABLE {n['chk2']} (id int CHECK (set_config('application_name', {TS_REWRITE}, false) "
                    "IS NOT NULL))")
        await a.run(f"CREATE VIEW {n['vtr']} AS SELECT set_config('application_name', {TS_REWRITE}, false) AS c, "
                    "pg_sleep(0.1)::text AS z")
        await a.run(f"CREATE TABLE {n['gen']} (id int, v text GENERATED ALWAYS AS "
                    f"(query_to_xml({query}, true, true, '')::text) STORED)")
        await a.run(f"CREATE VIEW {n['vqx']} AS SELECT set_config('application_name', left({XML_TEXT}, 60), false) "
                    "AS c, pg_sleep(0.1)::text AS z")
        await a.run(f"CREATE VIEW {n['vts']} AS SELECT set_config('application_name', {TS_STAT}, false) AS c, "
                    "pg_sleep(0.1)::text AS z")
        await a.run(f"CREATE VIEW {n['v3ok']}q AS SELECT query_to_xml('select 1 as one', true, true, '')::text AS c")
    with watching(world.uri("a")) as watcher:
        async with world.agent("b", via) as b:
            for table in [*defaults, n["chk"], n["chk2"], n["gen"]]:
                await b.run(f"INSERT INTO {table} (id) VALUES (1)")
            for view in (n["vqx"], n["vts"], n["vtr"]):
                await b.run(f"SELECT * FROM {view}")
            assert await b.rows("SELECT count(*) FROM secret") == [[1]], b.errors  # b's own reads still work
    seen = list(watcher.seen)
    async with world.agent("a", via) as a:
        for table in [*defaults, n["gen"]]:
            seen.append(await a.text(f"SELECT * FROM {table}"))
    seen += [relation_rows(world, t) for t in [*defaults, n["gen"]]]
    assert not world.leaked(*seen), f"built-ins ran a's SQL with b's rights: {world.leaked(*seen)}"


# -- 7. other tenants -----------------------------------------------------------------------------------

CATALOG_PROBES = (
    "SELECT datname FROM pg_database",
    "SELECT rolname, rolconfig FROM pg_roles",
    "SELECT usename FROM pg_user",
    "SELECT usename, datname, application_name, query FROM pg_stat_activity",
    "SELECT s::text FROM pg_stat_get_activity(NULL) s",
    "SELECT pg_stat_get_backend_dbid(b)::text, pg_stat_get_backend_userid(b)::regrole::text, "
    "pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() b",
    "SELECT datname, numbackends, xact_commit FROM pg_stat_database",
    "SELECT datname FROM pg_stat_database_conflicts",
    "SELECT setdatabase, setrole::regrole::text, setconfig FROM pg_db_role_setting",
    "SELECT roleid::regrole::text, member::regrole::text FROM pg_auth_members",
    "SELECT s::text FROM pg_shdescription s",
    "SELECT s::text FROM pg_stat_progress_vacuum s",
)


@pytest.mark.parametrize("database", ["global", "agent"])
async def test_other_tenants_are_invisible(world: World, via: str, database: str) -> None:
    """Agent c of another user is connected (to its global and its agent database, with an application
    name) and writes into its role's settings; agent b of the same user is in its agent database. Agent a,
    in either of its databases, sees none of their databases, roles, sessions, statistics or messages."""
    chan = "cm" + uuid.uuid4().hex[:12]
    with psycopg.connect(world.uri("c"), autocommit=True, application_name=chan) as c_global, \
            psycopg.connect(world.uri("c", "agent"), autocommit=True, application_name=chan) as c_agent, \
            psycopg.connect(world.uri("b", "agent"), autocommit=True, application_name=chan) as b_agent:
        for conn in (c_global, c_agent, b_agent):
            conn.execute("SELECT 1")
        for statement in (f"ALTER ROLE CURRENT_USER SET application_name = '{chan}'",
                          f"COMMENT ON ROLE \"{world.roles['c']}\" IS '{chan}'",
                          f"SELECT set_config('application_name', '{chan}', false)"):
            with suppress(psycopg.Error):
                c_global.execute(statement)  # type: ignore[arg-type]
        async with world.agent("a", via, database) as a:
            seen = [await a.text(probe) for probe in CATALOG_PROBES]
            seen += a.errors  # an error message may name what the query may not show
            # What the agent needs of the catalog keeps working.
            assert await a.rows("SELECT count(*) > 0 FROM pg_class WHERE relname = 'pg_class'") == [[True]]
            if database == "global":
                assert await a.rows("SELECT relname FROM pg_class WHERE relname = 'secret'") == [["secret"]]
            if a.session is not None:
                listed = await a.session.call_tool("list_tables", {"database": database})
                assert not listed.is_error
    with psycopg.connect(world.uri("c"), autocommit=True) as c, suppress(psycopg.Error):
        c.execute("ALTER ROLE CURRENT_USER RESET ALL")
    shown = sorted({name for name in world.forbidden | {chan} for text in seen if name in text})
    assert not shown, f"agent a sees other tenants: {shown} in {[t[:200] for t in seen if any(x in t for x in shown)]}"


@pytest.mark.parametrize("database", ["global", "agent"])
async def test_other_tenants_names_cannot_be_enumerated_by_oid(world: World, via: str, database: str) -> None:
    """Hiding pg_database/pg_roles is not enough: functions that turn an oid into a name (or an ACL, or an
    error message naming it) read the catalog without a privilege check; walking the oid range must not give
    other tenants' databases, their ACLs (who may connect) or role identities through them."""
    with psycopg.connect(world.runtime.admin_dsn, autocommit=True) as adm:
        top = adm.execute("SELECT greatest((SELECT max(oid::int8) FROM pg_roles), "
                          "(SELECT max(oid::int8) FROM pg_database)) + 100").fetchone()
        their_dbs = [r[0] for r in adm.execute("SELECT oid::int8 FROM pg_database WHERE datname = ANY(%s)",
                                               (sorted(world.forbidden),)).fetchall()]
        their_roles = [r[0] for r in adm.execute("SELECT oid::int8 FROM pg_roles WHERE rolname = ANY(%s)",
                                                 (sorted(world.forbidden),)).fetchall()]
    assert top is not None and their_dbs
    # The walk covers every oid from just below the other tenants' first object to past the newest one: what an
    # attacker walking the whole range would meet of them. (From 16384, a long test session makes it minutes.)
    bottom = max(16384, min(their_dbs + their_roles) - 1000)
    span = f"generate_series({bottom}, {int(top[0])}) o"
    # Deliberately left out (docs/security.md): a role's name from its oid (oid::regrole, pg_get_userbyid), which
    # pg_tables and psql need; the names are random and carry no activity or data.
    probes = [
        f"SELECT string_agg((pg_identify_object(1262, o, 0)).identity, ',') FROM {span}",
        f"SELECT string_agg((pg_identify_object(1260, o, 0)).identity, ',') FROM {span}",
        f"SELECT string_agg(pg_describe_object(1262, o, 0), ',') FROM {span}",
        f"SELECT string_agg((pg_identify_object_as_address(1262, o, 0)).object_names::text, ',') FROM {span}",
        f"SELECT string_agg(pg_get_acl(1262, o, 0)::text, ',') FROM {span}",
        *(f"SELECT pg_database_size({oid})" for oid in their_dbs),  # "permission denied for database <name>"
    ]
    async with world.agent("a", via, database) as a:
        seen = [await a.text(probe) for probe in probes]
        if database == "agent":  # where functions are allowed, every error message can be collected
            await a.run(f"""CREATE FUNCTION by_error() RETURNS text LANGUAGE plpgsql AS $f$
DECLARE acc text := ''; o int8;
BEGIN
  FOR o IN SELECT generate_series({bottom}, {int(top[0])}) LOOP
    BEGIN PERFORM pg_database_size(o::oid); EXCEPTION WHEN others THEN
      IF SQLERRM NOT LIKE '%does not exist%' THEN acc := acc || SQLERRM || ';'; END IF;
    END;
  END LOOP;
  RETURN acc;
END $f$""")
            seen.append(await a.text("SELECT by_error()"))
            await a.run("DROP FUNCTION IF EXISTS by_error()")
        seen += a.errors
    shown = sorted({name for name in world.forbidden for text in seen if name in text})
    assert not shown, f"other tenants' names by oid: {shown}"


# -- side channels between agents ------------------------------------------------------------------------


async def test_side_channels_between_agents_are_closed(world: World, via: str) -> None:
    """Agent b tries to pass a message to agent a outside the tables: application_name, advisory locks,
    pg_notify, a large object it shares. Agent a receives none of it. (A NOTIFY *statement* between two
    agents of one user, both on direct connections, is deliberately allowed: docs/mcp.md says why.)"""
    payload = "pl" + uuid.uuid4().hex[:14]
    number = random.randint(1_000_000_000, 1_800_000_000)
    channel = f"side_{via}"
    hexed = payload.encode().hex()
    with watching(world.uri("a"), [channel]) as watcher:
        async with world.agent("b", via) as b:
            for statement in (f"SELECT set_config('application_name', '{payload}', false), pg_sleep(0.1)",
                              f"SET application_name = '{payload}'",
                              f"SELECT pg_advisory_lock({number}), pg_sleep(0.1)",
                              f"SELECT pg_advisory_xact_lock({number}), pg_sleep(0.1)",
                              f"SELECT pg_notify('{channel}', '{payload}')"):
                await b.run(statement)
            lo = await b.rows(f"SELECT lo_from_bytea(0, '\\x{hexed}'::bytea)")
            if lo:
                await b.run(f"GRANT SELECT ON LARGE OBJECT {lo[0][0]} TO PUBLIC")
            with psycopg.connect(world.uri("b"), autocommit=True, application_name=payload) as b_conn:
                b_conn.execute("SELECT pg_sleep(0.1)")
    seen = list(watcher.seen)
    async with world.agent("a", via) as a:
        seen.append(await a.text("SELECT string_agg(encode(lo_get(oid), 'escape'), ',') FROM pg_largeobject_metadata"))
        assert await a.rows("SELECT 1") == [[1]]
    got = [t for t in seen if payload in t or str(number) in t]
    assert not got, f"agent b reached agent a outside the tables: {got[:5]}"
