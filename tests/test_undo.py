"""Undo end to end (issue 19): an agent drops a table and deletes rows through MCP; the user restores to the
checkpoint, to a time, and to just before the audited DROP, in place and as a copy; another user's agent
keeps writing on the same server meanwhile and never sees an error; a crash mid-restore leaves the
database as before or restored, and reconcile settles it.

A private home: its own embedded server (fsync off, full_page_writes on) archived by a real ``serve`` run
in this process (uvicorn), so the suite's shared server is not archived.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from mcp_support import archived_server, http_session, ok, refused, uid

from agentpg.app.runtime import admin_token
from agentpg.embedded import EmbeddedPostgres
from agentpg.settings import Settings

pytestmark = pytest.mark.anyio


@dataclass
class World:
    settings: Settings
    url: str
    admin: dict[str, str]
    user: str
    workspace: str
    token: str
    other_user: str
    other_token: str

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.admin, timeout=120)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with archived_server("agentpg-undo-") as (settings, url, api):
        admin = {"Authorization": f"Bearer {admin_token(settings)}"}
        user, other = uid("undo"), uid("bystander")
        tokens = {}
        for who in (user, other):
            assert api.post("/api/users", json={"id": who}).status_code == 201
            created = api.post(f"/api/users/{who}/workspaces", json={"id": "agent"})
            assert created.status_code == 201, created.text
            tokens[who] = created.json()["agent_token"]["token"]
        # The agent that makes the mistakes may drop tables (a co-owner of the global database).
        answer = api.put(f"/api/users/{user}/workspaces/agent/global-database-permissions",
                         json={"can_read": True, "can_write": True, "can_create_tables": True,
                               "can_drop_tables": True})
        assert answer.status_code == 200, answer.text
        yield World(settings, url, admin, user, "agent", tokens[user], other, tokens[other])


async def rows(session: Any, database: str, sql: str) -> list[list[Any]]:
    return list((await ok(session, "query", database=database, sql=sql))["rows"])


class Bystander:
    """Another user's agent writing to its global database on the same server, the whole time."""

    def __init__(self, world: World) -> None:
        self.world, self.written, self.errors = world, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with http_session(self.world.url, self.world.other_token) as s:
            await ok(s, "execute", database="global", sql="CREATE TABLE IF NOT EXISTS log (n int PRIMARY KEY)")
            while not self._stop.is_set():
                result = await s.call_tool("execute", {"database": "global", "sql": "INSERT INTO log VALUES ($1)",
                                                       "params": [self.written + 1]})
                if result.is_error:
                    self.errors.append(str(result.content))
                else:
                    self.written += 1
                await asyncio.sleep(0.02)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


async def test_an_agents_mistakes_are_undone(world: World) -> None:
    user = world.user
    with Bystander(world) as bystander, world.api() as api:
        async with http_session(world.url, world.token) as s:
            await ok(s, "execute", database="global", sql="CREATE TABLE customers (id int PRIMARY KEY, name text)")
            await ok(s, "execute", database="global",
                     sql="INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 50) g")
            made = (await ok(s, "checkpoint", database="global", name="before cleanup"))["checkpoints"]
            assert made[0]["name"] == "before cleanup" and made[0]["created_by"] == "agent agent"

            # The mistakes: rows deleted, then the table dropped.
            await ok(s, "execute", database="global", sql="DELETE FROM customers WHERE id > 10")
            after_delete = datetime.now(UTC)
            await asyncio.sleep(0.3)
            await ok(s, "execute", database="global", sql="DROP TABLE customers")
            await asyncio.sleep(0.5)  # the audit log is written behind
            audit = api.get(f"/api/users/{user}/audit", params={"limit": 20}).json()["items"]
            drop = next(e for e in audit if e["statement"] and e["statement"].startswith("DROP TABLE"))

            # 1. To the checkpoint, in place: all 50 rows.
            listed = api.get(f"/api/users/{user}/global-database/checkpoints").json()["items"]
            assert [c["id"] for c in listed] == [made[0]["id"]]
            answer = api.post(f"/api/users/{user}/global-database/restore", json={"checkpoint_id": made[0]["id"]})
            assert answer.status_code == 200, answer.text
            undo_id = answer.json()["undo_checkpoint_id"]
            assert await rows(s, "global", "SELECT count(*) FROM customers") == [[50]]

            # 2. The restore is itself undoable: back to just before it (no table).
            answer = api.post(f"/api/users/{user}/global-database/restore", json={"checkpoint_id": undo_id})
            assert answer.status_code == 200, answer.text
            assert await rows(s, "global", "SELECT to_regclass('customers')::text") == [[None]]

            # 3. To a time: after the DELETE, before the DROP: 10 rows.
            answer = api.post(f"/api/users/{user}/global-database/restore", json={"at": after_delete.isoformat()})
            assert answer.status_code == 200, answer.text
            assert await rows(s, "global", "SELECT count(*) FROM customers") == [[10]]

            # 4. Just before the audited DROP, as a copy to inspect first.
            answer = api.post(f"/api/users/{user}/global-database/restore",
                              json={"before_audit_id": drop["id"], "mode": "new"})
            assert answer.status_code == 201, answer.text
            copy = answer.json()["restored_copy"]
            assert [c["id"] for c in api.get(f"/api/users/{user}/restored-copies").json()["items"]] == [copy["id"]]
            tables = api.get(f"/api/users/{user}/restored-copies/{copy['id']}/tables").json()
            assert [t["name"] for t in tables["tables"]] == ["customers"]
            page = api.post(f"/api/users/{user}/restored-copies/{copy['id']}/query",
                            json={"table": "customers", "limit": 100}).json()
            assert len(page["rows"]) == 10
            assert api.delete(f"/api/users/{user}/restored-copies/{copy['id']}").status_code == 204
            assert api.get(f"/api/users/{user}/restored-copies").json()["items"] == []

            # The agent's grants hold on the restored database: it writes as before.
            await ok(s, "execute", database="global", sql="INSERT INTO customers VALUES (99, 'new')")
    assert bystander.errors == [] and bystander.written > 0
    async with http_session(world.url, world.other_token) as other:
        assert await rows(other, "global", "SELECT count(*) FROM log") == [[bystander.written]]


async def test_an_agent_restores_its_own_database_only(world: World) -> None:
    async with http_session(world.url, world.token) as s:
        await ok(s, "execute", database="agent", sql="CREATE TABLE notes (n int)")
        await ok(s, "execute", database="agent", sql="INSERT INTO notes VALUES (1), (2)")
        cp = (await ok(s, "checkpoint", database="agent"))["checkpoints"][0]
        await ok(s, "execute", database="agent", sql="TRUNCATE notes")
        restored = await ok(s, "restore", checkpoint_id=cp["id"])
        assert restored["status"] == "restored"
        assert await rows(s, "agent", "SELECT count(*) FROM notes") == [[2]]
        # The global database is the user's to restore, not one agent's: a global checkpoint is not its own.
        global_cp = (await ok(s, "checkpoint", database="global"))["checkpoints"][0]
        message = await refused(s, "restore", checkpoint_id=global_cp["id"])
        assert "does not exist" in message
        both = (await ok(s, "checkpoint", database="both", name="run 1"))["checkpoints"]
        assert {c["database"] for c in both} == {"global", "agent"} and len({c["run_id"] for c in both}) == 1


def test_bad_restore_requests_get_clear_answers(world: World) -> None:
    user = world.user
    with world.api() as api:
        for body, words in (({}, "exactly one"), ({"checkpoint_id": "x", "at": "2026-01-01T00:00:00Z"}, "exactly one"),
                            ({"checkpoint_id": "nope"}, "does not exist"),
                            ({"at": "2999-01-01T00:00:00Z"}, "future"),
                            ({"at": "2000-01-01T00:00:00Z"}, "oldest restorable point"),
                            ({"before_audit_id": 999999999}, "not a statement")):
            answer = api.post(f"/api/users/{user}/global-database/restore", json=body)
            assert 400 <= answer.status_code < 500, (body, answer.status_code, answer.text)
            assert words in answer.text, (body, answer.text)
        assert api.get(f"/api/users/{user}/global-database").json()["status"] == "ready"
        other = api.post(f"/api/users/{user}/restored-copies/{uid('c')}/query", json={"table": "x"})
        assert other.status_code == 404


def _cli(world: World, *args: str, crashpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPG_")}
    env.update(AGENTPG_HOME=str(world.settings.home), AGENTPG_WARM_POOL_SIZE="0", AGENTPG_USAGE_SYNC_INTERVAL_S="0",
               AGENTPG_EMBEDDED_FSYNC="false")
    if crashpoint:
        env["AGENTPG_CRASHPOINT"] = crashpoint
    return subprocess.run([str(Path(sys.executable).with_name("agentpg")), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


@pytest.mark.parametrize("crashpoint", ["restore.restored", "restore.replacing"])
async def test_a_crash_mid_restore_leaves_before_or_after_never_half(world: World, crashpoint: str) -> None:
    """The CLI dies at a step; then the database is either as before (not yet swapped) or restored (the swap
    began), and ``agentpg reconcile`` settles the operation: nothing left half-done, no orphan database."""
    async with http_session(world.url, world.token) as s:
        await ok(s, "execute", database="agent", sql=f"CREATE TABLE crash_{crashpoint[8:]} (n int)")
        cp = (await ok(s, "checkpoint", database="agent"))["checkpoints"][0]
        await ok(s, "execute", database="agent", sql=f"INSERT INTO crash_{crashpoint[8:]} VALUES (1)")
    died = _cli(world, "restore", world.user, "--workspace", world.workspace, "--checkpoint", cp["id"],
                crashpoint=crashpoint)
    assert died.returncode == 86, died.stderr
    settled = _cli(world, "reconcile", "--json")
    assert settled.returncode == 0, settled.stdout + settled.stderr
    async with http_session(world.url, world.token) as s:
        count = await rows(s, "agent", f"SELECT count(*) FROM crash_{crashpoint[8:]}")
    assert count == ([[0]] if crashpoint == "restore.replacing" else [[1]])
    with world.api() as api:
        workspace = api.get(f"/api/users/{world.user}/workspaces/{world.workspace}").json()
        assert workspace["database"]["status"] == "ready", workspace


def test_the_whole_server_comes_back_from_the_backup_directory_alone(world: World, tmp_path: Path) -> None:
    """Disaster recovery: a fresh home, one command, every user back (catalog and tenants), to the latest
    archived point: the bystander's last committed write included."""
    with world.api() as api:
        assert api.put(f"/api/users/{world.user}/env/MARKER", json={"value": "kept"}).status_code in (200, 201)
    time.sleep(1.5)  # the asynchronous archive is well under a second behind
    backup_copy = tmp_path / "backup"
    shutil.copytree(world.settings.home / "backup", backup_copy)  # as if restored from another disk
    fresh = Path(tempfile.mkdtemp(prefix="agentpg-dr-", dir="/tmp")) / "home"
    fresh.parent.chmod(0o711)
    env_home = World(Settings(home=fresh, backup_enabled=False), world.url, world.admin, world.user, world.workspace,
                     world.token, world.other_user, world.other_token)
    try:
        done = _cli(env_home, "recover", "--from", str(backup_copy), "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        listed = _cli(env_home, "users", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {world.user, world.other_user} <= {u["id"] for u in json.loads(listed.stdout)}
        workspaces = _cli(env_home, "workspaces", "list", world.user, "--json")
        assert world.workspace in workspaces.stdout
        # A tenant's own data is back too: the bystander's log, up to its last acknowledged write.
        names = {u["id"]: u["global_database"]["name"] for u in json.loads(listed.stdout)}
        admin_dsn = EmbeddedPostgres(fresh).ensure_running().dsn(names[world.other_user])
        with psycopg.connect(admin_dsn) as conn:
            assert conn.execute("SELECT count(*) > 0, count(*) = max(n) FROM log").fetchone() == (True, True)
    finally:
        _cli(env_home, "postgres", "stop")
        shutil.rmtree(fresh.parent, ignore_errors=True)
