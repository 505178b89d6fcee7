"""The provisioning core against the real embedded server: databases made, shared, isolated and dropped."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import psycopg
import pytest
from helpers import agent_db_uri, env_value, global_uri, with_database, workspace_global_uri
from sqlalchemy import select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import Operation, User, UserGlobalDatabase
from agentpg.errors import Conflict, InvalidInput, NotFound, ProviderError, SecretError
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.providers.base import DatabasePlan, Provisioned
from agentpg.providers.local import LocalProvider


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def server_names(admin: psycopg.Connection) -> tuple[set[str], set[str]]:
    dbs = {r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'apg\\_%'")}
    roles = {r[0] for r in admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'apg\\_%'")}
    return dbs, roles


def connect_fails(uri: str) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(uri, connect_timeout=5).close()
    return str(info.value)


def test_user_and_two_workspaces_share_global_and_are_isolated(runtime: Runtime, admin: psycopg.Connection) -> None:
    svc = runtime.service
    u1, w1, w2 = uid("u"), uid("w"), uid("w")
    user = svc.register_user(u1, "u1@example.com")
    assert user.global_database is not None and user.global_database.status == "ready"
    ws1 = svc.create_workspace(u1, w1, "first")
    ws2 = svc.create_workspace(u1, w2)
    names = {user.global_database.name, ws1.database.name, ws2.database.name}  # type: ignore[union-attr]
    dbs, _ = server_names(admin)
    assert names <= dbs and len(names) == 3
    for name in names:  # opaque: no user or workspace id shows in pg_database
        assert u1 not in name and w1 not in name and w2 not in name

    # The design's "Agent A creates customers, agent B reads it at once", each with its own role.
    g1, g2 = workspace_global_uri(runtime, w1), workspace_global_uri(runtime, w2)
    assert urlsplit(g1).username != urlsplit(g2).username
    with psycopg.connect(g1, autocommit=True) as a:
        a.execute("CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL)")
        a.execute("INSERT INTO customers (name) VALUES ('ada')")
    with psycopg.connect(g2, autocommit=True) as b:
        assert b.execute("SELECT name FROM customers").fetchall() == [("ada",)]
        b.execute("INSERT INTO customers (name) VALUES ('grace')")
        owner = b.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'customers'").fetchone()
    with psycopg.connect(g1, autocommit=True) as a:
        assert a.execute("SELECT count(*) FROM customers").fetchone() == (2,)
    assert owner is not None and owner[0].endswith("_owner")  # the NOLOGIN owner role, not an agent

    # Isolation, as the attacker: w1's credentials against everything that is not w1's.
    other = uid("u")
    other_user = svc.register_user(other)
    a1 = agent_db_uri(runtime, w1)
    assert env_value(runtime, u1, "AGENT_DB_URL", w1) == a1
    assert env_value(runtime, u1, "GLOBAL_DB_URL") == global_uri(runtime, u1)
    for creds in (a1, g1):
        assert "permission denied" in connect_fails(with_database(creds, ws2.database.name))  # type: ignore[union-attr]
        assert "permission denied" in connect_fails(
            with_database(creds, other_user.global_database.name))  # type: ignore[union-attr]
        assert "permission denied" in connect_fails(with_database(creds, runtime.settings.catalog_database))
        assert "permission denied" in connect_fails(with_database(creds, "postgres"))
    # w1 has full rights in its own agent database, no rights to become anyone else.
    with psycopg.connect(a1, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int)")
        me = conn.execute("SELECT current_user").fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # other tenants' roles are hidden
            conn.execute("SELECT rolname FROM pg_roles")
        attrs = admin.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication, "
                              "rolconnlimit FROM pg_roles WHERE rolname = %s", me).fetchone()
        assert attrs is not None and attrs[:5] == (False,) * 5 and attrs[5] == runtime.settings.tenant_connection_limit
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE EXTENSION dblink")
    with psycopg.connect(agent_db_uri(runtime, w2), autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.orders')").fetchone() == (None,)
    svc.delete_user(u1)
    svc.delete_user(other)


def test_delete_user_drops_every_database_and_role(runtime: Runtime, admin: psycopg.Connection) -> None:
    svc = runtime.service
    before_dbs, before_roles = server_names(admin)
    u = uid("u")
    svc.register_user(u)
    svc.create_workspace(u, uid("w"))
    svc.create_workspace(u, uid("w"))
    during_dbs, during_roles = server_names(admin)
    assert len(during_dbs - before_dbs) == 3
    # owner + login per database, and one agent role per workspace in the global database
    assert len(during_roles - before_roles) == 3 * 2 + 2
    svc.delete_user(u)
    assert server_names(admin) == (before_dbs, before_roles)
    with pytest.raises(NotFound):
        svc.get_user(u)
    with pytest.raises(NotFound):
        svc.delete_user(u)


def test_delete_workspace_drops_its_database_and_its_global_role(runtime: Runtime, admin: psycopg.Connection) -> None:
    svc = runtime.service
    u, w = uid("u"), uid("w")
    svc.register_user(u)
    before = server_names(admin)
    info = svc.create_workspace(u, w)
    role = urlsplit(workspace_global_uri(runtime, w)).username
    svc.delete_workspace(w)
    assert server_names(admin) == before
    assert info.database is not None and info.database.name not in server_names(admin)[0]
    assert role not in server_names(admin)[1]
    with pytest.raises(NotFound):
        svc.get_workspace(w)
    svc.delete_user(u)


class FailAfterCreate(LocalProvider):
    """The real provider, with a failure injected after it has really created the database."""

    def create_database(self, plan: DatabasePlan, login_password: str) -> Provisioned:
        super().create_database(plan, login_password)
        raise ProviderError(f"injected failure after creating {plan.database}")


def test_provider_failure_mid_registration_leaves_no_trace(runtime: Runtime, admin: psycopg.Connection) -> None:
    deps = runtime.service.deps
    failing = LifecycleDeps(engine=deps.engine, sessions=deps.sessions, keyring=deps.keyring,
                            provider=FailAfterCreate(runtime.admin_dsn))
    before = server_names(admin)
    u = uid("u")
    from agentpg.lifecycle.users import register_user

    with pytest.raises(ProviderError, match="injected"):
        register_user(failing, u)
    assert server_names(admin) == before
    with deps.sessions() as s:
        assert s.get(User, u) is None
        ops = list(s.scalars(select(Operation).where(Operation.user_id == u)))
    assert [op.state for op in ops] == ["undone"]
    # and the same id can register for real afterwards
    runtime.service.register_user(u)
    runtime.service.delete_user(u)


def test_sealed_uri_hides_password_and_does_not_open_in_another_row(runtime: Runtime) -> None:
    svc, deps = runtime.service, runtime.service.deps
    a, b = uid("u"), uid("u")
    svc.register_user(a)
    svc.register_user(b)
    uri = global_uri(runtime, a)
    password = urlsplit(uri).password
    assert password and len(password) >= 32
    with deps.sessions.begin() as s:
        rec_a = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == a)).one()
        rec_b = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == b)).one()
        assert rec_a.connection_uri_sealed is not None
        assert password not in rec_a.connection_uri_sealed and "postgresql://" not in rec_a.connection_uri_sealed
        rec_b.connection_uri_sealed = rec_a.connection_uri_sealed  # an attacker with catalog write access
    with pytest.raises(SecretError, match="does not open"):
        global_uri(runtime, b)
    svc.delete_user(a)
    svc.delete_user(b)


def test_concurrent_registration_of_one_id_makes_one_user(runtime: Runtime, admin: psycopg.Connection) -> None:
    svc = runtime.service
    u = uid("u")
    before = server_names(admin)

    def attempt(_: int) -> str:
        try:
            svc.register_user(u)
            return "created"
        except Conflict:
            return "conflict"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert outcomes.count("created") == 1 and outcomes.count("conflict") == 7
    assert len(server_names(admin)[0] - before[0]) == 1
    svc.delete_user(u)


@pytest.mark.parametrize("bad", ["", " ", "a" * 129, "-leading-dash", "has space", "nul\x00byte", "ünï", "a/b",
                                 "x;drop"])
def test_bad_ids_are_refused_before_anything_changes(runtime: Runtime, bad: str) -> None:
    with runtime.service.deps.sessions() as s:
        before = s.scalar(select(Operation.id).order_by(Operation.created_at.desc()).limit(1))
    with pytest.raises(InvalidInput, match="1 to 128 characters"):
        runtime.service.register_user(bad)
    with runtime.service.deps.sessions() as s:
        assert s.scalar(select(Operation.id).order_by(Operation.created_at.desc()).limit(1)) == before


def test_workspace_rules(runtime: Runtime) -> None:
    svc = runtime.service
    u, w = uid("u"), uid("w")
    with pytest.raises(NotFound, match="does not exist"):
        svc.create_workspace(u, w)
    svc.register_user(u)
    with pytest.raises(Conflict, match="already exists"):
        svc.register_user(u)
    svc.create_workspace(u, w)
    with pytest.raises(Conflict, match="already exists"):
        svc.create_workspace(u, w)
    other = uid("u")
    svc.register_user(other)
    with pytest.raises(NotFound):  # scoped lookups never reveal another user's workspace
        svc.get_workspace(w, user_id=other)
    with pytest.raises(NotFound):
        svc.delete_workspace(w, user_id=other)
    assert [x.id for x in svc.list_workspaces(u).items] == [w]
    svc.delete_user(u)
    svc.delete_user(other)


def test_bring_your_own_database_is_recorded_sealed_and_never_dropped(runtime: Runtime,
                                                                      admin: psycopg.Connection) -> None:
    byo = uid("byo").replace("-", "_")
    admin.execute(f"CREATE DATABASE {byo}")
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        params = conninfo_to_dict(runtime.admin_dsn)
        p = {**params, "dbname": byo}
        uri = f"postgresql://{p['user']}:{p['password']}@{p['host']}:{p['port']}/{byo}"
        assert make_conninfo(**p)
        u = uid("u")
        info = runtime.service.register_user(u, database_url=uri)
        assert info.global_database is not None
        assert info.global_database.ownership_type == "user" and info.global_database.name == byo
        assert global_uri(runtime, u) == uri
        runtime.service.create_workspace(u, uid("w"))
        runtime.service.delete_user(u)
        assert admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (byo,)).fetchone() == (1,)
        with pytest.raises(InvalidInput, match="could not be reached"):
            runtime.service.register_user(uid("u"), database_url=uri.replace(str(p["password"]), "wrong"))
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {byo} WITH (FORCE)")


def test_head_revision_matches_alembic() -> None:
    """The fast "already migrated?" check reads the same head Alembic would upgrade to."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from agentpg.catalog import engine

    config = Config()
    config.set_main_option("script_location", str(engine._MIGRATIONS))
    assert engine.head_revision() == ScriptDirectory.from_config(config).get_current_head()
