"""The Neon provider against a local stand-in of Neon's API v2 whose projects are real databases.

The one thing vanilla Postgres cannot do that Neon does: let the project owner (a ``neon_superuser`` member,
not a superuser) create an event trigger. :class:`EmulatedNeon` runs exactly that statement as the test
server's superuser; every other statement runs as the non-superuser project owner, as on Neon.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import leakscan
import psycopg
import pytest
from helpers import agent_db_uri, global_uri, with_database, workspace_global_uri
from neon_standin import EmulatedNeon, NeonStandIn, StandInServer
from sqlalchemy import select

from agentpg.app.runtime import Runtime
from agentpg.catalog.models import Operation, User, UserGlobalDatabase
from agentpg.errors import AgentpgError, ProviderError, ProviderUnavailable
from agentpg.lifecycle import users, workspaces
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.providers.base import AgentPermissions, DatabasePlan, new_password
from agentpg.providers.neon import NeonProvider, NeonQuota
from agentpg.providers.neon_api import RateLimiter, RetryPolicy, _retry_after
from agentpg.providers.neon_projects import admin_role_of

API_KEY = "napi_" + secrets.token_urlsafe(36)
FAST = RetryPolicy(attempts=6, base_delay_s=0.05, max_delay_s=0.4, max_retry_after_s=2)


@pytest.fixture(scope="module")
def standin(runtime: Runtime) -> Iterator[NeonStandIn]:
    stand = NeonStandIn(runtime.admin_dsn, API_KEY, operation_delay_s=0.2)
    server = StandInServer(stand).start()
    stand.base_url = server.base_url  # type: ignore[attr-defined]
    try:
        yield stand
    finally:
        server.stop()
        stand.cleanup()
        for password in [API_KEY, *stand.passwords]:  # agentpg's outputs must never have held these
            leakscan.add_uri(f"postgresql://x:{password}@h/d")


def make(runtime: Runtime, standin: NeonStandIn, **kwargs: Any) -> EmulatedNeon:
    options: dict[str, Any] = {"base_url": standin.base_url, "retry": FAST,  # type: ignore[attr-defined]
                               "requests_per_minute": 60_000, "burst": 1_000, "connect_timeout_s": 5}
    options.update(kwargs)
    return EmulatedNeon(runtime.admin_dsn, options.pop("api_key", API_KEY), **options)


@pytest.fixture()
def neon(runtime: Runtime, standin: NeonStandIn) -> Iterator[EmulatedNeon]:
    provider = make(runtime, standin)
    yield provider
    provider.close()


def deps_with(runtime: Runtime, provider: NeonProvider) -> LifecycleDeps:
    base = runtime.service.deps
    return LifecycleDeps(engine=base.engine, sessions=base.sessions, provider=provider, keyring=base.keyring)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def names_on_server(admin: psycopg.Connection[Any], names: set[str]) -> set[str]:
    dbs = {r[0] for r in admin.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (list(names),))}
    roles = {r[0] for r in admin.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE ANY(%s)",
                                         ([n.replace("_", "\\_") + "%" for n in names],))}
    return dbs | roles


def assert_clean(message: str) -> None:
    assert API_KEY not in message and "://" not in message and "password" not in message.lower()


def test_full_lifecycle_with_a_429_and_a_423(runtime: Runtime, standin: NeonStandIn, neon: EmulatedNeon,
                                            admin: psycopg.Connection[Any]) -> None:
    deps = deps_with(runtime, neon)
    u, w1, w2 = uid("neon-u"), uid("neon-w"), uid("neon-w")
    standin.inject(429, "/projects", method="POST", retry_after="1")
    started = time.monotonic()
    users.register_user(deps, u)
    assert time.monotonic() - started >= 1.0  # Retry-After was honoured
    assert standin.calls("POST", "/projects")[-2:] == [429, 201]
    with deps.sessions() as s:
        glob = s.scalars(select(UserGlobalDatabase).where(UserGlobalDatabase.user_id == u)).one()
    (project,) = standin.by_name(glob.database_name)
    assert glob.provider == "neon" and glob.provider_project_id == project.id
    assert glob.provider_branch_id == project.branch_id

    workspaces.create_workspace(deps, u, w1)
    workspaces.create_workspace(deps, u, w2)
    g1, g2 = workspace_global_uri(runtime, w1), workspace_global_uri(runtime, w2)
    assert urlsplit(g1).username != urlsplit(g2).username
    with psycopg.connect(g1, autocommit=True) as a:  # agent A creates, agent B reads and writes at once
        a.execute("CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL)")
        a.execute("INSERT INTO customers (name) VALUES ('ada')")
    with psycopg.connect(g2, autocommit=True) as b:
        assert b.execute("SELECT name FROM customers").fetchall() == [("ada",)]
        b.execute("INSERT INTO customers (name) VALUES ('grace')")
        owner = b.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'customers'").fetchone()
        attrs = b.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolreplication, "
                          "pg_has_role(current_user, 'neon_superuser', 'member'), "
                          "pg_has_role(current_user, %s, 'member') FROM pg_roles WHERE rolname = current_user",
                          (admin_role_of(DatabasePlan(glob.database_name, "o", "l")),)).fetchone()
    assert owner == (glob.owner_role,)
    assert attrs == (False,) * 7  # no attribute, not neon_superuser, not the project admin
    a1 = agent_db_uri(runtime, w1)
    with psycopg.connect(a1, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int)")
        assert conn.execute("SELECT pg_has_role(current_user, 'neon_superuser', 'member')").fetchone() == (False,)
    other_db = urlsplit(agent_db_uri(runtime, w2)).path.lstrip("/")
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(with_database(a1, other_db), connect_timeout=5).close()
    assert global_uri(runtime, u).startswith(f"postgresql://{glob.login_role}:")

    role2 = urlsplit(g2).username
    standin.inject(423, "/projects/[^/]+", method="DELETE")
    workspaces.delete_workspace(deps, w2)
    assert standin.calls("DELETE", "/projects/[^/]+")[-2:] == [423, 200]
    assert not standin.by_name(other_db)
    assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role2,)).fetchone() is None

    owned = {glob.database_name, other_db, urlsplit(a1).path.lstrip("/")}
    users.delete_user(deps, u)
    assert not any(standin.by_name(name) for name in owned)
    assert names_on_server(admin, owned) == set()
    with deps.sessions() as s:
        assert s.get(User, u) is None


def test_exhausted_retries_fail_registration_cleanly(runtime: Runtime, standin: NeonStandIn, neon: EmulatedNeon,
                                                    admin: psycopg.Connection[Any]) -> None:
    deps = deps_with(runtime, neon)
    u = uid("neon-u")
    standin.inject(429, "/projects", method="POST", times=FAST.attempts, retry_after="0")
    with pytest.raises(ProviderUnavailable) as info:
        users.register_user(deps, u)
    message = info.value.message
    assert "429" in message and f"{FAST.attempts} times in a row" in message and "creating the Neon project" in message
    assert_clean(message)
    with deps.sessions() as s:
        assert s.get(User, u) is None
        ops = list(s.scalars(select(Operation).where(Operation.user_id == u)))
    assert [op.state for op in ops] == ["undone"]
    database = ops[0].plan["global"]["database"]
    assert not standin.by_name(database) and names_on_server(admin, {database}) == set()

    # Failing after the project exists: the undo deletes it, retrying through two 423s on the way.
    u2 = uid("neon-u")
    deletes = len(standin.calls("DELETE", "/projects/[^/]+"))
    standin.inject(503, "/projects/[^/]+/operations/.*", method="GET", times=FAST.attempts)
    standin.inject(423, "/projects/[^/]+", method="DELETE", times=2)
    with pytest.raises(ProviderUnavailable, match="503"):
        users.register_user(deps, u2)
    with deps.sessions() as s:
        op = s.scalars(select(Operation).where(Operation.user_id == u2)).one()
    assert op.state == "undone" and not standin.by_name(op.plan["global"]["database"])
    assert standin.calls("DELETE", "/projects/[^/]+")[deletes:] == [423, 423, 200]


def test_usage_counters_quota_and_read_only(runtime: Runtime, standin: NeonStandIn, neon: EmulatedNeon,
                                            admin: psycopg.Connection[Any]) -> None:
    plan = DatabasePlan.fresh()
    made = neon.create_database(plan, new_password())
    assert made.project_id and made.branch_id and made.server is None
    agent, agent_pw = f"{plan.database}_agent", new_password()
    agent_uri = neon.create_agent_role(plan, agent, agent_pw, AgentPermissions())
    with psycopg.connect(agent_uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes AS SELECT g AS id, repeat('x', 200) AS body FROM generate_series(1, 2000) g")
    sample = neon.usage(plan)
    size = admin.execute("SELECT pg_database_size(%s)", (plan.database,)).fetchone()
    assert size is not None and sample.storage_bytes == size[0] > 0
    assert sample.compute_seconds is not None and sample.active_seconds is not None
    standin.set_usage(made.project_id, written_data_bytes=5_000_000, data_transfer_bytes=123_456)
    sample = neon.usage(plan)
    assert (sample.written_bytes, sample.transfer_bytes) == (5_000_000, 123_456)

    quota = NeonQuota(written_data_bytes=10_000_000, compute_time_seconds=3600)
    neon.set_quota(plan, quota)
    assert neon.quota(plan) == quota
    assert standin.projects[made.project_id].quota == {"written_data_bytes": 10_000_000, "compute_time_seconds": 3600}
    standin.set_usage(made.project_id, written_data_bytes=20_000_000)
    neon.usage(plan)  # Neon notices the overrun: the compute is suspended
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(made.uri, connect_timeout=5).close()
    neon.set_quota(plan, NeonQuota(written_data_bytes=50_000_000))
    with psycopg.connect(made.uri, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (2000,)
    with pytest.raises(ProviderError, match="whole numbers"):
        neon.set_quota(plan, NeonQuota(active_time_seconds=-1))

    # Over budget at the grant level, as the non-superuser project admin (Neon's case), with Neon's quota as
    # the hard ceiling behind the grants: a grace of compute time for reads, lifted again with the grants.
    used = int(neon.usage(plan).compute_seconds or 0)
    neon.set_read_only(plan, True)
    assert neon.quota(plan) == NeonQuota(compute_time_seconds=used + neon.read_only_compute_grace_s)
    for uri in (agent_uri, made.uri):
        with psycopg.connect(uri, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM notes").fetchone() == (2000,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO notes VALUES (0, 'no')")
    neon.set_read_only(plan, False)
    assert neon.quota(plan) == NeonQuota()
    for uri in (agent_uri, made.uri):
        with psycopg.connect(uri, autocommit=True) as conn:
            conn.execute("INSERT INTO notes VALUES (0, 'yes')")
    neon.drop_agent_role(plan, agent)
    assert admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (agent,)).fetchone() is None
    neon.drop_database(plan)
    neon.drop_database(plan)  # idempotent
    neon.drop_agent_role(plan, agent)  # the project is gone: nothing to do
    assert not standin.by_name(plan.database) and names_on_server(admin, {plan.database}) == set()


def test_reruns_and_another_process_find_the_project(runtime: Runtime, standin: NeonStandIn, neon: EmulatedNeon,
                                                     admin: psycopg.Connection[Any]) -> None:
    plan = DatabasePlan.fresh()
    first = neon.create_database(plan, new_password())
    posts = len(standin.calls("POST", "/projects"))
    again = neon.create_database(plan, password := new_password())  # a repaired crash runs it again
    assert len(standin.calls("POST", "/projects")) == posts and again.project_id == first.project_id
    with psycopg.connect(again.uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int)")
        assert conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 't'").fetchone() == (plan.owner_role,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(first.uri, connect_timeout=5).close()
    other = make(runtime, standin)  # another process: nothing cached, everything looked up by name
    try:
        uri = other.login_uri(plan, password)
        assert uri == again.uri
        claimed = other.set_login_password(plan, password2 := new_password())
        assert (claimed.project_id, claimed.branch_id) == (first.project_id, first.branch_id)
        role = f"{plan.database}_agent"
        agent_uri = other.create_agent_role(plan, role, new_password(), AgentPermissions(
            can_write=False, can_create_tables=False, allowed_tables=("t",)))
        with psycopg.connect(agent_uri, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO t VALUES (1)")
        other.set_agent_permissions(plan, role, AgentPermissions())
        with psycopg.connect(agent_uri, autocommit=True) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
        with psycopg.connect(claimed.uri.replace(password, password2), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        other.drop_database(plan)
        other.close()
    assert names_on_server(admin, {plan.database}) == set()


def test_inventory_paginates_and_orphans_are_dropped(runtime: Runtime, standin: NeonStandIn) -> None:
    provider = make(runtime, standin, page_size=2)
    foreign = httpx.post(f"{standin.base_url}/projects", headers={"Authorization": f"Bearer {API_KEY}"},  # type: ignore[attr-defined]
                         json={"project": {"name": "someone-else", "branch": {"database_name": "standin_foreign",
                                                                             "role_name": "standin_foreign_owner"}}})
    assert foreign.status_code == 201 and foreign.json()["connection_uris"][0]["connection_uri"]
    plans = [DatabasePlan.fresh() for _ in range(3)]
    try:
        for plan in plans:
            provider.create_database(plan, new_password())
        before = len(standin.calls("GET", "/projects"))
        inventory = provider.inventory()
        assert {p.database for p in plans} <= inventory.databases and inventory.roles == frozenset()
        assert "someone-else" not in inventory.databases
        assert len(standin.calls("GET", "/projects")) - before >= 2  # followed the cursor
        with pytest.raises(ProviderError, match="only drops what it made"):
            provider.drop_orphan(database="someone-else")
        for plan in plans:
            provider.drop_orphan(database=plan.database)
        assert not {p.database for p in plans} & provider.inventory().databases
    finally:
        provider.close()
        httpx.delete(f"{standin.base_url}/projects/{foreign.json()['project']['id']}",  # type: ignore[attr-defined]
                     headers={"Authorization": f"Bearer {API_KEY}"})


def test_api_key_refused_and_api_unreachable(runtime: Runtime, standin: NeonStandIn) -> None:
    wrong = "napi_" + secrets.token_urlsafe(36)
    provider = make(runtime, standin, api_key=wrong)
    with pytest.raises(ProviderError) as info:
        provider.check()
    assert "refused the API key (401" in info.value.message and wrong not in info.value.message
    assert not isinstance(info.value, ProviderUnavailable)
    provider.close()
    leakscan.add_uri(f"postgresql://x:{wrong}@h/d")
    make(runtime, standin).check()
    closed = make(runtime, standin, base_url="http://127.0.0.1:9/api/v2", retry=RetryPolicy(3, 0.01, 0.02))
    with pytest.raises(ProviderUnavailable, match=r"(cannot|could not) be reached") as down:
        closed.check()
    assert_clean(down.value.message)
    with pytest.raises(ProviderError, match="API key"):
        NeonProvider("")


def test_rate_limiter_keeps_neons_published_limit() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    limiter = RateLimiter(700, 20, clock=lambda: clock[0], sleep=sleep)
    stamps = []
    for _ in range(2500):
        limiter.acquire()
        stamps.append(clock[0])
    for i, t in enumerate(stamps):  # any 60 s window: at most 700; any second: under Neon's burst of 40
        assert sum(1 for s in stamps[i:i + 701] if s < t + 60) <= 700
        assert sum(1 for s in stamps[i:i + 41] if s < t + 1) <= 40
    assert NeonProvider(API_KEY).api._limiter.rate == pytest.approx((700 - 20) / 60)


def test_retry_after_and_backoff() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert _retry_after("3") == 3 and _retry_after("junk") is None and _retry_after(None) is None
    assert _retry_after(format_datetime(now + timedelta(seconds=5), usegmt=True), now) == 5
    policy = RetryPolicy(attempts=5, base_delay_s=1, max_delay_s=4)
    assert [policy.backoff(n, lambda: 1.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert [policy.backoff(n, lambda: 0.0) for n in (1, 2, 3)] == [0.5, 1, 2]


def test_error_messages_hold_no_secret(standin: NeonStandIn) -> None:
    for source, text in leakscan._ACTIVE[-1].outputs if leakscan._ACTIVE else []:
        if source.startswith(("error ", "log agentpg.providers.neon")):
            assert API_KEY not in text and not any(p in text for p in standin.passwords), source
    assert issubclass(ProviderUnavailable, AgentpgError)
