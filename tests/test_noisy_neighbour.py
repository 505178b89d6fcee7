"""Issue 18, first part: one tenant cannot starve the others with zombie backends, temp files or serve's memory.

- A statement agentpg gave up on is really gone: cancelled, then its backend terminated (as agentpg's admin,
  by pid) after a short grace; its connection is never handed out again, and the pool serves the next call.
- Every tenant role carries ``temp_file_limit`` (a superuser-only setting the agent cannot raise, reset or
  override) and defaults for ``work_mem``/``maintenance_work_mem``; a spill past the limit is a clear tool error.
- serve reads a result only up to a bound: ``SELECT repeat('x', 2e8)`` answers "result too large" and serve's
  memory barely moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import psycopg
import pytest
from helpers import stubborn_function, workspace_global_uri
from mcp_support import Tenants, http_session, live_server, make_tenants, ok, refused, rss_kib, text, uid

from agentpg.access.pools import PoolLimits, TenantPools
from agentpg.access.query import QueryLimits, TenantQueries
from agentpg.access.results import StatementFailed
from agentpg.app.runtime import Runtime
from agentpg.providers.limits import TenantLimits
from agentpg.providers.local import LocalProvider
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio
Conn = psycopg.Connection[tuple[object, ...]]

#: A plpgsql loop that swallows every cancel: only termination ends it.
STUBBORN = stubborn_function("tag text")

TEMP_LIMIT_MB = 2


@contextlib.contextmanager
def roles_made_with(runtime: Runtime, limits: TenantLimits) -> Iterator[None]:
    """Tenant roles made inside the block get ``limits`` (as if the operator had configured them)."""
    provider = runtime.service.deps.provider
    assert isinstance(provider, LocalProvider)
    saved = provider.tenant_limits
    provider.tenant_limits = limits
    try:
        yield
    finally:
        provider.tenant_limits = saved


@pytest.fixture(scope="module")
def tenants(runtime: Runtime) -> Iterator[Tenants]:
    """Tenants whose roles were made with a small temp_file_limit (so a spill past it is quick)."""
    with roles_made_with(runtime, TenantLimits(temp_file_limit_mb=TEMP_LIMIT_MB, maintenance_work_mem_mb=32)):
        t = make_tenants(runtime)
    yield t
    runtime.service.delete_user(t.user1)
    runtime.service.delete_user(t.user2)


@pytest.fixture(scope="module")
def base_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    limited = settings.model_copy(update={"warm_pool_size": 0, "mcp_statement_timeout_s": 1.0,
                                          "tenant_temp_file_limit_mb": TEMP_LIMIT_MB, "tenant_work_mem_mb": 4,
                                          "tenant_maintenance_work_mem_mb": 32})
    with live_server(limited) as url:
        yield url


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def role_and_db(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return unquote(parts.username or ""), unquote(parts.path.lstrip("/"))


def backends(admin: Conn, uri: str, marker: str | None = None) -> list[tuple[object, ...]]:
    """The server processes of ``uri``'s role in its database (optionally only those running ``marker``)."""
    role, db = role_and_db(uri)
    sql = ("SELECT pid, state, query FROM pg_stat_activity WHERE usename = %s AND datname = %s "
           "AND pid <> pg_backend_pid()")
    args: list[object] = [role, db]
    if marker is not None:
        sql += " AND query LIKE %s"
        args.append(f"%{marker}%")
    return admin.execute(sql, args).fetchall()


async def test_a_statement_that_swallows_cancels_is_terminated(base_url: str, tenants: Tenants, runtime: Runtime,
                                                              admin: Conn) -> None:
    uri = runtime.service.uris.agent(tenants.ws_a, "agent")
    async with http_session(base_url, tenants.token_a) as s:
        await ok(s, "execute", database="agent", sql=STUBBORN)
        for tool in ("query", "execute"):
            marker = f"zombie_{tool}"
            started = time.monotonic()
            message = await refused(s, tool, database="agent", sql=f"SELECT stubborn('{marker}')")
            answered = time.monotonic() - started
            assert "cancelled" in message and "time limit" in message, message
            # Given up on, and gone: no backend of this agent still runs it, right when the answer came.
            assert backends(admin, uri, marker) == [], backends(admin, uri, marker)
            print(f"\n{tool}: statement timeout 1 s, outside cancel at 3 s, answered (backend gone) after "
                  f"{answered:.2f} s")
            # The pool serves the next call, on a live connection.
            assert (await ok(s, "query", database="agent", sql="SELECT 1"))["rows"] == [[1]]
    # No backend of this agent is left running anything (the pool's idle connections may remain).
    assert [b for b in backends(admin, uri) if b[1] != "idle"] == []
    # The operator sees the terminations in /metrics.
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"{base_url}/metrics")).text
    counter = 'agentpg_backends_terminated_total{outcome="gone"}'
    gone = next(line for line in metrics.splitlines() if line.startswith(counter))
    assert float(gone.split()[-1]) >= 2, gone


async def test_a_cancelled_call_leaves_no_backend(runtime: Runtime, tenants: Tenants, admin: Conn) -> None:
    """The caller goes away (an MCP cancel, a dropped client): the task is cancelled, the backend terminated."""
    uri = runtime.service.uris.agent(tenants.ws_a, "agent")
    queries = TenantQueries(TenantPools(PoolLimits(max_size=1)), QueryLimits(statement_timeout_s=60))
    try:
        await queries.run(uri, "SELECT 1", read_only=True)  # the function exists (made by the test above)
        for read_only in (True, False):
            marker = f"cancelled_{read_only}"
            task = asyncio.create_task(queries.run(uri, f"SELECT stubborn('{marker}')", read_only=read_only))
            await asyncio.sleep(0.5)
            if task.done():
                task.result()
            assert len(backends(admin, uri, marker)) == 1
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            print(f"\ncancelled call (read_only={read_only}): backend gone {time.monotonic() - started:.2f} s "
                  "after the cancel")
            assert backends(admin, uri, marker) == []
            # The pool (one connection at most) serves the next call.
            assert (await queries.run(uri, "SELECT 2", read_only=True)).rows == [[2]]
    finally:
        await queries.close()


def test_every_tenant_role_has_a_temp_file_limit_it_cannot_raise(runtime: Runtime, tenants: Tenants) -> None:
    for uri in (workspace_global_uri(runtime, tenants.ws_a), runtime.service.uris.agent(tenants.ws_b, "agent")):
        with psycopg.connect(uri, autocommit=True) as conn:
            assert conn.execute("SHOW temp_file_limit").fetchone() == (f"{TEMP_LIMIT_MB}MB",)
            assert conn.execute("SHOW work_mem").fetchone() == ("4MB",)
            assert conn.execute("SHOW maintenance_work_mem").fetchone() == ("32MB",)
            assert conn.execute("SHOW client_connection_check_interval").fetchone() != ("0",)
            for attempt in ("SET temp_file_limit = -1", "SET temp_file_limit = '100GB'",
                            "SELECT set_config('temp_file_limit', '-1', false)",
                            "ALTER ROLE CURRENT_USER SET temp_file_limit = -1",
                            "ALTER ROLE CURRENT_USER RESET temp_file_limit",
                            "CREATE FUNCTION lift() RETURNS int LANGUAGE sql SET temp_file_limit = -1 AS 'SELECT 1'"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(attempt)
            conn.execute("ALTER ROLE CURRENT_USER RESET ALL")  # allowed, but leaves superuser-only settings alone
            conn.execute("RESET ALL")
            assert conn.execute("SHOW temp_file_limit").fetchone() == (f"{TEMP_LIMIT_MB}MB",)
        with psycopg.connect(uri, autocommit=True) as conn:  # a fresh session still has it
            assert conn.execute("SHOW temp_file_limit").fetchone() == (f"{TEMP_LIMIT_MB}MB",)
            # Honest: work_mem is user-settable in Postgres. A direct connection may raise it; only agentpg's own
            # connections start with it (and MCP refuses SET / set_config). docs/limits.md says so.
            conn.execute("SET work_mem = '64MB'")
            assert conn.execute("SHOW work_mem").fetchone() == ("64MB",)


async def test_a_spill_past_the_temp_file_limit_is_a_clear_tool_error(base_url: str, tenants: Tenants) -> None:
    spill = "SELECT count(*) FROM (SELECT g FROM generate_series(1, 1000000) g ORDER BY g DESC) s"
    async with http_session(base_url, tenants.token_b) as s:
        settings = await ok(s, "query", database="agent", sql="SELECT current_setting('temp_file_limit'), "
                            "current_setting('work_mem'), current_setting('maintenance_work_mem')")
        assert settings["rows"] == [[f"{TEMP_LIMIT_MB}MB", "4MB", "32MB"]]
        for tool in ("query", "execute"):
            message = await refused(s, tool, database="agent", sql=spill)
            assert "temp_file_limit" in message and "53400" in message, message
            assert f"{TEMP_LIMIT_MB} MB" in message and "temporary" in message, message
        # Small enough to stay in memory: fine.
        assert (await ok(s, "query", database="agent", sql="SELECT count(*) FROM (SELECT g FROM "
                         "generate_series(1, 1000) g ORDER BY g DESC) s"))["rows"] == [[1000]]


@pytest.fixture(scope="module")
def roomy_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    """A server with the default statement timeout (building a 200 MB value takes the server about a second)."""
    with live_server(settings.model_copy(update={"warm_pool_size": 0})) as url:
        yield url


async def test_a_huge_value_is_result_too_large_and_serve_memory_stays_bounded(
        roomy_url: str, tenants: Tenants, runtime: Runtime, admin: Conn) -> None:
    uri = runtime.service.uris.agent(tenants.ws_c, "agent")
    async with http_session(roomy_url, tenants.token_c) as s:
        await ok(s, "query", database="agent", sql="SELECT repeat('x', 900000)")  # warm-up: a row near the cap
        await ok(s, "query", database="agent", sql="SELECT repeat('x', 500) FROM generate_series(1, 5000)")
        before = rss_kib()
        reset_peak_rss()
        for tool in ("query", "execute"):
            started = time.monotonic()
            message = await refused(s, tool, database="agent", sql="SELECT repeat('x', 200000000) AS huge")
            assert "too large" in message and "-byte limit" in message, message
            print(f"\n{tool} SELECT repeat('x', 2e8): answered in {time.monotonic() - started:.2f} s, peak RSS "
                  f"+{peak_rss_kib() - before} KiB, RSS after +{rss_kib() - before} KiB")
        one_peak = peak_rss_kib() - before
        three = await asyncio.gather(*(s.call_tool("query", {"database": "agent",
                                                             "sql": f"SELECT repeat('y', 200000000 + {i})"})
                                       for i in range(3)))
        assert all(r.is_error and "too large" in text(r) for r in three)
        peak, grown = peak_rss_kib() - before, rss_kib() - before
        print(f"3 concurrent SELECT repeat('x', 2e8): peak RSS +{peak} KiB, RSS after +{grown} KiB")
        # The bound: per call, about 2 x the read bound (4 MiB by default: libpq's buffer, then its result)
        # plus the kept rows; measured ~10 MiB for one call, ~32 MiB for three at once (today's code: 1 GB).
        assert one_peak < 24 * 1024, f"peak RSS grew by {one_peak} KiB for one call"
        assert peak < 64 * 1024, f"peak RSS grew by {peak} KiB for three calls at once"
        assert grown < 16 * 1024, f"RSS stayed {grown} KiB higher"
        # Nothing left running on the server, and the next calls are fine.
        assert [b for b in backends(admin, uri) if b[1] != "idle"] == []
        fits = await ok(s, "query", database="agent", sql="SELECT repeat('z', 1000) FROM generate_series(1, 2000)")
        assert fits["truncated"] is True and 0 < fits["row_count"] < 1000
        big_but_fine = await ok(s, "query", database="agent", sql="SELECT length(repeat('x', 200000000))")
        assert big_but_fine["rows"] == [[200000000]]


async def test_a_statement_past_the_memory_bound_fails_alone(roomy_url: str, tenants: Tenants, runtime: Runtime,
                                                           admin: Conn) -> None:
    """A row of three 500 MB values (1.5 GB in one backend, whatever ``work_mem`` says) is refused with "out of
    memory" by the bound on every server process (AGENTPG_EMBEDDED_BACKEND_MEMORY_MB, 1.5 GB by default),
    instead of growing until the kernel kills a backend, which would restart every session of the server."""
    backend = admin.execute("SELECT pg_backend_pid()").fetchone()
    huge_row = ("SELECT length(a) + length(b) + length(c) FROM (SELECT repeat('a', 500000000) AS a, "
                "repeat('b', 500000000) AS b, repeat('c', 500000000) AS c) AS s")
    async with http_session(roomy_url, tenants.token_c) as s:
        message = await refused(s, "query", database="agent", sql=huge_row)
        assert "out of memory" in message and "53200" in message, message
        assert "more memory than the server gives one session" in message, message
        assert (await ok(s, "query", database="agent", sql="SELECT 1 AS one"))["rows"] == [[1]]
    # No crash restart: another session opened before it is still the same backend.
    assert admin.execute("SELECT pg_backend_pid()").fetchone() == backend


@pytest.fixture(scope="module")
def roomy_agent_uri(runtime: Runtime, tenants: Tenants) -> str:
    """The agent database of a workspace (of user 2) made with the default role limits (1 GB of temp files)."""
    workspace = uid("wr")
    with roles_made_with(runtime, TenantLimits()):
        runtime.service.create_workspace_with_token(tenants.user2, workspace)
    return runtime.service.uris.agent(workspace, "agent")


async def test_wide_rows_are_truncated_not_refused(roomy_agent_uri: str) -> None:
    """Rows each within the cap but a whole network chunk of them over the read bound: the read is done again
    a row at a time and returns the rows that fit (truncated), as before. A write streams small chunks."""
    limits = QueryLimits(max_result_bytes=100_000)
    queries = TenantQueries(TenantPools(), limits)
    try:
        uri = roomy_agent_uri
        assert 100 * 60_000 > limits.read_bound_bytes > 60_000
        wide = await queries.run(uri, "SELECT repeat('w', 60000) FROM generate_series(1, 300)", read_only=True)
        assert wide.truncated and wide.truncated_by == "max_result_bytes" and wide.row_count == 1
        narrower = await queries.run(uri, "SELECT repeat('w', 20000) FROM generate_series(1, 300)", read_only=True)
        assert narrower.truncated and narrower.row_count == 4
        await queries.run(uri, "CREATE TABLE IF NOT EXISTS wide (id int, body text)", read_only=False)
        written = await queries.run(uri, "INSERT INTO wide SELECT g, repeat('w', 60000) FROM generate_series(1, 300) g "
                                    "RETURNING *", read_only=False)
        assert written.rows_affected == 300 and written.row_count == 1 and written.truncated
        assert (await queries.run(uri, "SELECT count(*) FROM wide", read_only=True)).rows == [[300]]
        for read_only in (True, False):  # one row over the row bound: the server refuses to send it
            with pytest.raises(StatementFailed, match="too large"):
                await queries.run(uri, "SELECT repeat('w', 5000000)", read_only=read_only)
        with pytest.raises(StatementFailed, match=r"too large.*nothing was written"):
            await queries.run(uri, "UPDATE wide SET body = repeat(body, 100) WHERE id = 1 RETURNING body",
                              read_only=False)
        assert (await queries.run(uri, "SELECT length(body) FROM wide WHERE id = 1", read_only=True)).rows == [
            [60000]]
        # Errors point into the agent's statement, not into agentpg's wrapping of it.
        with pytest.raises(StatementFailed, match=r"column \"nope\" does not exist \(at character 8\)"):
            await queries.run(uri, "SELECT nope FROM wide", read_only=True)
        assert (await queries.run(uri, "SELECT 3", read_only=True)).rows == [[3]]
    finally:
        await queries.close()


async def test_statements_the_server_cannot_bound_are_cut_off_by_serve(roomy_agent_uri: str, admin: Conn) -> None:
    """CALL (also SHOW, EXPLAIN) cannot be wrapped in a row-size check: serve reads the headers of the waiting
    messages before libpq takes them, and a row announcing more than the read bound ends the read before any of
    it is read; the backend is terminated. (Not by construction: a header that arrives while libpq reads is
    missed, and then only the read bound applies; docs/limits.md.)"""
    queries = TenantQueries(TenantPools(), QueryLimits())
    uri = roomy_agent_uri
    try:
        await queries.run(uri, "CREATE OR REPLACE PROCEDURE huge(INOUT v text) LANGUAGE plpgsql AS "
                          "$$ BEGIN v := repeat('x', 200000000); END $$", read_only=False)
        await queries.run(uri, "CREATE OR REPLACE PROCEDURE huge_ok(INOUT v text) LANGUAGE plpgsql AS "
                          "$$ BEGIN v := 'done'; END $$", read_only=False)
        before = rss_kib()
        reset_peak_rss()
        for read_only in (True, False):
            with pytest.raises(StatementFailed, match="too large"):
                await queries.run(uri, "CALL huge(NULL)", read_only=read_only)
        peak = peak_rss_kib() - before
        print(f"\nCALL returning a 200 MB value (read and write): peak RSS +{peak} KiB")
        assert peak < 64 * 1024, peak  # today's code: about 1 GB
        assert [b for b in backends(admin, uri) if b[1] != "idle"] == []
        assert (await queries.run(uri, "SELECT 4", read_only=True)).rows == [[4]]
        # Those statements still answer as before.
        assert (await queries.run(uri, "SHOW work_mem", read_only=True)).rows == [["4MB"]]
        explained = await queries.run(uri, "EXPLAIN SELECT * FROM generate_series(1, 10)", read_only=True)
        assert explained.rows and "Function Scan" in str(explained.rows[0][0])
        assert (await queries.run(uri, "CALL huge_ok(NULL)", read_only=False)).rows == [["done"]]
    finally:
        await queries.close()
