"""Round trips on the wire for the hot reads (issue 22): counted by libpq's own protocol trace, not by timing.

Every message a connection sends is logged by libpq (``PQtrace``); a *round trip* is one run of messages
the client sends before it reads the server's answers (a simple ``Query``, or an extended-protocol batch
ending in ``Sync``; a pipeline is one run however many statements it carries). So a ``BEGIN``, a
``ROLLBACK`` or a pre-ping shows up here even though psycopg sends them on its own.

* token authentication: one statement, no ``BEGIN``/``ROLLBACK``, no ping (a connection used moments ago);
* a user with its global database: one statement;
* a connection idle past the ping threshold is pinged once; one the server killed is replaced, not used;
* writes stay transactional (``BEGIN`` … ``COMMIT``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, event
from wire_trace import WireLog

from agentpg.catalog.engine import ensure_database, make_engine, migrate, session_factory
from agentpg.catalog.models import Token, User, UserGlobalDatabase, Workspace
from agentpg.embedded import EmbeddedPostgres
from agentpg.errors import Unauthenticated
from agentpg.lifecycle import users
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.tokens import TokenStore, hash_token

pytestmark = pytest.mark.anyio


def _texts(trips: list[list[str]]) -> str:
    return "\n".join(m for trip in trips for m in trip)


def _is_ping(message: str) -> bool:
    return message in ('Query\t ";"', 'Query\t "SELECT 1"')  # SQLAlchemy's psycopg dialect pings with ";"


def _transaction_control(trips: list[list[str]]) -> list[str]:
    """BEGIN/ROLLBACK/COMMIT and pings among the messages sent."""
    return [m for trip in trips for m in trip
            if _is_ping(m) or any(word in m.upper() for word in ('"BEGIN', '"ROLLBACK', '"COMMIT'))]


@pytest.fixture(scope="module")
def server(agentpg_home: Path) -> Any:
    return EmbeddedPostgres(agentpg_home, fsync=False).ensure_running()


@dataclass(frozen=True)
class Dsn:
    """A connection string kept out of reprs (and so out of pytest's failure reports)."""

    value: str = field(repr=False)


@pytest.fixture(scope="module")
def catalog(server: Any) -> Iterator[Dsn]:
    """A scratch catalog (migrated) on the session's server with one user, workspace and two tokens."""
    name = f"rt_catalog_{uuid.uuid4().hex[:8]}"
    ensure_database(server.dsn("postgres"), name)
    dsn = server.dsn(name)
    engine = make_engine(dsn)
    migrate(engine)
    now = datetime.now(UTC)
    with session_factory(engine).begin() as s:
        s.add(User(id="rt-user", status="active"))
        s.flush()
        s.add(UserGlobalDatabase(user_id="rt-user", database_name="rt_db", provider="local", status="ready"))
        s.add(Workspace(id="rt-ws", user_id="rt-user", status="active"))
        s.flush()
        s.add(Token(kind="user", token_hash=hash_token("apg_u_rt-user-secret"), user_id="rt-user", created_at=now))
        s.add(Token(kind="agent", token_hash=hash_token("apg_g_rt-agent-secret"), user_id="rt-user",
                    workspace_id="rt-ws", created_at=now))
    engine.dispose()
    yield Dsn(dsn)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture()
def wire() -> Iterator[WireLog]:
    log = WireLog()
    yield log
    log.close()


def _traced_engine(dsn: Dsn, wire: WireLog, **kwargs: Any) -> Engine:
    engine = make_engine(dsn.value, **kwargs)
    event.listen(engine, "connect", lambda dbapi_conn, _record: wire.attach(dbapi_conn.pgconn))
    return engine


def _deps(engine: Engine) -> LifecycleDeps:
    # Only the engine is used by the reads under test; no provider or keyring is reached.
    return LifecycleDeps(engine=engine, sessions=session_factory(engine), provider=cast(Any, None),
                         keyring=cast(Any, None))


def test_token_check_and_user_read_are_one_statement_each(catalog: Dsn, wire: WireLog) -> None:
    engine = _traced_engine(catalog, wire)
    store = TokenStore(session_factory(engine), "not-the-admin-token-" * 3, cache_ttl_s=0)  # no cache
    try:
        store.authenticate("apg_g_rt-agent-secret")  # connects (the dialect's own first queries)

        mark = wire.mark()
        principal = store.authenticate("apg_g_rt-agent-secret")
        trips = wire.sent_since(mark)
        assert principal.workspace_id == "rt-ws"
        assert len(trips) == 1, _texts(trips)
        assert "tokens" in _texts(trips) and "workspaces" in _texts(trips)  # the workspace check is joined
        assert _transaction_control(trips) == []

        mark = wire.mark()
        with pytest.raises(Unauthenticated):
            store.authenticate("apg_u_not-a-token")
        assert len(wire.sent_since(mark)) == 1

        mark = wire.mark()
        found = users.find_user(_deps(engine), "rt-user")
        trips = wire.sent_since(mark)
        assert found is not None and found[1] is not None and found[1].database_name == "rt_db"
        assert len(trips) == 1, _texts(trips)
        assert _transaction_control(trips) == []

        mark = wire.mark()
        row = users.read_user(_deps(engine), "rt-user")  # what Service.get_user reads: Core, ten columns
        trips = wire.sent_since(mark)
        assert row is not None and row.id == "rt-user" and row.database_name == "rt_db"
        assert len(trips) == 1, _texts(trips)
        assert _transaction_control(trips) == []

        mark = wire.mark()
        assert users.find_user(_deps(engine), "nobody") is None
        assert users.read_user(_deps(engine), "nobody") is None
        assert users.list_users(_deps(engine), limit=10)[0][1] is not None
        assert len(wire.sent_since(mark)) == 3
    finally:
        engine.dispose()


def test_a_connection_is_pinged_only_after_idleness_or_when_the_server_dropped_it(
        catalog: Dsn, server: Any, wire: WireLog) -> None:
    idle = _traced_engine(catalog, wire, idle_ping_s=0.0)  # every checkout counts as "after idleness"
    store = TokenStore(session_factory(idle), "not-the-admin-token-" * 3, cache_ttl_s=0)
    try:
        store.authenticate("apg_u_rt-user-secret")
        mark = wire.mark()
        store.authenticate("apg_u_rt-user-secret")
        trips = wire.sent_since(mark)
        assert len(trips) == 2 and _is_ping(trips[0][0]), _texts(trips)
        assert not any("BEGIN" in m for trip in trips for m in trip)
    finally:
        idle.dispose()

    engine = _traced_engine(catalog, wire)
    store = TokenStore(session_factory(engine), "not-the-admin-token-" * 3, cache_ttl_s=0)
    try:
        store.authenticate("apg_u_rt-user-secret")
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        # The server said goodbye on that socket: the checkout notices (no round trip needed to know), the
        # ping fails, the pool connects afresh, and the caller never sees it.
        assert store.authenticate("apg_u_rt-user-secret").user_id == "rt-user"
    finally:
        engine.dispose()


def test_writes_stay_in_a_transaction(catalog: Dsn, wire: WireLog) -> None:
    engine = _traced_engine(catalog, wire)
    store = TokenStore(session_factory(engine), "not-the-admin-token-" * 3, cache_ttl_s=0)
    try:
        store.authenticate("apg_u_rt-user-secret")
        issued = store.issue("user", user_id="rt-user")
        mark = wire.mark()
        store.revoke(issued.id)
        sent = _texts(wire.sent_since(mark))
        assert '"BEGIN' in sent and '"COMMIT"' in sent and "UPDATE tokens" in sent
        with pytest.raises(Unauthenticated):
            store.authenticate(issued.secret)
    finally:
        engine.dispose()
