"""Undo on the Neon provider (issue 19), through the service, against the Neon stand-in.

The stand-in's backing server is a private embedded server archived by agentpg's own archiver, so its
point-in-time branches (``neon_branches.py``) really hold the data of that instant. An agent deletes rows and
drops a table in its user's global database on Neon; the user restores to a checkpoint and to a time, in place
and as a copy; the data is back exactly, the agent's grants work on what was swapped in, an in-place restore
is itself undone through its checkpoint, and a copy is read and dropped.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import leakscan
import psycopg
import pytest
from neon_standin import EmulatedNeon, NeonStandIn, StandInServer
from sqlalchemy import select

from agentpg.access.permissions import GlobalDbPermissions
from agentpg.app.runtime import Runtime
from agentpg.catalog.models import Operation, RestoredCopy, UserGlobalDatabase
from agentpg.embedded import EmbeddedPostgres, client_bin
from agentpg.errors import ProviderError
from agentpg.lifecycle import undo, users, workspace_ids, workspaces
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.lifecycle.users import plan_of
from agentpg.providers.archive import Archiver
from agentpg.providers.base import DatabasePlan, NotRestorable
from agentpg.providers.neon_api import RetryPolicy
from agentpg.service import Service

API_KEY = "napi_" + secrets.token_urlsafe(36)


@dataclass
class Stand:
    standin: NeonStandIn
    neon: EmulatedNeon
    service: Service
    deps: LifecycleDeps
    base_url: str
    superuser_dsn: str


@pytest.fixture(scope="module")
def stand(runtime: Runtime) -> Iterator[Stand]:
    home = Path(tempfile.mkdtemp(prefix="agentpg-neon-undo-", dir="/tmp"))
    home.chmod(0o711)
    server = EmbeddedPostgres(home, fsync=False)
    info = server.ensure_running()
    admin_dsn = info.dsn("postgres")
    archiver = Archiver(server="neon-standin", admin_dsn=admin_dsn, directory=home / "backup" / "standin",
                        work_dir=server.root / "restore", bin_dir=client_bin(), server_bin_dir=server.server_bin(),
                        sync_files=False)
    standin = NeonStandIn(admin_dsn, API_KEY, operation_delay_s=0.05, archiver=archiver)
    web = None
    neon = None
    try:
        archiver.tick()  # the slot, pg_receivewal, the first base backup: the history starts here
        web = StandInServer(standin).start()
        neon = provider(web.base_url, admin_dsn)
        base = runtime.service.deps
        deps = LifecycleDeps(engine=base.engine, sessions=base.sessions, provider=neon, keyring=base.keyring)
        service = Service(deps, runtime.service.tokens, embedded=False)
        yield Stand(standin, neon, service, deps, web.base_url, admin_dsn)
        service.audit_writer.close()
    finally:
        if neon is not None:
            neon.close()
        if web is not None:
            web.stop()
        standin.cleanup()
        archiver.stop()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
        for password in [API_KEY, *standin.passwords]:  # agentpg's outputs must never have held these
            leakscan.add_uri(f"postgresql://x:{password}@h/d")


def rows(uri: str) -> tuple[list[tuple[Any, ...]], bool]:
    """The customers, and whether table orders exists."""
    with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
        customers = conn.execute("SELECT id, name FROM customers ORDER BY id").fetchall()
        orders = conn.execute("SELECT to_regclass('public.orders') IS NOT NULL").fetchone()
    return customers, bool(orders and orders[0])


def test_an_agents_mistakes_on_neon_are_undone(stand: Stand) -> None:
    service, standin = stand.service, stand.standin
    u, w = f"neon-undo-{uuid.uuid4().hex[:8]}", f"neon-agent-{uuid.uuid4().hex[:8]}"
    users.register_user(stand.deps, u)
    workspaces.create_workspace(stand.deps, u, w)
    service.set_agent_permissions(w, GlobalDbPermissions(can_drop_tables=True), user_id=u)
    (status,) = service.undo.archive_status()
    assert status.protected and status.server is None
    agent = workspace_global_uri_of(stand, u, w)
    with psycopg.connect(agent, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO customers VALUES (1, 'ada'), (2, 'grace'), (3, 'edsger')")
        conn.execute("CREATE TABLE orders (id int)")
        conn.execute("INSERT INTO orders VALUES (10)")
    state_a = ([(1, "ada"), (2, "grace"), (3, "edsger")], True)

    started = time.monotonic()
    checkpoint = service.undo.create_checkpoint(u, None, "before the cleanup", "test")
    checkpoint_ms = (time.monotonic() - started) * 1000
    posts = len(standin.calls("POST", r"/projects/[^/]+/branches"))
    assert posts == 0  # a checkpoint copies nothing: no branch is made

    with psycopg.connect(agent, autocommit=True) as conn:
        conn.execute("INSERT INTO customers VALUES (4, 'barbara')")
    time.sleep(0.3)
    at_b = datetime.now(UTC)
    time.sleep(0.3)
    state_b = ([*state_a[0], (4, "barbara")], True)
    with psycopg.connect(agent, autocommit=True) as conn:  # the mistakes
        conn.execute("DELETE FROM customers WHERE id <= 3")
        conn.execute("DROP TABLE orders")
    state_c = ([(4, "barbara")], False)
    assert rows(agent) == state_c

    figures: dict[str, float] = {}

    def timed(label: str, spec: undo.TargetSpec, mode: undo.RestoreMode = "in_place") -> Any:
        began = time.monotonic()
        result = service.undo.restore(u, None, spec, mode)
        figures[label] = time.monotonic() - began
        return result

    # As a copy, to a time: the user reads it first (on the branch's endpoint), then drops it. The first
    # POST fails ambiguously (503): the provider looks for the branch before it sends another.
    standin.inject(503, r"/projects/[^/]+/branches", method="POST")
    copied = timed("copy at a time", undo.TargetSpec(at=at_b), "new")
    assert copied.mode == "new" and copied.restored_copy is not None
    assert standin.calls("POST", r"/projects/[^/]+/branches") == [503, 201]
    (listed,) = service.undo.list_copies(u)
    copy_uri = service.uris.copy(u, listed.id)
    assert rows(copy_uri) == state_b
    assert rows(agent) == state_c  # the database itself is untouched
    with stand.deps.sessions() as s:
        copy_name = s.get_one(RestoredCopy, listed.id).database_name
    other = provider(stand.base_url, stand.superuser_dsn)  # another process finds the copy by its branch's name
    try:
        assert other.restored_copy_uri(copy_uri, copy_name) == copy_uri
    finally:
        other.close()
    (made,) = [b for b in next(iter(standin.by_name(plan_name(stand, u)))).branches.values() if not b.default]
    assert made.parent_timestamp and made.endpoint_id
    service.undo.drop_copy(u, listed.id)
    assert service.undo.list_copies(u) == []
    assert [b.default for b in standin.by_name(plan_name(stand, u))[0].branches.values()] == [True]

    # In place, to the checkpoint: same URI, the agent's grants work on what was swapped in. Neon answers the
    # first restore request 423 (an operation still runs): it is sent again.
    standin.inject(423, r"/projects/[^/]+/branches/[^/]+/restore", method="POST")
    restored = timed("in place to a checkpoint", undo.TargetSpec(checkpoint_id=checkpoint.id))
    assert restored.mode == "in_place" and restored.undo_checkpoint_id
    assert rows(agent) == state_a
    with psycopg.connect(agent, autocommit=True) as conn:
        conn.execute("INSERT INTO orders VALUES (11)")
        conn.execute("DELETE FROM orders WHERE id = 11")
    assert standin.calls("POST", r"/projects/[^/]+/branches/[^/]+/restore") == [423, 200]
    with stand.deps.sessions() as s:  # the swap run again (a crash after Neon did it): nothing more happens
        glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == u)).one()
        op = s.scalars(select(Operation).where(Operation.user_id == u, Operation.kind == "restore")
                       .order_by(Operation.created_at.desc())).first()
        assert op is not None
    plan = plan_of(glob)
    stand.neon.replace_database(plan, DatabasePlan(op.plan["into"]["database"], plan.owner_role, plan.login_role))
    assert standin.calls("POST", r"/projects/[^/]+/branches/[^/]+/restore") == [423, 200]
    assert rows(agent) == state_a

    # The restore is itself undone: its checkpoint is on the history the default branch had before.
    timed("in place, undoing the restore", undo.TargetSpec(checkpoint_id=restored.undo_checkpoint_id))
    assert rows(agent) == state_c
    # And a time before both restores is still found (on the branch preserved by the first one).
    timed("in place to a time", undo.TargetSpec(at=at_b))
    assert rows(agent) == state_b
    project = standin.by_name(plan_name(stand, u))[0]
    assert sorted(" replaced at " in b.name for b in project.branches.values()) == [False, True, True, True]

    with pytest.raises(NotRestorable, match="history window"):
        service.undo.restore(u, None, undo.TargetSpec(at=datetime.now(UTC) - timedelta(days=2)))
    # On Neon each branch has its own roles; the stand-in's branches share the cluster's, so the preserved
    # branches (which grant to the agent's role) are deleted first, as deleting the project does on Neon.
    for branch in [b for b in project.branches.values() if not b.default]:
        answer = httpx.delete(f"{stand.base_url}/projects/{project.id}/branches/{branch.id}",
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert answer.status_code == 200, answer.text
        time.sleep(standin.operation_delay_s)
    users.delete_user(stand.deps, u)
    assert not standin.by_name(project.name)
    print(f"\nNeon stand-in: checkpoint {checkpoint_ms:.1f} ms; "
          + "; ".join(f"{k} {v:.2f} s" for k, v in figures.items()))


def test_a_restore_failing_before_the_swap_leaves_the_database_as_it_was(stand: Stand) -> None:
    u = f"neon-undo-{uuid.uuid4().hex[:8]}"
    users.register_user(stand.deps, u)
    with stand.deps.sessions() as s:
        glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == u)).one()
        assert glob.connection_uri_sealed
        uri = stand.deps.open(glob.connection_uri_sealed, "user_global_database", glob.id, "connection_uri")
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO customers VALUES (1, 'ada')")
    checkpoint = stand.service.undo.create_checkpoint(u, None, None, "test")
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("INSERT INTO customers VALUES (2, 'grace')")
    # The branch is made, then reaching its endpoint fails: the half-made branch is deleted again.
    stand.standin.inject(400, r"/projects/[^/]+/connection_uri", method="GET")
    with pytest.raises(ProviderError, match="400"):
        stand.service.undo.restore(u, None, undo.TargetSpec(checkpoint_id=checkpoint.id))
    assert rows(uri) == ([(1, "ada"), (2, "grace")], False)
    (project,) = stand.standin.by_name(glob.database_name)
    assert [b.default for b in project.branches.values()] == [True]
    with stand.deps.sessions() as s:
        op = s.scalars(select(Operation).where(Operation.user_id == u, Operation.kind == "restore")).one()
        record = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == u)).one()
        assert (op.state, record.status) == ("undone", "ready")
    users.delete_user(stand.deps, u)


def provider(base_url: str, superuser_dsn: str) -> EmulatedNeon:
    return EmulatedNeon(superuser_dsn, API_KEY, base_url=base_url, requests_per_minute=60_000,
                        burst=1_000, retry=RetryPolicy(attempts=8, base_delay_s=0.05, max_delay_s=0.4),
                        connect_timeout_s=5)


def workspace_global_uri_of(stand: Stand, user_id: str, workspace: str) -> str:
    deps = stand.deps
    with deps.sessions() as s:
        ws = workspace_ids.find(s, workspace, user_id)
        assert ws is not None and ws.global_uri_sealed
        return deps.open(ws.global_uri_sealed, "workspaces", ws.id, "global_uri")


def plan_name(stand: Stand, user_id: str) -> str:
    with stand.deps.sessions() as s:
        return s.scalars(select(UserGlobalDatabase.database_name).where(UserGlobalDatabase.user_id == user_id)).one()

