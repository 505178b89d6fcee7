"""The warm pool: claimed by registration and workspace creation, refilled, crash-safe, known to reconcile."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import run_cli
from helpers import global_uri, workspace_global_uri
from sqlalchemy import delete, func, select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import Operation, WarmDatabase
from agentpg.lifecycle.warm import ClaimBursts, Refiller, WarmSizing, drain, fill, peak_burst, trim


def warm_count(rt: Runtime, state: str = "ready") -> int:
    with rt.service.deps.sessions() as s:
        return s.scalar(select(func.count()).select_from(WarmDatabase).where(WarmDatabase.state == state)) or 0


def test_registration_claims_a_warm_database_with_a_fresh_password(runtime: Runtime) -> None:
    deps = runtime.service.deps
    assert fill(deps, 2) == 2 and warm_count(runtime) == 2
    with deps.sessions() as s:
        warm_names = set(s.scalars(select(WarmDatabase.database_name)))
    u, w = f"warm-{uuid.uuid4().hex[:8]}", f"w-{uuid.uuid4().hex[:8]}"
    user = runtime.service.register_user(u)
    ws = runtime.service.create_workspace(u, w)
    assert user.global_database is not None and ws.database is not None
    assert {user.global_database.name, ws.database.name} == warm_names
    assert warm_count(runtime) == 0
    # The claimed database works like a fresh one: the login URI and the agent's own role both connect,
    # and the event trigger hands the agent's table to the owner role.
    with psycopg.connect(workspace_global_uri(runtime, w), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id int)")
    with psycopg.connect(global_uri(runtime, u), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (0,)
    # An empty pool falls back to creating a database.
    other = runtime.service.create_workspace(u, f"w-{uuid.uuid4().hex[:8]}")
    assert other.database is not None and other.database.status == "ready"
    runtime.service.delete_user(u)


def test_refiller_keeps_the_pool_at_target(runtime: Runtime) -> None:
    refiller = Refiller(runtime.service.deps, WarmSizing(base=2, maximum=2), interval_s=0.2)
    refiller.start()
    try:
        import time

        deadline = time.monotonic() + 30
        while warm_count(runtime) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert warm_count(runtime) == 2
    finally:
        refiller.stop()
    assert drain(runtime.service.deps) == 2
    assert warm_count(runtime) == 0


def test_crashed_refill_is_cleaned_by_reconcile(runtime: Runtime, agentpg_home: Path,
                                                admin: psycopg.Connection) -> None:
    before = {r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'apg\\_%'")}
    # A refill that wrote its intent and created the database, then died before marking it ready.
    deps = runtime.service.deps
    from agentpg.providers.base import DatabasePlan, new_password

    plan = DatabasePlan.fresh()
    with deps.sessions.begin() as s:
        s.add(WarmDatabase(provider=deps.provider.name, database_name=plan.database, owner_role=plan.owner_role,
                           login_role=plan.login_role, state="creating"))
    deps.provider.create_database(plan, new_password())
    report = run_cli(agentpg_home, "reconcile")
    assert report.returncode == 0, report.stdout + report.stderr
    assert "undone: 1" in report.stdout
    after = {r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'apg\\_%'")}
    assert after == before and warm_count(runtime, "creating") == 0


def test_pool_cli(runtime: Runtime, agentpg_home: Path) -> None:
    filled = run_cli(agentpg_home, "pool", "fill", "--size", "1")
    assert filled.returncode == 0 and "1 warm database(s) created" in filled.stdout
    drained = run_cli(agentpg_home, "pool", "drain", "--json")
    assert drained.returncode == 0 and '"dropped": 1' in drained.stdout


def test_the_pool_sizes_itself_from_the_busiest_recent_burst_and_shrinks_back(runtime: Runtime) -> None:
    """Issue 22: a wave of 25 registrations within a minute (written as their intents, 55 min ago, before this
    session's own) makes the target 1.5 times that, capped by the disk budget; trimming takes the pool back
    down to its target and leaves no warm database half-dropped."""
    deps = runtime.service.deps
    ids = [str(uuid.uuid4()) for _ in range(25)]
    with deps.sessions.begin() as s:
        moment = s.scalar(select(func.now() - func.make_interval(0, 0, 0, 0, 0, 55)))
        for op_id in ids:
            s.add(Operation(id=op_id, kind="register_user", user_id=f"burst-{op_id[:8]}", state="done",
                            created_at=moment))
    try:
        sizing = WarmSizing(base=1, maximum=40)
        peak = peak_burst(deps, sizing)
        assert peak >= 25
        assert sizing.target(peak) == min(40, -(-peak * 3 // 2))
        assert WarmSizing(base=1, maximum=10).target(peak) == 10  # the disk budget wins
        assert WarmSizing(base=0, maximum=40).target(peak) == 0  # a pool turned off stays off
    finally:
        with deps.sessions.begin() as s:
            s.execute(delete(Operation).where(Operation.id.in_(ids)))
    assert fill(deps, 3) == 3
    assert trim(deps, 1) == 2 and warm_count(runtime) == 1 and warm_count(runtime, "dropping") == 0
    assert drain(deps) == 1



def test_a_claim_registers_in_one_catalog_commit_without_touching_the_server(
        runtime: Runtime, admin: psycopg.Connection) -> None:
    """Issue 22: the warm database keeps the password it was made with (sealed in its row), so registration
    changes nothing on the tenant server: the login role's verifier is the same before and after, and the
    user, its database and the operation are ready/done from the first commit."""
    deps = runtime.service.deps
    assert fill(deps, 1) == 1
    with deps.sessions() as s:
        login = s.scalars(select(WarmDatabase.login_role)).one()
    verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (login,)).fetchone()
    user = f"one-{uuid.uuid4().hex[:8]}"
    info = runtime.service.register_user(user)
    assert info.status == "active" and info.global_database is not None and info.global_database.status == "ready"
    assert admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (login,)).fetchone() == verifier
    with deps.sessions() as s:
        op = s.scalars(select(Operation).where(Operation.user_id == user, Operation.kind == "register_user")).one()
        assert op.state == "done"
    with psycopg.connect(global_uri(runtime, user), autocommit=True) as conn:  # the sealed password works
        assert conn.execute("SELECT current_user").fetchone() == (login,)
    runtime.service.delete_user(user)


def test_the_refill_waits_out_a_wave_of_bursts_but_never_starves_the_pool() -> None:
    """When the refill may make its next database (times given, no clock): a refill racing a burst slows the
    registrations it serves (its ``CREATE DATABASE`` WAL is flushed before their commits)."""
    bursts = ClaimBursts(quiet_s=0.5, calm_s=5.0, max_wait_s=5.0, max_calm_s=15.0)
    t = 100.0
    for i in range(20):  # a burst of 20 registrations, 10 ms apart
        bursts.claim(t + i * 0.01)
    t += 0.19
    assert bursts.largest(t) == 20
    # 70 left: the next burst of 20 is served from the pool, so wait for 5 s of calm ...
    assert bursts.wait_until(70, began=t, now=t) == pytest.approx(t + 5.0)
    # ... but never longer than 15 s in all, if bursts keep coming 2 s apart
    assert bursts.wait_until(70, began=t - 14.0, now=t) == pytest.approx(t + 1.0)
    # 10 left: the next burst could empty the pool: the first half-second pause will do
    assert bursts.wait_until(10, began=t, now=t) == pytest.approx(t + 0.5)
    # nothing left: at once
    assert bursts.wait_until(0, began=t, now=t) == t
    # a new burst is counted apart from the first (the largest stays 20 while it is smaller)
    t += 2.0
    for i in range(5):
        bursts.claim(t + i * 0.01)
    assert bursts.largest(t) == 20
    # ten minutes later the old bursts are forgotten
    assert bursts.largest(t + 601.0) == 0


def test_claims_one_at_a_time_refill_in_the_pauses() -> None:
    """A steady trickle (one claim every 3 s) is no burst: the refill takes each pause, the pool never drains
    waiting for a calm that never comes."""
    bursts = ClaimBursts(quiet_s=0.5, calm_s=5.0, max_wait_s=5.0)
    for i in range(10):
        bursts.claim(100.0 + 3.0 * i)
    now = 127.0
    assert bursts.largest(now) == 1
    assert bursts.wait_until(8, began=now, now=now) == pytest.approx(127.5)
    # a stream with no pause at all: the wait is bounded
    for i in range(100):
        bursts.claim(200.0 + 0.1 * i)
    assert bursts.wait_until(1, began=205.0, now=209.9) == pytest.approx(210.0)
