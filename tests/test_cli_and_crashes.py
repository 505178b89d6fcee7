"""The real ``agentpg`` command: its output, its errors, and ``reconcile`` after a crash at every step."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import run_cli
from helpers import agent_db_uri, global_uri, workspace_global_uri
from sqlalchemy import select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import Operation, User, Workspace

CRASHED = 86  # LifecycleDeps.reached() exits with this, as abruptly as a SIGKILL


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def apg_names(admin: psycopg.Connection) -> tuple[set[str], set[str]]:
    dbs = {r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'apg\\_%'")}
    roles = {r[0] for r in admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'apg\\_%'")}
    return dbs, roles


def test_cli_round_trip_with_json_and_no_secrets(runtime: Runtime, agentpg_home: Path) -> None:
    u, w = uid("cli"), uid("w")
    created = run_cli(agentpg_home, "users", "create", u, "--email", "cli@example.com", "--json")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["id"] == u and body["global_database"]["status"] == "ready"
    ws = run_cli(agentpg_home, "workspaces", "create", u, w, "--name", "Research agent")
    assert ws.returncode == 0 and f"workspace {w}" in ws.stdout
    listed = json.loads(run_cli(agentpg_home, "workspaces", "list", u, "--json").stdout)
    assert [x["id"] for x in listed] == [w]
    users = run_cli(agentpg_home, "users", "list")
    assert u in users.stdout
    status = json.loads(run_cli(agentpg_home, "status", "--json").stdout)
    assert status["postgres"] == "embedded" and status["postgres_version"].startswith("18")
    secrets = [global_uri(runtime, u), agent_db_uri(runtime, w), workspace_global_uri(runtime, w)]
    printed = created.stdout + created.stderr + ws.stdout + ws.stderr + users.stdout + json.dumps(status)
    for uri in secrets:
        password = uri.split(":")[2].split("@")[0]
        assert password not in printed and uri not in printed
    assert run_cli(agentpg_home, "workspaces", "delete", w).returncode == 0
    assert run_cli(agentpg_home, "users", "delete", u).returncode == 0


@pytest.mark.parametrize(("args", "message"), [
    (("users", "create", ""), "1 to 128 characters"),
    (("users", "create", "bad id"), "1 to 128 characters"),
    (("users", "create", "x" * 200), "1 to 128 characters"),
    (("users", "create", "ok-id", "--email", "not-an-email"), "email must look like"),
    (("users", "delete", "nobody-here"), "does not exist"),
    (("workspaces", "create", "nobody-here", "w1"), "does not exist"),
    (("workspaces", "delete", "no-such-workspace"), "does not exist"),
    (("workspaces", "list", "nobody-here"), "does not exist"),
])
def test_cli_refuses_bad_input_clearly(runtime: Runtime, agentpg_home: Path, args: tuple[str, ...],
                                       message: str) -> None:
    with runtime.service.deps.sessions() as s:
        users_before = s.scalars(select(User.id)).all()
    result = run_cli(agentpg_home, *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    with runtime.service.deps.sessions() as s:
        assert s.scalars(select(User.id)).all() == users_before


def test_cli_duplicate_user_is_a_conflict(runtime: Runtime, agentpg_home: Path) -> None:
    u = uid("dup")
    runtime.service.register_user(u)
    result = run_cli(agentpg_home, "users", "create", u)
    assert result.returncode == 1 and "already exists" in result.stderr
    runtime.service.delete_user(u)


def test_cli_says_clearly_when_postgres_is_down(agentpg_home: Path, tmp_path: Path) -> None:
    result = run_cli(tmp_path, "users", "list",
                     env={"AGENTPG_POSTGRES_URL": "postgresql://agentpg:secret-pw@127.0.0.1:1/postgres"})
    assert result.returncode == 3
    assert "cannot be reached" in result.stderr and "Traceback" not in result.stderr
    assert "secret-pw" not in result.stderr + result.stdout


def _settle_with_reconcile(home: Path) -> dict[str, object]:
    result = run_cli(home, "reconcile", "--json")
    assert "Traceback" not in result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


@pytest.mark.parametrize("point", ["register_user:intent", "register_user:provisioned"])
def test_crash_during_registration_is_undone_by_reconcile(runtime: Runtime, admin: psycopg.Connection,
                                                          agentpg_home: Path, point: str) -> None:
    before = apg_names(admin)
    u = uid("crash")
    crashed = run_cli(agentpg_home, "users", "create", u, env={"AGENTPG_CRASHPOINT": point})
    assert crashed.returncode == CRASHED
    report = _settle_with_reconcile(agentpg_home)
    assert report["clean"] is True and len(report["undone"]) == 1  # type: ignore[arg-type]
    assert apg_names(admin) == before
    with runtime.service.deps.sessions() as s:
        assert s.get(User, u) is None
        assert s.scalars(select(Operation.state).where(Operation.user_id == u)).all() == ["undone"]
    runtime.service.register_user(u)  # the id is free again
    runtime.service.delete_user(u)


@pytest.mark.parametrize("point", ["create_workspace:intent", "create_workspace:agent_db"])
def test_crash_during_workspace_creation_is_undone(runtime: Runtime, admin: psycopg.Connection,
                                                   agentpg_home: Path, point: str) -> None:
    u, w = uid("crash"), uid("w")
    runtime.service.register_user(u)
    before = apg_names(admin)
    crashed = run_cli(agentpg_home, "workspaces", "create", u, w, env={"AGENTPG_CRASHPOINT": point})
    assert crashed.returncode == CRASHED
    report = _settle_with_reconcile(agentpg_home)
    assert report["clean"] is True and len(report["undone"]) == 1  # type: ignore[arg-type]
    assert apg_names(admin) == before
    with runtime.service.deps.sessions() as s:
        assert s.get(Workspace, w) is None
    runtime.service.delete_user(u)


@pytest.mark.parametrize(("command", "point"), [
    ("users", "delete_user:intent"), ("users", "delete_user:first_drop"),
    ("workspaces", "delete_workspace:intent"),
])
def test_crash_during_deletion_is_finished_by_reconcile(runtime: Runtime, admin: psycopg.Connection,
                                                        agentpg_home: Path, command: str, point: str) -> None:
    before = apg_names(admin)
    u, w = uid("crash"), uid("w")
    runtime.service.register_user(u)
    runtime.service.create_workspace(u, w)
    runtime.service.create_workspace(u, uid("w"))
    target = u if command == "users" else w
    crashed = run_cli(agentpg_home, command, "delete", target, env={"AGENTPG_CRASHPOINT": point})
    assert crashed.returncode == CRASHED
    report = _settle_with_reconcile(agentpg_home)
    assert report["clean"] is True and len(report["finished"]) == 1  # type: ignore[arg-type]
    with runtime.service.deps.sessions() as s:
        assert s.get(Workspace, w) is None
    if command == "users":
        assert apg_names(admin) == before
    else:
        runtime.service.delete_user(u)
        assert apg_names(admin) == before


def test_reconcile_reports_and_fixes_orphans(runtime: Runtime, admin: psycopg.Connection,
                                             agentpg_home: Path) -> None:
    admin.execute("CREATE ROLE apg_orphan_role_test NOLOGIN")
    admin.execute("CREATE DATABASE apg_orphan_db_test")
    report = run_cli(agentpg_home, "reconcile")
    assert report.returncode == 1
    assert "orphan database: apg_orphan_db_test" in report.stdout and "reconcile --fix" in report.stdout
    fixed = run_cli(agentpg_home, "reconcile", "--fix", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert set(json.loads(fixed.stdout)["dropped"]) >= {"apg_orphan_db_test", "apg_orphan_role_test"}
    dbs, roles = apg_names(admin)
    assert "apg_orphan_db_test" not in dbs and "apg_orphan_role_test" not in roles
