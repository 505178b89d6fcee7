"""Issue 19, the rest of it: backup storage priced into a user's usage, and a long restore answered 202.

A private home: its own embedded server (fsync off) archived by a real ``serve`` run in this process
(uvicorn) with ``AGENTPG_RESTORE_WAIT_S=0`` (every restore answers 202) and a backup price high enough
that seconds of backup storage cost whole cents; a second runtime on the same home (as the CLI would
open) runs the usage sync and reaches the catalog.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from mcp_support import PROCESS_INVALIDATION, live_server, uid
from sqlalchemy import text

from agentpg.app.runtime import Runtime, admin_token, open_runtime
from agentpg.embedded import EmbeddedPostgres
from agentpg.settings import Settings
from agentpg.usage.backups import Sized, attribute


@dataclass
class World:
    url: str
    runtime: Runtime

    def api(self, token: str | None = None) -> httpx.Client:
        secret = token or admin_token(self.runtime.settings)
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {secret}"}, timeout=120)

    def user(self, api: httpx.Client) -> str:
        user = uid("u")
        assert api.post("/api/users", json={"id": user}).status_code == 201
        return user

    def write(self, user: str, *statements: str) -> None:
        with psycopg.connect(self.runtime.service.uris.platform(user), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)

    def count(self, user: str) -> Any:
        with psycopg.connect(self.runtime.service.uris.platform(user)) as conn:
            row = conn.execute("SELECT count(*) FROM t").fetchone()
        return row[0] if row else None


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    home = Path(tempfile.mkdtemp(prefix="agentpg-undo-async-", dir="/tmp"))
    home.chmod(0o711)
    settings = Settings(home=home, embedded_fsync=False, warm_pool_size=0, usage_sync_interval_s=0,
                        user_storage_check_interval_s=0, backup_enabled=True, restore_wait_s=0,
                        price_backup_cents_per_gb_month=1e9)
    try:
        with live_server(settings) as url, open_runtime(settings, invalidation=PROCESS_INVALIDATION) as runtime:
            world = World(url, runtime)
            with world.api() as api:
                deadline = time.monotonic() + 120
                while not all(s["protected"] for s in api.get("/api/backups").json()):
                    assert time.monotonic() < deadline, api.get("/api/backups").json()
                    time.sleep(0.2)
            yield world
    finally:
        EmbeddedPostgres(home).stop()  # the server outlives serve (a detached daemon): stop it before its files go
        shutil.rmtree(home, ignore_errors=True)


def test_backup_storage_is_priced_into_usage_by_size(world: World) -> None:
    with world.api() as api:
        big, small = world.user(api), world.user(api)
        world.write(big, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 200000) g")
        world.write(small, "CREATE TABLE t (id int)")
        assert api.get("/api/backups").json()[0]["base_backups"] >= 1
        world.runtime.service.sync_usage()
        reports = {who: api.get(f"/api/users/{who}/usage").json() for who in (big, small)}
        for report in reports.values():
            line, part = report["backups"], report["global_database"]
            assert line["bytes"] == part["backup_bytes"] > 0 and line["cost_cents"] == part["backup_cost_cents"] > 0
            assert report["total_cost_cents"] == part["cost_cents"] + line["cost_cents"]
        # The bigger database holds more of the server's base backups: it is attributed more of them.
        assert reports[big]["backups"]["bytes"] > reports[small]["backups"]["bytes"]
        assert reports[big]["global_database"]["storage_bytes"] > reports[small]["global_database"]["storage_bytes"]

        # Backup storage counts against the budget: one just at the backup cost alone is exceeded.
        budget = reports[small]["backups"]["cost_cents"]
        capped = api.put(f"/api/users/{small}/budget", json={"budget_cents": budget})
        assert capped.status_code == 200 and capped.json()["status"] == "exceeded" and capped.json()["read_only"]
        assert api.put(f"/api/users/{small}/budget", json={"budget_cents": None}).json()["read_only"] is False


def test_attribution_adds_up_to_the_servers_bytes() -> None:
    shares = attribute({"a": 1000, "b": 7}, [Sized("x", "a", 3), Sized("y", "a", 1), Sized("z", "a", 2),
                                             Sized("e1", "b", 0), Sized("e2", "b", 0), Sized("n", "c", 50)])
    assert shares["x"] + shares["y"] + shares["z"] == 1000 and shares["x"] > shares["z"] > shares["y"]
    assert shares["e1"] + shares["e2"] == 7 and "n" not in shares  # empty ones split evenly; no backup, no share


def test_a_long_restore_answers_202_and_is_followed_to_its_end(world: World) -> None:
    with world.api() as api:
        user, stranger = world.user(api), world.user(api)
        tokens = {who: api.post(f"/api/users/{who}/tokens", json={}).json()["token"] for who in (user, stranger)}
        world.write(user, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
        checkpoint = api.post(f"/api/users/{user}/global-database/checkpoints", json={"name": "full"}).json()
        world.write(user, "DELETE FROM t WHERE id > 10")
        restore = f"/api/users/{user}/global-database/restore"
        # Errors found before a restore begins are answered as such, never 202.
        assert api.post(restore, json={"checkpoint_id": uid("nope")}).status_code == 404

        # Hold the restore after it began (it first checkpoints the current state) to look at it meanwhile.
        with world.runtime.engine.connect() as catalog:
            catalog.execute(text("LOCK TABLE checkpoints IN EXCLUSIVE MODE"))
            started = api.post(restore, json={"checkpoint_id": checkpoint["id"]})
            assert started.status_code == 202, started.text
            op_id = started.json()["operation_id"]
            assert started.json() == {"operation_id": op_id, "status": "restoring"}
            location = started.headers["location"]
            assert location == f"/api/operations/{op_id}"
            assert api.get(location).json() == {"id": op_id, "kind": "restore", "state": "pending", "error": None,
                                                "result": None}
            with world.api(tokens[user]) as own, world.api(tokens[stranger]) as other:
                assert own.get(location).json()["state"] == "pending"
                assert other.get(location).status_code == 404
            assert api.get(f"/api/users/{user}/global-database").json()["status"] == "restoring"
            assert api.post(restore, json={"checkpoint_id": checkpoint["id"]}).status_code == 409
            catalog.rollback()

        deadline = time.monotonic() + 180
        while (followed := api.get(location).json())["state"] == "pending":
            assert time.monotonic() < deadline, followed
            time.sleep(0.2)
        assert followed["state"] == "done", followed
        assert followed["result"]["mode"] == "in_place" and followed["result"]["undo_checkpoint_id"]
        assert followed["result"]["restored_to"] == {"checkpoint_id": checkpoint["id"]}
        assert world.count(user) == 100
        assert api.get(f"/api/users/{user}/global-database").json()["status"] == "ready"
        for unknown in ("not-an-id", "00000000-0000-0000-0000-000000000000"):
            assert api.get(f"/api/operations/{unknown}").status_code == 404


def test_a_restore_that_fails_after_202_is_undone_and_says_so(world: World) -> None:
    with world.api() as api:
        user = world.user(api)
        world.write(user, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
        checkpoint = api.post(f"/api/users/{user}/global-database/checkpoints", json={}).json()
        world.write(user, "DELETE FROM t WHERE id > 10")
        with world.runtime.engine.connect() as catalog:
            catalog.execute(text("LOCK TABLE checkpoints IN EXCLUSIVE MODE"))
            started = api.post(f"/api/users/{user}/global-database/restore", json={"checkpoint_id": checkpoint["id"]})
            assert started.status_code == 202, started.text
            # The restore waits on the lock to write its undo checkpoint: cut that catalog session off. (In a
            # transaction pg_stat_activity is a snapshot, cleared before each look.)
            deadline = time.monotonic() + 60
            while not catalog.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO checkpoints%'")).all():
                assert time.monotonic() < deadline
                time.sleep(0.05)
                catalog.execute(text("SELECT pg_stat_clear_snapshot()"))
            catalog.rollback()
        location = started.headers["location"]
        deadline = time.monotonic() + 60
        # The cut session was also the one holding the operation's lease: until the rollback, on a new
        # connection, records "undone", the operation may read "failed" (nobody holds it) for a moment.
        while (followed := api.get(location).json())["state"] in ("pending", "failed"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert followed["state"] == "undone" and followed["result"] is None, followed
        assert "catalog database cannot be reached" in followed["error"] and "apg_" not in followed["error"]
        assert world.count(user) == 10  # as it was
        assert api.get(f"/api/users/{user}/global-database").json()["status"] == "ready"
