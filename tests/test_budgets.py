"""Costs and budgets on the real server: over budget means read-only at the grant level, and back."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from helpers import agent_db_uri, global_uri, workspace_global_uri

from agentpg.app.runtime import Runtime
from agentpg.errors import InvalidInput, NotFound
from agentpg.providers.base import DatabasePlan
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


def _plans_of(runtime: Runtime, user_id: str) -> list[DatabasePlan]:
    from sqlalchemy import select

    from agentpg.catalog.models import UserGlobalDatabase, WorkspaceAgentDatabase

    with runtime.service.deps.sessions() as s:
        records = [*s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == user_id)),
                   *s.scalars(select(WorkspaceAgentDatabase).where(WorkspaceAgentDatabase.user_id == user_id))]
    return [DatabasePlan(r.database_name, r.owner_role or "", r.login_role or "", r.provider_server)
            for r in records]


def test_usage_of_many_databases_is_read_at_once_and_a_missing_one_fails_alone(runtime: Runtime) -> None:
    from agentpg.errors import ProviderError
    from agentpg.providers.base import UsageSample

    svc = runtime.service
    u = f"many-{uuid.uuid4().hex[:8]}"
    svc.register_user(u)
    svc.create_workspace(u, f"w-{uuid.uuid4().hex[:8]}")
    plans = _plans_of(runtime, u)
    assert len(plans) == 2
    gone = DatabasePlan("apg_0000000000000000", "apg_0000000000000000_o", "apg_0000000000000000_l",
                        plans[0].server)
    samples = svc.deps.provider.usage_many([*plans, gone])
    assert set(samples) == {p.database for p in plans} | {gone.database}
    for plan in plans:
        sample = samples[plan.database]
        assert isinstance(sample, UsageSample) and sample.storage_bytes > 1_000_000
        # the same figures as asking for that database alone (storage is stable on an idle database)
        assert sample.storage_bytes == svc.deps.provider.usage(plan).storage_bytes
    missing = samples[gone.database]
    assert isinstance(missing, ProviderError) and "does not exist" in missing.message
    svc.delete_user(u)


def test_a_sync_in_batches_prices_every_database_exactly_once(runtime: Runtime,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import select

    from agentpg.catalog.models import UserGlobalDatabase, WorkspaceAgentDatabase
    from agentpg.usage import budgets

    svc = runtime.service
    users = [f"batch-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    for u in users:
        svc.register_user(u)
        svc.create_workspace(u, f"w-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(budgets, "BATCH", 2)  # several batches, one of them partly filled
    now = datetime.now(UTC)
    report = sync_usage(svc.deps, PriceTable(), now=now)
    with svc.deps.sessions() as s:
        ready = [r for model in (UserGlobalDatabase, WorkspaceAgentDatabase)
                 for r in s.scalars(select(model).where(model.status == "ready"))]
    platform = [r for r in ready if r.ownership_type == "platform" and r.owner_role and r.login_role]
    assert not report.failed
    assert report.databases == len(platform) >= 4
    assert all(r.last_consumption_sync == now and r.usage_snapshot for r in platform)
    ours = [r for r in platform if r.user_id in users]
    assert len(ours) == 4 and all(r.usage_snapshot["storage_bytes"] > 1_000_000 for r in ours)  # type: ignore[index]
    for u in users:
        assert svc.usage(u).budget_cents is None  # a budget row for each user, none set
        svc.delete_user(u)
