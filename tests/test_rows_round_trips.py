"""The REST rows page's round trips to the tenant server (issue 22 item 2), counted on the wire.

libpq's protocol trace (``PQtrace``) of the reader's pooled connection: a *round trip* is one run of messages
the client sends before it reads the server's answers. With the table's description cached, a page (100
rows, with its count) is ONE round trip: ``BEGIN``, the pinned settings, the page, the description and
count, ``COMMIT`` and the session's ``DISCARD ALL``, in one pipeline; the pool then skips its own reset.

And the cache never makes an answer wrong: a table an agent altered, dropped or re-created since it was
described is read right (at worst one more round trip), and unknown names get the usual errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from helpers import workspace_global_uri
from mcp_support import uid
from wire_trace import WireLog

from agentpg.access.browse import UnreadableTable, read_rows
from agentpg.access.permissions import GlobalDbPermissions
from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import TenantQueries
from agentpg.app.runtime import Runtime
from agentpg.errors import InvalidInput, NotFound
from agentpg.mcp.server import limits_from
from agentpg.service import DatabaseRef, TenantAccess
from agentpg.service.tenant import NotStarted

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def agent_table(runtime: Runtime) -> Iterator[tuple[str, str]]:
    """(user, workspace): an agent of the workspace (allowed to drop tables) created ``items`` (300 rows) in
    the user's global database: the platform reads it with another role than the agent's."""
    svc = runtime.service
    user, ws = uid("rtu"), uid("rtw")
    svc.register_user(user)
    svc.create_workspace_with_token(user, ws)
    svc.set_agent_permissions(ws, GlobalDbPermissions(can_drop_tables=True))  # it may alter and drop, too
    with psycopg.connect(workspace_global_uri(runtime, ws), autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 300) g")
    yield user, ws
    svc.delete_user(user)


@pytest.fixture()
async def traced(runtime: Runtime, agent_table: tuple[str, str]) -> AsyncIterator[tuple[Any, WireLog]]:
    """The service's reader over a one-connection pool whose connection is traced; the service's own
    tenant access (if an app attached one) is put back afterwards."""
    svc = runtime.service
    try:
        previous: TenantAccess | None = svc.tenant()
    except NotStarted:
        previous = None
    pools = TenantPools(PoolLimits(max_size=1))
    queries = TenantQueries(pools, limits_from(runtime.settings))
    svc.attach_tenant(TenantAccess.of(queries))
    wire = WireLog()
    try:
        async with pools.connection(svc.uris.browse(None, agent_table[0], None)) as conn:
            wire.attach(conn.pgconn)
            pools.mark_reset(conn)
        yield pools, wire
    finally:
        svc.attach_tenant(previous)
        await queries.close()
        wire.close()


async def _settled(pools: TenantPools, runtime: Runtime, user: str) -> None:
    """Wait until the pool has the connection back (and any reset the pool itself runs is done). This probe
    changes nothing in the session, so it hands the connection back without a reset of its own."""
    async with pools.connection(runtime.service.uris.browse(None, user, None)) as conn:
        pools.mark_reset(conn)


async def test_a_cached_page_is_one_round_trip(runtime: Runtime, agent_table: tuple[str, str],
                                               traced: tuple[TenantPools, WireLog]) -> None:
    pools, wire = traced
    user = agent_table[0]
    reader, ref = runtime.service.reader, DatabaseRef.global_db(user)
    await _settled(pools, runtime, user)

    mark = wire.mark()
    page = await reader.rows(ref, "items", limit=100, offset=0)
    await _settled(pools, runtime, user)
    first = wire.trips_text(mark)
    assert [r["id"] for r in page.rows] == list(range(1, 101)) and page.total == 300 and not page.truncated
    assert len(first) <= 2, "\n---\n".join(first)  # at most: the description, then the page

    for offset in (100, 250):
        mark = wire.mark()
        page = await reader.rows(ref, "items", limit=100, offset=offset)
        await _settled(pools, runtime, user)
        trips = wire.trips_text(mark)
        assert len(trips) == 1, "\n---\n".join(trips)
        sent = trips[0]
        assert '"BEGIN READ ONLY"' in sent and "statement_timeout" in sent
        assert '"public"."items"' in sent and '"COMMIT"' in sent and '"DISCARD ALL"' in sent
        assert page.rows[0] == {"id": offset + 1, "name": f"item {offset + 1}"}
    assert len(page.rows) == 50 and page.total == 300  # the last page: its total needs no count
    assert [c.model_dump() for c in page.columns] == [{"name": "id", "type": "integer"},
                                                      {"name": "name", "type": "text"}]


async def test_a_page_without_count_leaves_the_total_to_the_last_page(
        runtime: Runtime, agent_table: tuple[str, str], traced: tuple[TenantPools, WireLog]) -> None:
    """``count=False`` skips the table's count on both paths (the one-trip page and the slow one); the last
    page still knows its total, and counting stays the default."""
    pools, _ = traced
    user = agent_table[0]
    reader, ref = runtime.service.reader, DatabaseRef.global_db(user)
    middle = await reader.rows(ref, "items", limit=100, offset=100, count=False)
    assert [r["id"] for r in middle.rows] == list(range(101, 201)) and middle.total is None
    last = await reader.rows(ref, "items", limit=100, offset=250, count=False)
    assert len(last.rows) == 50 and last.total == 300
    assert (await reader.rows(ref, "items", limit=100, offset=100)).total == 300
    async with pools.connection(runtime.service.uris.browse(None, user, None)) as conn:
        slow = await read_rows(conn, "items", limits=reader.limits, limit=10, offset=0, count=False)
        counted = await read_rows(conn, "items", limits=reader.limits, limit=10, offset=0)
    assert [r["id"] for r in slow.rows] == list(range(1, 11)) and slow.total is None and counted.total == 300


async def test_what_agents_change_is_read_right(runtime: Runtime, agent_table: tuple[str, str],
                                                traced: tuple[TenantPools, WireLog]) -> None:
    pools, wire = traced
    user, ws = agent_table
    reader, ref = runtime.service.reader, DatabaseRef.global_db(user)
    await reader.rows(ref, "items", limit=5, offset=0)  # described and cached
    agent = psycopg.connect(workspace_global_uri(runtime, ws), autocommit=True)
    try:
        agent.execute("ALTER TABLE items ADD COLUMN extra text DEFAULT 'e'")
        mark = wire.mark()
        page = await reader.rows(ref, "items", limit=2, offset=0)
        await _settled(pools, runtime, user)
        assert page.rows == [{"id": 1, "name": "item 1", "extra": "e"}, {"id": 2, "name": "item 2", "extra": "e"}]
        assert len(wire.trips_text(mark)) == 2  # the stale description cost one more round trip, nothing else

        agent.execute("ALTER TABLE items DROP COLUMN name")
        assert (await reader.rows(ref, "items", limit=1, offset=0)).rows == [{"id": 1, "extra": "e"}]
        with pytest.raises(InvalidInput, match="has no column 'name'"):
            await reader.rows(ref, "items", limit=1, offset=0, columns=["id", "name"])

        agent.execute("ALTER TABLE items DROP CONSTRAINT items_pkey, ADD PRIMARY KEY (extra, id)")
        agent.execute("UPDATE items SET extra = 'z' WHERE id = 1")
        page = await reader.rows(ref, "items", limit=2, offset=0)  # the default order is the new key's
        assert [r["id"] for r in page.rows] == [2, 3] and page.total == 300

        agent.execute("DROP TABLE items")
        with pytest.raises(NotFound, match="does not exist"):
            await reader.rows(ref, "items", limit=1, offset=0)
        agent.execute("CREATE TABLE items (code text PRIMARY KEY, qty int)")
        agent.execute("INSERT INTO items VALUES ('b', 2), ('a', 1)")
        page = await reader.rows(ref, "items", limit=10, offset=0)
        assert page.rows == [{"code": "a", "qty": 1}, {"code": "b", "qty": 2}] and page.total == 2
    finally:
        agent.execute("DROP TABLE IF EXISTS items")
        agent.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)")
        agent.execute("INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 300) g")
        agent.close()


async def test_names_outside_the_table_are_refused_as_before(runtime: Runtime, agent_table: tuple[str, str],
                                                             traced: tuple[TenantPools, WireLog]) -> None:
    user, ws = agent_table
    reader, ref = runtime.service.reader, DatabaseRef.global_db(user)
    await reader.rows(ref, "items", limit=1, offset=0)
    # A whole-row reference (the table's own name), a system column, an unknown one: none is a column here.
    for wanted in (["items"], ["ctid"], ["nope"]):
        with pytest.raises(InvalidInput, match=f"columns: table 'items' has no column '{wanted[0]}'"):
            await reader.rows(ref, "items", limit=1, offset=0, columns=wanted)
    with pytest.raises(InvalidInput, match="order_by: table 'items' has no column 'xmin'"):
        await reader.rows(ref, "items", limit=1, offset=0, order_by=[("xmin", False)])
    with pytest.raises(NotFound, match="did you mean 'items'"):
        await reader.rows(ref, "itemz", limit=1, offset=0)
    with psycopg.connect(workspace_global_uri(runtime, ws), autocommit=True) as agent:
        agent.execute("CREATE SEQUENCE counter")
        agent.execute("CREATE VIEW broken AS SELECT 1 / (id - id) AS x FROM items")
    try:
        with pytest.raises(NotFound, match="does not exist"):  # a sequence is not a table
            await reader.rows(ref, "counter", limit=1, offset=0)
        with pytest.raises(UnreadableTable, match="22012"):
            await reader.rows(ref, "broken", limit=1, offset=0)
        page = await reader.rows(ref, "items", limit=3, offset=0, order_by=[("name", True)])
        assert [r["name"] for r in page.rows] == ["item 99", "item 98", "item 97"]  # the connection is fine
    finally:
        with psycopg.connect(workspace_global_uri(runtime, ws), autocommit=True) as agent:
            agent.execute("DROP VIEW broken")
            agent.execute("DROP SEQUENCE counter")
