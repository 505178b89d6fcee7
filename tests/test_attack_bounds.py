"""What one tenant can start outside agentpg's own calls, on a direct connection as its own role (what a
gateway child gets as ``${GLOBAL_DB_URL}``/``${AGENT_DB_URL}``) or through a gateway child, and the bound
agentpg keeps on it anyway (lifecycle/session_bounds.py, the storage check, the sandbox).

Each test plays the attack and asserts the outcome (the sessions are gone, the write was ended, the other user
was served), never an error string. The waits are short settings copies (a 1 s statement timeout, a 2 s
session bound, a storage check every 0.5 s), never the defaults.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from helpers import agent_db_uri, global_uri, workspace_global_uri
from mcp_support import Tenants, http_session, live_server, text, uid
from psycopg import sql
from psycopg.conninfo import make_conninfo

from agentpg.app.runtime import Runtime
from agentpg.settings import Settings
from agentpg.usage.storage import check_storage

pytestmark = pytest.mark.anyio
Conn = psycopg.Connection[tuple[Any, ...]]

#: agentpg's own end of an MCP statement with a 1 s timeout: the timeout, the cancel 2 s later, the
#: termination 2 s after that (docs/limits.md). Anything a tenant starts should be gone by then.
STATEMENT_TIMEOUT_S = 1.0
AGENTPG_END_S = STATEMENT_TIMEOUT_S + 2 + 2


def db_of(uri: str) -> str:
    return urlsplit(uri).path.lstrip("/")


def alive(admin: Conn, pids: list[int]) -> list[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall()
    return [int(r[0]) for r in rows]


def terminate(admin: Conn, pids: list[int]) -> None:
    admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))


@pytest.fixture(scope="module")
def serve_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    """A running ``serve`` (its periodic jobs, its reaper) with a 1 s statement timeout and 2 s session bounds
    for tenants' own connections, checked every 0.5 s."""
    with live_server(settings.model_copy(update={"warm_pool_size": 0,
                                                 "mcp_statement_timeout_s": STATEMENT_TIMEOUT_S,
                                                 "session_max_statement_s": 2.0, "session_max_transaction_s": 2.0,
                                                 "session_check_interval_s": 0.5})) as url:
        yield url


def vacuum_dead_not_removable(dsn: str, table: str) -> int:
    """VACUUM ``table`` as the superuser (what autovacuum does); the dead rows it could not remove."""
    notices: list[str] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute(f"VACUUM (VERBOSE) {table}")
    for notice in notices:
        match = re.search(r"(\d+) are dead but not yet removable", notice)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no tuple counts in VACUUM VERBOSE: {notices}")


# -- time: a direct session's statement and transaction ---------------------------------------------------


async def test_a_direct_session_cannot_hold_a_transaction_or_statement_past_agentpgs_end(
        runtime: Runtime, tenants: Tenants, serve_url: str, admin: Conn) -> None:
    """The attacker (user1's agent a, directly as its role) sets its session timeouts to 0, then (1) leaves
    a transaction with an xid open, idle, and (2) runs a statement without end. Meanwhile agentpg changes
    another user's role (what every workspace and permission change does to the shared catalogs). Safe:
    agentpg ends both sessions (its session bounds: 2 s here, 15 min by default) and VACUUM of the shared
    catalog can remove the dead rows again. (A data table of another database is NOT held back:
    PostgreSQL 14+ counts other databases' xids for shared catalogs only; measured: 0 of 2,000 kept.)"""
    victim_dsn = make_conninfo(runtime.admin_dsn, dbname=db_of(global_uri(runtime, tenants.user2)))
    victim_role = urlsplit(workspace_global_uri(runtime, tenants.ws_c)).username or ""
    attacker_uri = workspace_global_uri(runtime, tenants.ws_a)
    holder = psycopg.connect(attacker_uri)
    runner = psycopg.connect(attacker_uri, autocommit=True)
    pids = [holder.info.backend_pid, runner.info.backend_pid]
    outcome: dict[str, str] = {}

    def run_forever() -> None:
        try:
            runner.execute("SELECT pg_sleep(30)")
            outcome["runner"] = "completed"
        except psycopg.Error as exc:
            outcome["runner"] = f"ended: {type(exc).__name__}"

    thread = threading.Thread(target=run_forever, daemon=True)
    try:
        for conn in (holder, runner):
            for name in ("statement_timeout", "idle_in_transaction_session_timeout", "idle_session_timeout",
                         "lock_timeout"):
                conn.execute(f"SET {name} = 0")
        if holder.info.server_version >= 170000:
            holder.execute("SET transaction_timeout = 0")
            runner.execute("SET transaction_timeout = 0")
        holder.execute("SELECT txid_current()")  # an xid: every new snapshot on the server now starts below it
        thread.start()
        # The victim's churn in the shared catalogs (what every workspace and permission change makes):
        # dead rows of pg_db_role_setting, which only a VACUUM past the attacker's xid may remove.
        with psycopg.connect(victim_dsn, autocommit=True) as victim:
            for i in range(200):
                victim.execute(sql.SQL("ALTER ROLE {} SET work_mem = {}").format(
                    sql.Identifier(victim_role), sql.Literal(f"{4096 + i}kB")))
        time.sleep(AGENTPG_END_S + 2)
        left = alive(admin, pids)
        stuck = vacuum_dead_not_removable(victim_dsn, "pg_catalog.pg_db_role_setting")
        print(f"\nafter {AGENTPG_END_S + 2:.0f} s: attacker backends alive {len(left)}/2, dead rows of the "
              f"shared pg_db_role_setting VACUUM could not remove: {stuck} (of the victim's 200 changes)")
        assert not left and stuck == 0, (
            f"{len(left)} direct backends of the attacker outlived agentpg's end of a statement "
            f"({AGENTPG_END_S:.0f} s); VACUUM of a shared catalog left {stuck} dead rows it may not remove")
    finally:
        terminate(admin, pids)
        thread.join(10)
        with contextlib.suppress(psycopg.Error):
            holder.close()
        with contextlib.suppress(psycopg.Error):
            runner.close()
        with psycopg.connect(victim_dsn, autocommit=True) as victim:
            victim.execute(sql.SQL("ALTER ROLE {} SET work_mem = '4MB'").format(sql.Identifier(victim_role)))


# -- disk: one direct statement past the storage limit ----------------------------------------------------

#: One INSERT that writes ~250 MB over ~8 s (80 batches of 3,000 rows of 1 KB, 0.1 s apart).
PACED_INSERT = ("INSERT INTO big SELECT repeat(md5(g::text), 32) FROM generate_series(1, 80) s "
                "CROSS JOIN LATERAL (SELECT pg_sleep(0.1) FROM (SELECT s) x) z "
                "CROSS JOIN generate_series(1, 3000) g")


def user_bytes(runtime: Runtime, user: str, workspace: str) -> int:
    names = [db_of(global_uri(runtime, user)), db_of(agent_db_uri(runtime, workspace))]
    with psycopg.connect(runtime.admin_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT sum(pg_database_size(d)) FROM unnest(%s::text[]) d", (names,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_one_direct_statement_cannot_write_far_past_the_storage_limit(runtime: Runtime,
                                                                            settings: Settings) -> None:
    """The attacker's agent writes one long INSERT on a direct connection to its agent database. serve checks
    storage every 0.5 s and turns the user read-only once over; its statements end within ~5 s (1 s
    timeout). Safe: the INSERT is ended once the user is over its limit, and the user holds at most the limit
    plus what it could write before agentpg's end."""
    svc = runtime.service
    user, ws = uid("rt"), uid("rw")
    svc.register_user(user)
    svc.create_workspace_with_token(user, ws)
    uri = agent_db_uri(runtime, ws)
    limit_mb = math.ceil(user_bytes(runtime, user, ws) / 2**20) + 8
    served = settings.model_copy(update={"warm_pool_size": 0, "usage_sync_interval_s": 0,
                                         "mcp_statement_timeout_s": STATEMENT_TIMEOUT_S,
                                         "user_storage_limit_mb": limit_mb, "user_storage_check_interval_s": 0.5})
    try:
        with live_server(served), psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("CREATE TABLE big (x text)")
            started = time.monotonic()
            try:
                conn.execute(PACED_INSERT)
                outcome = "completed and committed"
            except psycopg.Error as exc:
                outcome = f"ended ({type(exc).__name__})"
            took = time.monotonic() - started
        used_mb = user_bytes(runtime, user, ws) / 2**20
        print(f"\nlimit {limit_mb} MB, check every 0.5 s: one direct INSERT ran {took:.1f} s, {outcome}; "
              f"the user holds {used_mb:.0f} MB ({used_mb / limit_mb:.1f}x its limit)")
        assert outcome.startswith("ended") and used_mb < 2 * limit_mb, (
            f"one direct statement {outcome} after {took:.1f} s, leaving the user at {used_mb:.0f} MB "
            f"against a {limit_mb} MB limit")
    finally:
        svc.delete_user(user)
        check_storage(svc.deps, 0)  # nobody else of this session stays blocked by this test's limit


# -- connections: one user's direct connections against every other user's --------------------------------


@contextlib.contextmanager
def private_runtime(max_connections: int) -> Iterator[tuple[Runtime, Settings]]:
    """A runtime on an embedded server of its own with ``max_connections`` slots (a third reserved)."""
    from mcp_support import PROCESS_INVALIDATION

    from agentpg.app.runtime import open_runtime
    from agentpg.embedded import EmbeddedPostgres

    home = Path(tempfile.mkdtemp(prefix="agentpg-attack-", dir="/tmp"))
    home.chmod(0o711)
    private = Settings(home=home, embedded_fsync=False, embedded_max_connections=max_connections,
                       warm_pool_size=0, governor_wait_s=1.0)
    try:
        with open_runtime(private, invalidation=PROCESS_INVALIDATION) as rt:
            yield rt, private
    finally:
        EmbeddedPostgres(home, fsync=False).stop()
        shutil.rmtree(home, ignore_errors=True)


async def test_one_user_cannot_take_every_connection_slot_from_the_others() -> None:
    """The attacker (one user, one workspace) opens every direct connection its roles' CONNECTION LIMIT allows
    (its global role and its agent database's role: 20 each) and leaves them idle. Server: max_connections 60
    (20 reserved for agentpg's superuser): 40 ordinary slots, all of them taken. Safe: after agentpg's session
    bounds run once (serve runs them every few seconds), the attacker keeps an eighth of the slots, another
    user's agent connects directly, and its MCP call is served."""
    with private_runtime(60) as (rt, private):
        svc = rt.service
        attacker, victim, ws_a, ws_v = uid("ra"), uid("rv"), uid("wa"), uid("wv")
        svc.register_user(attacker)
        svc.register_user(victim)
        svc.create_workspace_with_token(attacker, ws_a)
        _, victim_token = svc.create_workspace_with_token(victim, ws_v)
        held: list[Conn] = []
        try:
            for uri in (workspace_global_uri(rt, ws_a), agent_db_uri(rt, ws_a)):
                for _ in range(25):
                    try:
                        held.append(psycopg.connect(uri, autocommit=True, connect_timeout=5))
                    except psycopg.OperationalError:
                        break
            problems: list[str] = []
            assert rt.session_bounds is not None
            rt.session_bounds.bounds.new_backend_grace_s = 0  # counted at once (15 s by default)
            rt.session_bounds.bounds.tick()  # what serve does every few seconds
            try:
                with psycopg.connect(agent_db_uri(rt, ws_v), connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                problems.append(f"victim's direct connect: {str(exc).strip().splitlines()[-1][:120]}")
            with live_server(private) as url:
                async with http_session(url, victim_token.secret) as session:
                    result = await session.call_tool("query", {"database": "agent", "sql": "SELECT 1 AS one"})
                    if result.is_error:
                        problems.append(f"victim's MCP call: {text(result)[:160]}")
            print(f"\nthe attacker held {len(held)} idle direct connections; the victim: {problems or 'fine'}")
            assert not problems, f"one user's {len(held)} idle direct connections starve another user: {problems}"
        finally:
            for conn in held:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            svc.delete_user(attacker)
            svc.delete_user(victim)


# -- the gateway child: what it writes under its home ------------------------------------------------------

CHILD_LIMITS = {"processes": 16, "file_size_mb": 8, "memory_mb": 128, "cpu_s": 30}
CHILD_TMP_MB = 64
#: What the child writes into its $HOME (the sandbox's tmpfs /tmp, or its private directory without
#: namespaces): 48 files of 8 MB, each within its file-size limit, 384 MB in all (3x its memory limit).
FILL_HOME = ("for i in $(seq 48); do head -c 8388608 /dev/zero > $HOME/f$i || break; done; "
             "du -sk $HOME | cut -f1")


@pytest.fixture(scope="module")
def child_url(settings: Settings, tenants: Tenants) -> Iterator[str]:
    from test_attack_gateway import EVIL_JS
    from test_gateway import ensure_bwrap

    ensure_bwrap()
    node = shutil.which("node") or "/usr/bin/node"
    directory = Path(tempfile.mkdtemp(prefix="agentpg-attack-", dir="/tmp"))
    directory.chmod(0o755)
    (directory / "evil.js").write_text(EVIL_JS)
    (directory / "evil.js").chmod(0o644)
    entry = {"command": node, "args": [str(directory / "evil.js")], "read_only_paths": [str(directory)],
             "limits": CHILD_LIMITS}
    served = settings.model_copy(update={"warm_pool_size": 0, "gateway_idle_timeout_s": 2.0,
                                         "gateway_start_timeout_s": 30.0, "gateway_max_processes": 4,
                                         "gateway_limit_tmp_mb": CHILD_TMP_MB,
                                         "gateway_catalog": json.dumps({"evil": entry})})
    try:
        with live_server(served) as url:
            yield url
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_gateway_child_cannot_fill_its_home_past_its_limits(child_url: str, tenants: Tenants) -> None:
    """A child (an operator's catalog entry that does what its agent asks) writes many files, each within
    RLIMIT_FSIZE, into its home. Safe: what it can hold there is bounded (the sandbox's /tmp is a tmpfs, host
    memory no rlimit counts: its size is ``gateway_limit_tmp_mb``, here 64 MB)."""
    import httpx
    from mcp_support import gateway_session

    response = httpx.put(f"{child_url}/api/users/{tenants.user1}/mcp-servers/evil", json={"server": "evil"},
                         headers={"Authorization": f"Bearer {tenants.user1_token}"}, timeout=30)
    assert response.status_code in (200, 201), response.text
    async with gateway_session(child_url, tenants.token_a, "evil") as session:
        out = text(await session.call_tool("sh", {"cmd": FILL_HOME, "timeout": 60000}))
        held_kib = int(out.split()[-1])
        mounts = text(await session.call_tool("sh", {"cmd": "grep ' /tmp ' /proc/mounts || echo none"}))
        text(await session.call_tool("sh", {"cmd": "rm -f $HOME/f*"}))
    print(f"\nthe child holds {held_kib / 1024:.0f} MB in its home (its /tmp: {CHILD_TMP_MB} MB); "
          f"mount: {mounts.strip()[4:]}")
    assert 0 < held_kib <= CHILD_TMP_MB * 1024 + 64, (  # du counts the directory and metadata too
        f"a gateway child held {held_kib / 1024:.0f} MB in its home, past its {CHILD_TMP_MB} MB "
        f"({mounts.strip()[4:]})")


# -- temp files: one session's statement through parallel workers ------------------------------------------

PARALLEL = ("SET max_parallel_workers_per_gather = 8; SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; "
            "SET min_parallel_table_scan_size = 0; SET work_mem = '64kB'")
SPILL = "EXPLAIN (ANALYZE, COSTS OFF, FORMAT JSON) SELECT x FROM spill ORDER BY x"


def disk_kb(plan: object) -> list[int]:
    """Every "Sort Space Used" on disk (kB) in an EXPLAIN ANALYZE JSON plan, workers included."""
    found: list[int] = []
    if isinstance(plan, dict):
        if plan.get("Sort Space Type") == "Disk":
            found.append(int(plan["Sort Space Used"]))
        for value in plan.values():
            found += disk_kb(value)
    elif isinstance(plan, list):
        for value in plan:
            found += disk_kb(value)
    return found


def test_a_session_cannot_multiply_its_temp_file_limit_with_parallel_workers(runtime: Runtime) -> None:
    """temp_file_limit bounds each process (docs/limits.md): a session's statement with parallel workers may hold
    up to (1 + max_parallel_workers) times it, and no process more than it. PostgreSQL has no per-session
    bound, and any user may raise max_parallel_workers_per_gather. The attacker does, and sorts a table whose
    spill is over its limit. Safe: what is held stays within the documented bound."""
    from test_noisy_neighbour import roles_made_with

    from agentpg.providers.limits import TenantLimits

    svc = runtime.service
    user, ws = uid("rp"), uid("rp")
    svc.register_user(user)
    with roles_made_with(runtime, TenantLimits(temp_file_limit_mb=2)):
        svc.create_workspace_with_token(user, ws)
    try:
        with psycopg.connect(agent_db_uri(runtime, ws), autocommit=True) as conn:
            conn.execute("SET work_mem = '64MB'")  # generate_series' own tuplestore stays in memory
            conn.execute("CREATE TABLE spill AS SELECT random() AS x FROM generate_series(1, 400000)")
            conn.execute("ALTER TABLE spill SET (parallel_workers = 8)")
            conn.execute("VACUUM ANALYZE spill")
            conn.execute("SET work_mem = '64kB'")
            with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
                conn.execute("SELECT x FROM spill ORDER BY x")  # serially: past the 2 MB limit
            conn.execute(PARALLEL)
            workers_row = conn.execute("SELECT current_setting('max_parallel_workers')::int").fetchone()
            assert workers_row is not None
            spills: list[int] = []
            try:
                row = conn.execute(SPILL).fetchone()
                assert row is not None
                spills = disk_kb(row[0])
                outcome = f"ran: {len(spills)} processes spilled {sum(spills) / 1024:.1f} MB ({spills} kB)"
            except psycopg.errors.ConfigurationLimitExceeded:
                outcome = "refused"
        print(f"\ntemp_file_limit 2 MB, the same sort in parallel: {outcome}")
        assert all(kb <= 2 * 1024 for kb in spills), outcome
        assert sum(spills) <= 2 * 1024 * (1 + int(workers_row[0])), outcome
    finally:
        svc.delete_user(user)


RAISED = {"max_parallel_workers_per_gather": "8", "hash_mem_multiplier": "1000", "temp_buffers": "1GB"}


async def test_role_defaults_a_tenant_sets_do_not_reach_agentpgs_own_connections(
        runtime: Runtime, tenants: Tenants, serve_url: str) -> None:
    """The attacker sets role defaults for itself on a direct connection (``ALTER ROLE CURRENT_USER SET``,
    which any role may do), then runs its statements through MCP, which refuses ``SET``. Safe: agentpg's own
    connections run with agentpg's values, not the tenant's."""
    uri = agent_db_uri(runtime, tenants.ws_b)
    with psycopg.connect(uri, autocommit=True) as conn:
        for name, value in RAISED.items():
            conn.execute(sql.SQL("ALTER ROLE CURRENT_USER SET {} = {}").format(sql.Identifier(name),
                                                                                sql.Literal(value)))
    try:
        async with http_session(serve_url, tenants.token_b) as session:
            names = ", ".join(f"current_setting('{n}') AS {n}" for n in RAISED)
            result = await session.call_tool("query", {"database": "agent", "sql": f"SELECT {names}"})
            assert not result.is_error, text(result)
            seen = dict(zip(RAISED, (result.structured_content or {})["rows"][0], strict=True))
        print(f"\nMCP statements of the agent run with its own role defaults: {seen}")
        assert not any(seen[n] == v for n, v in RAISED.items()), f"the tenant's raised defaults apply: {seen}"
    finally:
        with psycopg.connect(uri, autocommit=True) as conn:
            for name in RAISED:
                conn.execute(sql.SQL("ALTER ROLE CURRENT_USER RESET {}").format(sql.Identifier(name)))


def test_what_a_direct_session_cannot_raise_or_start(runtime: Runtime, tenants: Tenants) -> None:
    """Bounds that hold on a direct connection (agent database, full rights): its CONNECTION LIMIT, its
    temp_file_limit, temporary tables (outside temp_file_limit and the storage check), prepared
    transactions (which would outlive the session), and raising its own backend memory limit."""
    refused: dict[str, bool] = {}
    with psycopg.connect(agent_db_uri(runtime, tenants.ws_b), autocommit=True) as conn:
        for label, statement in (
                ("connection limit", "ALTER ROLE CURRENT_USER CONNECTION LIMIT -1"),
                ("temp_file_limit", "SET temp_file_limit = -1"),
                ("temp_file_limit role default", "ALTER ROLE CURRENT_USER SET temp_file_limit = -1"),
                ("temporary table", "CREATE TEMP TABLE t (i int)"),
                ("prepared transaction", "BEGIN; SELECT 1; PREPARE TRANSACTION 'redteam'"),
                ("a database's settings", "ALTER DATABASE CURRENT SET statement_timeout = 0")):
            try:
                conn.execute(statement)
                refused[label] = False
            except psycopg.Error:
                refused[label] = True
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        limit = conn.execute("SHOW temp_file_limit").fetchone()
    assert all(refused.values()), refused
    assert limit is not None and limit[0] != "-1"
