"""The warm pool: claimed by registration and workspace creation, refilled, crash-safe, known to reconcile."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
from conftest import run_cli
from helpers import global_uri, workspace_global_uri
from sqlalchemy import func, select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import WarmDatabase
from agentpg.lifecycle.warm import Refiller, drain, fill


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
    refiller = Refiller(runtime.service.deps, target=2, interval_s=0.2)
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
