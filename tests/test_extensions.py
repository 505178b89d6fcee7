"""Extensions agents expect (pgvector, pg_trgm, …): ready in both databases, installed by agentpg's admin;
the rest refused with a message that names the operator's allow-list."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from helpers import agent_db_uri, workspace_global_uri
from mcp_support import Tenants, http_session, live_server, make_tenants, ok, refused

from agentpg.access.permissions import GlobalDbPermissions
from agentpg.app.runtime import Runtime
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tenants(runtime: Runtime) -> Iterator[Tenants]:
    t = make_tenants(runtime)
    # Agent a may build indexes in the global database (an owner's right there); b keeps the defaults.
    runtime.service.set_agent_permissions(t.ws_a, GlobalDbPermissions(can_drop_tables=True))
    yield t
    runtime.service.delete_user(t.user1)
    runtime.service.delete_user(t.user2)


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    with live_server(settings) as url:
        yield url


def vec(values: list[float]) -> str:
    return json.dumps(values)


@pytest.mark.parametrize("database", ["global", "agent"])
async def test_agent_memory_with_pgvector_and_trigrams(base_url: str, tenants: Tenants, database: str) -> None:
    """The memory an agent keeps: embeddings with an HNSW index, a KNN query with a bound vector, and trigram
    similarity on text: through the real MCP client, in both databases, nothing to install first."""
    async with http_session(base_url, tenants.token_a) as s:
        # Already there; asking again is fine (idempotent, done by agentpg).
        created = await ok(s, "execute", database=database, sql="CREATE EXTENSION IF NOT EXISTS vector")
        assert created["command"] == "CREATE EXTENSION"
        await ok(s, "execute", database=database,
                 sql="CREATE TABLE memories (id int PRIMARY KEY, note text, emb vector(3))")
        await ok(s, "execute", database=database,
                 sql="CREATE INDEX memories_emb ON memories USING hnsw (emb vector_l2_ops)")
        points = {1: [1, 0, 0], 2: [0, 1, 0], 3: [0.9, 0.1, 0], 4: [0, 0, 2]}
        notes = {1: "the user likes espresso", 2: "meeting moved to Tuesday", 3: "espresso machine broke",
                 4: "buy oat milk"}
        for key, point in points.items():
            await ok(s, "execute", database=database,
                     sql="INSERT INTO memories VALUES ($1, $2, $3::vector)", params=[key, notes[key], vec(point)])
        nearest = await ok(s, "query", database=database,
                           sql="SELECT id FROM memories ORDER BY emb <-> $1::vector LIMIT 3", params=[vec([1, 0, 0])])
        assert [row[0] for row in nearest["rows"]] == [1, 3, 2]
        similar = await ok(s, "query", database=database,
                           sql="SELECT id FROM memories WHERE note % $1 ORDER BY similarity(note, $1) DESC",
                           params=["espresso"])
        assert {row[0] for row in similar["rows"]} == {1, 3}
        described = await ok(s, "describe_table", database=database, table="memories")
        assert "vector(3)" in json.dumps(described)
        await ok(s, "execute", database=database, sql="DROP TABLE memories")


async def test_extensions_belong_to_agentpg_not_to_an_agent(runtime: Runtime, admin: psycopg.Connection,
                                                           tenants: Tenants) -> None:
    """Trusted code stays trusted: the extension and its functions are owned by the admin (a superuser),
    so neither the owner role nor an agent allowed to drop tables can replace or alter them."""
    global_db = psycopg.conninfo.conninfo_to_dict(workspace_global_uri(runtime, tenants.ws_a))["dbname"]
    with psycopg.connect(psycopg.conninfo.make_conninfo(runtime.admin_dsn, dbname=str(global_db)),
                         autocommit=True) as conn:
        rows = conn.execute("SELECT e.extname, r.rolsuper FROM pg_extension e JOIN pg_roles r ON r.oid = e.extowner "
                            "WHERE e.extname IN ('vector', 'pg_trgm')").fetchall()
        assert sorted(rows) == [("pg_trgm", True), ("vector", True)]
        owners = conn.execute("SELECT DISTINCT r.rolsuper FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid "
                              "JOIN pg_roles r ON r.oid = p.proowner WHERE d.classid = 'pg_proc'::regclass "
                              "AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'vector') "
                              "AND d.deptype = 'e'").fetchall()
        assert owners == [(True,)]
    # An agent allowed to drop tables (a member of the owner role) still cannot touch them.
    with psycopg.connect(workspace_global_uri(runtime, tenants.ws_a), autocommit=True) as agent:
        for statement in ("DROP EXTENSION vector", "ALTER FUNCTION l2_distance(vector, vector) OWNER TO CURRENT_USER",
                          "CREATE OR REPLACE FUNCTION similarity(text, text) RETURNS real LANGUAGE sql AS "
                          "'SELECT 1::real'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                agent.execute(statement)
    with psycopg.connect(agent_db_uri(runtime, tenants.ws_a), autocommit=True) as agent, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        agent.execute("DROP EXTENSION vector")


async def test_refused_extensions_name_the_allow_list(base_url: str, tenants: Tenants) -> None:
    async with http_session(base_url, tenants.token_a) as s:
        for database in ("global", "agent"):
            for sql in ("CREATE EXTENSION dblink", "CREATE EXTENSION postgres_fdw", "CREATE LANGUAGE plperlu"):
                message = await refused(s, "execute", database=database, sql=sql)
                assert "never installs it" in message and "vector, pg_trgm" in message, message
            message = await refused(s, "execute", database=database, sql="CREATE EXTENSION earthdistance")
            assert "AGENTPG_TENANT_EXTENSIONS" in message and "never" not in message, message
            message = await refused(s, "execute", database=database,
                                    sql="CREATE EXTENSION vector SCHEMA agentpg_internal")
            assert "schema public" in message, message


def test_status_says_what_tenants_get(runtime: Runtime) -> None:
    status = runtime.service.status()
    assert "vector" in status.extensions and "pg_trgm" in status.extensions
    assert status.extensions_missing == ["pgcrypto"]  # the embedded wheel does not ship it


def test_an_operator_cannot_allow_a_dangerous_extension(settings: Settings) -> None:
    from agentpg.app.runtime import StartupError, make_provider

    with pytest.raises(StartupError, match=r"dblink.*never"):
        make_provider(settings.model_copy(update={"tenant_extensions": ["vector", "dblink"]}), "postgresql://x")


def test_the_explorer_shortens_a_vector_and_says_its_dimension() -> None:
    from agentpg.web.render import PREVIEW_CHARS, cell

    value = "[" + ",".join(["0.123456"] * 384) + "]"
    shown = cell(value, "vector(384)")
    assert len(shown.text) == PREVIEW_CHARS + 1 and shown.full == value and shown.note == "vector, 384 dimensions"
