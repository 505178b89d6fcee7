"""Costs and budgets on the real server: over budget means read-only at the grant level, and back."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from helpers import agent_db_uri, global_uri, workspace_global_uri

from agentpg.errors import InvalidInput, NotFound
from agentpg.providers.base import DatabasePlan
from agentpg.runtime import Runtime
from agentpg.usage.budgets import sync_usage
from agentpg.usage.pricing import PriceTable, cost_microcents

# Prices high enough that a few hundred rows cost real money, so a test can cross a budget quickly.
EXPENSIVE = PriceTable(written_cents_per_gb=50_000_000.0)


def wait_for_stats(runtime: Runtime, user_id: str, minimum_rows: int) -> None:
    """Cumulative statistics reach pg_stat_database asynchronously; wait until our writes are counted."""
    with runtime.service.deps.sessions() as s:
        from sqlalchemy import select

        from agentpg.catalog.models import UserGlobalDatabase

        rec = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)).one()
        plan = DatabasePlan(rec.database_name, rec.owner_role or "", rec.login_role or "", rec.provider_server)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (runtime.service.deps.provider.usage(plan).rows_written or 0) >= minimum_rows:
            return
        time.sleep(0.2)
    raise AssertionError("pg_stat_database never counted the writes")


def test_pricing_prices_each_dimension() -> None:
    from agentpg.providers.base import UsageSample

    prices = PriceTable(storage_cents_per_gb_month=730.0, compute_cents_per_hour=100.0, written_cents_per_gb=1.0,
                        transfer_cents_per_gb=2.0, bytes_per_written_row=1024**3)
    before = UsageSample(storage_bytes=1024**3, transactions=10, rows_written=1)
    after = UsageSample(storage_bytes=1024**3, transactions=11, rows_written=3)
    # one hour: 1 GB for 1/730 month at 730 c = 1 c; active the whole hour = 100 c; 2 rows of 1 GB = 2 c
    assert cost_microcents(prices, before, after, 3600) == 103_000_000
    idle = UsageSample(storage_bytes=0, transactions=11, rows_written=3)
    assert cost_microcents(prices, after, idle, 3600) == 0
    neon_before = UsageSample(storage_bytes=0, compute_seconds=0, written_bytes=0, transfer_bytes=0)
    neon_after = UsageSample(storage_bytes=0, compute_seconds=1800, written_bytes=1024**3, transfer_bytes=1024**3)
    assert cost_microcents(prices, neon_before, neon_after, 60) == (50 + 1 + 2) * 1_000_000
    reset = UsageSample(storage_bytes=0, transactions=1, rows_written=0)  # server stats were reset
    assert cost_microcents(prices, after, reset, 0) == 0


def test_over_budget_turns_writes_off_and_raising_it_turns_them_back_on(runtime: Runtime) -> None:
    svc, deps = runtime.service, runtime.service.deps
    u, w1, w2 = f"budget-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    svc.register_user(u)
    svc.create_workspace(u, w1)
    svc.create_workspace(u, w2)
    svc.set_budget(u, 100)
    agent1, agent2 = workspace_global_uri(runtime, w1), workspace_global_uri(runtime, w2)
    with psycopg.connect(agent1, autocommit=True) as conn:
        conn.execute("CREATE TABLE events (id serial PRIMARY KEY, body text)")
        conn.execute("INSERT INTO events (body) SELECT 'e' || g FROM generate_series(1, 500) g")
    wait_for_stats(runtime, u, 500)
    sync_usage(deps, EXPENSIVE)
    report = svc.usage(u)
    assert report.status == "exceeded" and report.read_only
    parts = report.agent_databases + ([report.global_database] if report.global_database else [])
    assert sum(p.cost_cents for p in parts) == report.total_cost_cents > 100
    assert {a.workspace_id for a in report.agent_databases} == {w1, w2}

    # Reads still work for everyone; writes and DDL are refused by Postgres itself, for every role.
    for uri in (agent1, agent2, global_uri(runtime, u)):
        with psycopg.connect(uri, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (500,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO events (body) VALUES ('over budget')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("CREATE TABLE more (id int)")
    with psycopg.connect(agent_db_uri(runtime, w1), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE TABLE mine (id int)")
    assert svc.write_block_reason(u) is not None and "budget exceeded" in svc.write_block_reason(u)  # type: ignore[operator]

    # Raising the budget restores writes at once, without waiting for a sync.
    raised = svc.set_budget(u, 10**9)
    assert raised.status == "ok" and not raised.read_only
    with psycopg.connect(agent2, autocommit=True) as conn:
        conn.execute("INSERT INTO events (body) VALUES ('back under budget')")
    with psycopg.connect(global_uri(runtime, u), autocommit=True) as conn:
        conn.execute("DROP TABLE events")  # the login role is a full owner member again
    with psycopg.connect(agent_db_uri(runtime, w1), autocommit=True) as conn:
        conn.execute("CREATE TABLE mine (id int)")
    assert svc.write_block_reason(u) is None
    svc.delete_user(u)


def test_budget_input_is_checked(runtime: Runtime) -> None:
    with pytest.raises(NotFound):
        runtime.service.set_budget("no-such-user", 10)
    u = f"budget-{uuid.uuid4().hex[:8]}"
    runtime.service.register_user(u)
    for bad in (-1, 10**13, True, 1.5):
        with pytest.raises(InvalidInput, match="whole number of cents"):
            runtime.service.set_budget(u, bad)  # type: ignore[arg-type]
    assert runtime.service.set_budget(u, None).budget_cents is None
    runtime.service.delete_user(u)


def test_only_one_sync_runs_at_a_time(runtime: Runtime) -> None:
    from sqlalchemy import text

    with runtime.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": 0x61677470_75736167})
        try:
            assert sync_usage(runtime.service.deps, PriceTable()).skipped
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": 0x61677470_75736167})
    assert not sync_usage(runtime.service.deps, PriceTable()).skipped
