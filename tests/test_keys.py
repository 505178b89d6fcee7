"""Master-key rotation (`agentpg keys rotate` / `keys status`) against the real embedded server.

The session shares one AGENTPG_HOME, key file and catalog with every other test module, and the session's
``runtime`` holds a key ring loaded at start: after each rotation here that ring must still open and seal
(it follows the key file), which is what lets the modules that run after this one keep passing.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import run_cli
from helpers import agent_db_uri, env_value, global_uri, workspace_global_uri
from psycopg import sql
from pydantic import SecretStr
from sqlalchemy import select, text

from agentpg.app.runtime import Runtime, open_runtime
from agentpg.catalog.models import Base, EnvVar, UserGlobalDatabase, new_id
from agentpg.crypto import (
    KeyFile,
    KeyRing,
    SealContext,
    env_key_id,
    key_id_of,
    keyring_from_secret,
    load_or_create_keyring,
)
from agentpg.errors import SecretError
from agentpg.lifecycle.keys import _ROTATION_LOCK_KEY, SEALED_COLUMNS, rotate_keys
from agentpg.settings import Settings

CRASHED = 86  # LifecycleDeps.reached() exits with this, as abruptly as a SIGKILL

Secrets = dict[tuple[str, str, str], str]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def key_file(home: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((home / "secret.key").read_text())
    return data


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sealed_values(rt: Runtime) -> dict[tuple[str, str, str], str]:
    """Every sealed value in the catalog, by (table, row id, field), as stored."""
    found: dict[tuple[str, str, str], str] = {}
    with rt.engine.connect() as conn:
        for spec in SEALED_COLUMNS:
            t = spec.table
            col = t.c[spec.column]
            for row_id, value in conn.execute(select(t.c.id, col).where(col.is_not(None), col != "")):
                found[(spec.aad_table, str(row_id), spec.aad_field)] = value
    return found


def open_all(rt: Runtime, ring: KeyRing) -> Secrets:
    """Open every sealed value of the catalog with ``ring`` (raises if any does not open)."""
    return {where: ring.open(value, SealContext(*where)) for where, value in sealed_values(rt).items()}


def key_ids_in_use(rt: Runtime) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in sealed_values(rt).values():
        counts[key_id_of(value)] = counts.get(key_id_of(value), 0) + 1
    return counts


def assert_nothing_leaked(output: str, secrets: Secrets, *rings: dict[str, Any]) -> None:
    for plaintext in secrets.values():
        assert plaintext not in output
    for ring in rings:
        for material in ring["keys"].values():
            assert material not in output


@pytest.fixture()
def tenants(runtime: Runtime) -> Iterator[list[str]]:
    """Two users with workspaces, plus a few env vars written straight into the catalog."""
    svc, deps = runtime.service, runtime.service.deps
    users = [uid("keys"), uid("keys")]
    for n, u in enumerate(users):
        svc.register_user(u)
        svc.create_workspace(u, f"{u}-w{n}")
        with deps.sessions.begin() as s:
            for i in range(3):
                var_id = new_id()
                s.add(EnvVar(id=var_id, user_id=u, name=f"API_TOKEN_{i}", managed=False,
                             value_sealed=deps.seal(f"tok-{uuid.uuid4().hex}", "env_vars", var_id, "value")))
    yield users
    for u in users:
        svc.delete_user(u)


def secrets_via_helpers(rt: Runtime, users: list[str]) -> list[str]:
    out = []
    for n, u in enumerate(users):
        w = f"{u}-w{n}"
        out += [global_uri(rt, u), agent_db_uri(rt, w), workspace_global_uri(rt, w),
                env_value(rt, u, "GLOBAL_DB_URL"), env_value(rt, u, "API_TOKEN_1")]
    return out


# -- the ring and its file, without a database -------------------------------------------------------


def test_registry_names_every_sealed_column() -> None:
    """A sealed column added to the models without a line in SEALED_COLUMNS would never be rotated."""
    sealed = {(t.name, c.name) for t in Base.metadata.sorted_tables for c in t.columns if c.name.endswith("_sealed")}
    assert sealed == {(spec.table.name, spec.column) for spec in SEALED_COLUMNS}


def test_a_ring_follows_its_key_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    serve = load_or_create_keyring(path)  # a long-running process, loaded before the rotation
    late = load_or_create_keyring(path)
    assert mode(path) == 0o600 and serve.file == KeyFile(path)
    where = SealContext("env_vars", "row-1", "value")
    old_kid = serve.active
    sealed_old = serve.seal("first", where)

    rotated = KeyFile(path).parse().with_new_key()  # what `keys rotate` writes, seen from another process
    KeyFile(path).write(rotated)
    assert mode(path) == 0o600 and set(os.listdir(tmp_path)) == {"secret.key"}
    sealed_new = rotated.seal("second", where)

    assert serve.open(sealed_new, where) == "second"  # unknown key id: the file is read again
    assert serve.active == rotated.active
    assert key_id_of(late.seal("third", where)) == rotated.active  # sealing checks the file first
    assert serve.open(sealed_old, where) == "first"

    KeyFile(path).write(rotated.only({rotated.active}))  # the old key retired
    assert serve.open(sealed_old, where) == "first"  # a running process keeps the keys it has seen
    with pytest.raises(SecretError, match="not in the key ring"):
        load_or_create_keyring(path).open(sealed_old, where)
    assert old_kid not in json.loads(path.read_text())["keys"]
    material = json.loads(path.read_text())["keys"][rotated.active]
    assert material not in repr(serve) and material not in repr(rotated)


def test_secret_key_env_may_list_several_keys() -> None:
    new, old = os.urandom(32), os.urandom(32)
    b_new, b_old = base64.b64encode(new).decode(), base64.urlsafe_b64encode(old).decode().rstrip("=")
    where = SealContext("workspaces", "w", "global_uri")
    sealed = keyring_from_secret(b_old).seal("secret", where)
    ring = keyring_from_secret(f" {b_new} , {b_old},")
    assert ring.active == env_key_id(new) and set(ring.keys) == {env_key_id(new), env_key_id(old)}
    assert ring.open(sealed, where) == "secret"
    assert key_id_of(ring.seal("x", where)) == env_key_id(new)
    assert keyring_from_secret(f"{b_old},{b_new}").active == env_key_id(old)  # ids do not depend on order
    for bad in ("", " , ", "not-base64!!", base64.b64encode(b"short").decode(), f"{b_new},nope"):
        with pytest.raises(SecretError) as info:
            keyring_from_secret(bad)
        assert b_new not in info.value.message


# -- rotation through the real CLI -------------------------------------------------------------------


def test_rotate_reseals_every_secret_and_retires_the_old_key(runtime: Runtime, agentpg_home: Path,
                                                            tenants: list[str]) -> None:
    before_ring = key_file(agentpg_home)
    old = before_ring["active"]
    assert list(before_ring["keys"]) == [old]
    before = open_all(runtime, runtime.keyring)
    via_helpers = secrets_via_helpers(runtime, tenants)
    total = len(before)
    assert total >= 2 * 8 and key_ids_in_use(runtime) == {old: total}

    status = run_cli(agentpg_home, "keys", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["keys"] == [{"id": old, "active": True, "values": total}]

    result = run_cli(agentpg_home, "keys", "rotate", "--batch-size", "3", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    new = report["active"]
    assert new != old and report["added"] == new and report["resumed"] is False
    assert report["retired"] == [old] and report["clean"] is True
    assert report["resealed"] == total and report["batches"] >= total // 3

    after_ring = key_file(agentpg_home)
    assert after_ring["active"] == new and list(after_ring["keys"]) == [new]
    assert mode(agentpg_home / "secret.key") == 0o600
    assert not [p for p in os.listdir(agentpg_home) if p.startswith(".secret.key")]
    assert key_ids_in_use(runtime) == {new: total}

    # The session's ring was loaded before the rotation: it seals under the new key without being told...
    extra = uid("keys")
    runtime.service.register_user(extra)
    with runtime.service.deps.sessions() as s:
        rec = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == extra)).one()
        assert rec.connection_uri_sealed and key_id_of(rec.connection_uri_sealed) == new
    runtime.service.delete_user(extra)
    # ...and opens every value, as does a ring read fresh from the file (a process started now).
    assert open_all(runtime, runtime.keyring) == before
    assert open_all(runtime, KeyFile(agentpg_home / "secret.key").parse()) == before
    assert secrets_via_helpers(runtime, tenants) == via_helpers

    human = run_cli(agentpg_home, "keys", "status")
    assert human.returncode == 0 and new in human.stdout and old not in human.stdout
    assert_nothing_leaked(status.stdout + status.stderr + result.stdout + result.stderr + human.stdout
                          + human.stderr, before, before_ring, after_ring)


@pytest.mark.parametrize("point", ["keys_rotate:ring_written", "keys_rotate:batch"])
def test_interrupted_rotation_keeps_every_secret_and_resumes(runtime: Runtime, agentpg_home: Path,
                                                            tenants: list[str], point: str) -> None:
    old = key_file(agentpg_home)["active"]
    before = open_all(runtime, runtime.keyring)
    total = len(before)

    crashed = run_cli(agentpg_home, "keys", "rotate", "--batch-size", "1", env={"AGENTPG_CRASHPOINT": point})
    assert crashed.returncode == CRASHED, crashed.stdout + crashed.stderr
    ring = key_file(agentpg_home)
    new = ring["active"]
    assert new != old and set(ring["keys"]) == {old, new}  # both keys, durably, before any re-seal
    assert mode(agentpg_home / "secret.key") == 0o600
    moved = 1 if point == "keys_rotate:batch" else 0
    assert key_ids_in_use(runtime) == {k: n for k, n in {old: total - moved, new: moved}.items() if n}

    # Every secret opens with the ring on disk (what any process starting now reads) and the session's ring.
    assert open_all(runtime, KeyFile(agentpg_home / "secret.key").parse()) == before
    assert open_all(runtime, runtime.keyring) == before
    status = json.loads(run_cli(agentpg_home, "keys", "status", "--json").stdout)
    assert status["rotation_pending"] is True and status["active"] == new
    assert {k["id"]: k["values"] for k in status["keys"]} == {new: moved, old: total - moved}

    resumed = run_cli(agentpg_home, "keys", "rotate", "--batch-size", "2", "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed"] is True and report["added"] is None and report["active"] == new
    assert report["retired"] == [old] and report["resealed"] == total - moved
    ring_after = key_file(agentpg_home)
    assert list(ring_after["keys"]) == [new] and mode(agentpg_home / "secret.key") == 0o600
    assert key_ids_in_use(runtime) == {new: total}
    assert open_all(runtime, KeyFile(agentpg_home / "secret.key").parse()) == before
    assert open_all(runtime, runtime.keyring) == before
    assert_nothing_leaked(crashed.stdout + crashed.stderr + resumed.stdout + resumed.stderr, before, ring,
                          ring_after)


def test_a_value_that_does_not_open_keeps_its_key(runtime: Runtime, agentpg_home: Path,
                                                 tenants: list[str]) -> None:
    """The old key is retired only when no value uses it, even a value that cannot be re-sealed."""
    deps = runtime.service.deps
    old = key_file(agentpg_home)["active"]
    moved_id = new_id()
    with deps.sessions.begin() as s:  # a ciphertext copied from another row: it never opens here
        donor = s.scalars(select(EnvVar).where(EnvVar.user_id == tenants[0], EnvVar.name == "API_TOKEN_0")).one()
        s.add(EnvVar(id=moved_id, user_id=tenants[0], name="MOVED", value_sealed=donor.value_sealed))
    result = run_cli(agentpg_home, "keys", "rotate")
    assert result.returncode == 1
    assert f"kept master key {old}: 1 value(s) still use it" in result.stdout
    assert f"env_vars/{moved_id}/value" in result.stdout
    assert set(key_file(agentpg_home)["keys"]) == {old, key_file(agentpg_home)["active"]}

    with deps.sessions.begin() as s:
        s.delete(s.get_one(EnvVar, moved_id))
    again = run_cli(agentpg_home, "keys", "rotate", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)["retired"] == [old] and json.loads(again.stdout)["resumed"] is True
    open_all(runtime, runtime.keyring)


def test_old_key_stays_while_an_older_transaction_is_open(runtime: Runtime, agentpg_home: Path,
                                                          tenants: list[str]) -> None:
    """A transaction open when the new key was written may have sealed under the old one: wait for it."""
    deps = runtime.service.deps
    old = key_file(agentpg_home)["active"]
    with runtime.engine.connect() as writer:
        writer.execute(text("SELECT 1"))  # a writer's transaction, still open
        report = rotate_keys(deps, settle_timeout_s=1.0, poll_s=0.1)
        writer.rollback()
    assert report.settled is False and report.clean is False and report.retired == [] and old in report.kept
    assert set(key_file(agentpg_home)["keys"]) == {old, report.active}
    finished = rotate_keys(deps)
    assert finished.resumed and finished.retired == [old] and finished.clean
    assert list(key_file(agentpg_home)["keys"]) == [report.active] == [runtime.keyring.active]
    open_all(runtime, runtime.keyring)


def test_one_rotation_at_a_time(runtime: Runtime, agentpg_home: Path) -> None:
    ring = (agentpg_home / "secret.key").read_text()
    with runtime.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _ROTATION_LOCK_KEY})
        try:
            result = run_cli(agentpg_home, "keys", "rotate")
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _ROTATION_LOCK_KEY})
    assert result.returncode == 1 and "another `agentpg keys rotate` is running" in result.stderr
    assert (agentpg_home / "secret.key").read_text() == ring
    assert run_cli(agentpg_home, "keys", "rotate", "--batch-size", "0").returncode == 2


def test_rotation_with_keys_from_the_environment(runtime: Runtime, agentpg_home: Path,
                                                 admin: psycopg.Connection) -> None:
    """AGENTPG_SECRET_KEY: agentpg refuses to invent a key, re-seals under the first one listed, and says
    when the old one can go. Uses its own catalog database so the session's values stay under the file."""
    old, new = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()
    catalog = f"agentpg_keys_{uuid.uuid4().hex[:8]}"
    u, w = uid("envkeys"), uid("w")

    def cli(key: str, *args: str) -> Any:
        return run_cli(agentpg_home, *args, env={"AGENTPG_SECRET_KEY": key, "AGENTPG_CATALOG_DATABASE": catalog})

    try:
        assert cli(old, "users", "create", u).returncode == 0
        assert cli(old, "workspaces", "create", u, w).returncode == 0
        refused = cli(old, "keys", "rotate")
        assert refused.returncode == 1 and "AGENTPG_SECRET_KEY=NEW,OLD" in refused.stderr
        assert old not in refused.stderr + refused.stdout

        rotated = cli(f"{new},{old}", "keys", "rotate", "--json")
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        report = json.loads(rotated.stdout)
        new_id_, old_id = env_key_id(base64.b64decode(new)), env_key_id(base64.b64decode(old))
        assert report["source"] == "env" and report["active"] == new_id_ and report["resealed"] == 5
        assert report["removable"] == [old_id] and report["retired"] == [] and report["clean"] is True
        assert new_id_ not in (agentpg_home / "secret.key").read_text()

        status = cli(new, "keys", "status", "--json")
        assert json.loads(status.stdout)["keys"] == [{"id": new_id_, "active": True, "values": 5}]
        settings = Settings(home=agentpg_home, embedded_fsync=False, catalog_database=catalog,
                            secret_key=SecretStr(new))
        with open_runtime(settings) as rt:  # the old key is gone from the ring: everything opens anyway
            uris = [global_uri(rt, u), agent_db_uri(rt, w), workspace_global_uri(rt, w)]
            assert all(uri.startswith("postgresql://") for uri in uris)
            assert env_value(rt, u, "AGENT_DB_URL", w) == uris[1]
        for out in (rotated.stdout, rotated.stderr, status.stdout):
            assert old not in out and new not in out and not any(uri in out for uri in uris)
    finally:
        cli(new, "users", "delete", u)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(catalog)))
