"""The fleet: three real PostgreSQL servers started by the test, databases spread over them."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import UserGlobalDatabase
from agentpg.embedded import EmbeddedPostgres
from agentpg.errors import ProviderUnavailable
from agentpg.lifecycle import reconcile, users, workspaces
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.providers.base import DatabasePlan, UsageSample
from agentpg.providers.fleet import FleetProvider, server_name_of


@pytest.fixture(scope="module")
def fleet_servers() -> Iterator[list[EmbeddedPostgres]]:
    homes = [Path(tempfile.mkdtemp(prefix="agentpg-fleet-", dir="/tmp")) for _ in range(3)]
    servers = []
    for home in homes:
        home.chmod(0o711)
        server = EmbeddedPostgres(home, fsync=False)
        server.ensure_running()
        servers.append(server)
    yield servers
    for server, home in zip(servers, homes, strict=True):
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture()
def fleet_deps(runtime: Runtime, fleet_servers: list[EmbeddedPostgres]) -> Iterator[LifecycleDeps]:
    dsns = [s.ensure_running().dsn("postgres") for s in fleet_servers]
    provider = FleetProvider({server_name_of(d): d for d in dsns}, connect_timeout_s=2)
    base = runtime.service.deps
    yield LifecycleDeps(engine=base.engine, sessions=base.sessions, provider=provider, keyring=base.keyring)
    provider.close()


def servers_of(deps: LifecycleDeps, user_ids: list[str]) -> Counter[str]:
    with deps.sessions() as s:
        rows = s.scalars(select(UserGlobalDatabase.provider_server).where(UserGlobalDatabase.user_id.in_(user_ids)))
        return Counter(r for r in rows if r)


def test_thirty_users_spread_evenly_and_a_dead_server_fails_only_its_users(
        fleet_deps: LifecycleDeps, fleet_servers: list[EmbeddedPostgres]) -> None:
    ids = [f"fleet-{uuid.uuid4().hex[:8]}" for _ in range(30)]
    for user_id in ids:
        users.register_user(fleet_deps, user_id)
    spread = servers_of(fleet_deps, ids)
    assert len(spread) == 3 and max(spread.values()) - min(spread.values()) <= 1, spread

    # A workspace's agent database may land on another server than its user's global database, and the
    # agent's role in the global database still works: each record remembers its own server.
    workspaces.create_workspace(fleet_deps, ids[0], f"w-{uuid.uuid4().hex[:8]}")

    # Stop one server: its users' operations fail clearly, everyone else carries on, new users go elsewhere.
    victim = fleet_servers[2]
    victim_name = server_name_of(victim.ensure_running().dsn("postgres"))
    victim.stop()
    try:
        with fleet_deps.sessions() as s:
            on_victim = list(s.scalars(select(UserGlobalDatabase.user_id).where(
                UserGlobalDatabase.user_id.in_(ids), UserGlobalDatabase.provider_server == victim_name)))
        assert on_victim
        # The usage sync's read: one request per server, and the dead server fails only its own databases.
        with fleet_deps.sessions() as s:
            records = list(s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id.in_(ids))))
        samples = fleet_deps.provider.usage_many(
            [DatabasePlan(r.database_name, r.owner_role or "", r.login_role or "", r.provider_server)
             for r in records])
        assert len(samples) == len(records) == 30
        for rec in records:
            sample = samples[rec.database_name]
            if rec.provider_server == victim_name:
                assert isinstance(sample, ProviderUnavailable)
            else:
                assert isinstance(sample, UsageSample) and sample.storage_bytes > 0
        with pytest.raises(ProviderUnavailable, match=victim_name.split(":")[1]):
            users.delete_user(fleet_deps, on_victim[0])
        survivor = next(u for u in ids if u not in on_victim and u != ids[0])
        users.delete_user(fleet_deps, survivor)
        ids.remove(survivor)
        newcomer = f"fleet-{uuid.uuid4().hex[:8]}"
        users.register_user(fleet_deps, newcomer)
        ids.append(newcomer)
        assert servers_of(fleet_deps, [newcomer]).keys() != {victim_name}
    finally:
        victim.ensure_running()

    # Back up: reconcile across the fleet finishes the interrupted deletion and finds nothing orphaned.
    report = reconcile.reconcile(fleet_deps)
    assert report.failed == [] and report.orphan_databases == [] and report.orphan_roles == []
    assert any(on_victim[0] in line for line in report.finished)
    ids.remove(on_victim[0])
    for user_id in ids:
        users.delete_user(fleet_deps, user_id)
    for server in fleet_servers:
        with psycopg.connect(server.ensure_running().dsn("postgres"), autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM pg_database WHERE datname LIKE 'apg\\_%'").fetchone()
            assert left == (0,)
