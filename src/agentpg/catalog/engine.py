"""Reaching the catalog: the engine, the database it lives in, and its migrations."""

from __future__ import annotations

import re
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from agentpg.errors import CatalogUnavailable

_MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same in every agentpg process sharing a catalog.
_MIGRATION_LOCK_KEY = 0x61677470_67636174


def sqlalchemy_url(dsn: str) -> str:
    """The psycopg 3 dialect URL for a libpq DSN/URI."""
    url = make_url(dsn.replace("postgres://", "postgresql://", 1))
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database ``name`` on the admin's server if it is missing (idempotent, race-safe)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass
        except psycopg.errors.UniqueViolation:  # two creators raced on pg_database's unique index
            pass
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))


#: A pooled catalog connection idle for longer than this is pinged (``SELECT 1``) before it is handed out.
IDLE_PING_S = 5.0
_LAST_USED = "agentpg_last_used"


def make_engine(dsn: str, *, connect_timeout_s: int = 5, pool_size: int = 5,
                idle_ping_s: float = IDLE_PING_S) -> Engine:
    """The catalog's engine. A checkout costs no round trip unless the connection looks dead or sat idle
    for more than ``idle_ping_s`` (see :func:`_check_on_checkout`); writes stay transactional as before, and
    reads that need no transaction use :func:`read_engine` / :func:`read_sessions`."""
    engine = create_engine(
        sqlalchemy_url(dsn),
        pool_size=pool_size,
        max_overflow=10,
        # Not SQLAlchemy's pre-ping: it costs a round trip on every checkout, a fifth of a catalog read.
        pool_pre_ping=False,
        connect_args={"connect_timeout": connect_timeout_s, "application_name": "agentpg catalog"},
        hide_parameters=True,
    )
    event.listen(engine, "handle_error", _catalog_unreachable)
    event.listen(engine, "connect", _mark_used)
    event.listen(engine, "checkin", _mark_used)
    event.listen(engine, "checkout", lambda dbapi_conn, record, _proxy: _check_on_checkout(
        engine, dbapi_conn, record, idle_ping_s))
    return engine


def _mark_used(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
    record.info[_LAST_USED] = time.monotonic()


def _check_on_checkout(engine: Engine, dbapi_conn: Any, record: ConnectionPoolEntry, idle_ping_s: float) -> None:
    """Hand out a pooled connection without a round trip when it was in use moments ago and nothing arrived
    on its socket since; ping it first when it sat idle longer than ``idle_ping_s`` (a server restarted, a
    NAT or firewall dropped it) or when something did arrive (a server that terminates a session says so
    before closing it). A failed ping raises ``DisconnectionError``: the pool drops the connection and
    checks out a fresh one (SQLAlchemy retries once). A connection that breaks in the window without a
    word (a silent network drop within ``idle_ping_s``) fails its statement: ``CatalogUnavailable``, a 503
    with ``Retry-After``, and the pool is renewed (see :func:`_catalog_unreachable`)."""
    last = record.info.get(_LAST_USED)
    stale = last is None or time.monotonic() - last > idle_ping_s
    try:
        if not stale and not _has_unread_input(dbapi_conn):
            return
        engine.dialect.do_ping(dbapi_conn)
    except Exception as exc:  # whatever the ping ran into, this connection is not worth keeping
        raise DisconnectionError(f"catalog connection failed its check ({type(exc).__name__})") from None


def _has_unread_input(dbapi_conn: Any) -> bool:
    """Whether the server sent something to an idle connection (or closed it): a zero-timeout poll of the
    socket, no round trip. A closed or unusable connection counts as having input (so it gets pinged)."""
    if getattr(dbapi_conn, "closed", True):
        return True
    try:
        readable, _, _ = select.select([dbapi_conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


# Kept on the engine itself (a weak map would keep it alive: the derived engine refers to its parent).
_READ_ENGINE = "_agentpg_read_engine"
_READ_SESSIONS = "_agentpg_read_sessions"


def read_engine(engine: Engine) -> Engine:
    """``engine`` in autocommit: each statement is its own implicit transaction, so a read costs only its
    own round trip (no ``BEGIN``, no ``ROLLBACK``). Same pool. For reads only: a statement that writes
    commits at once, and two statements see two snapshots, so a read that needs a consistent view of
    several tables asks for it in one statement (a join)."""
    found: Engine | None = engine.__dict__.get(_READ_ENGINE)
    if found is None:  # two threads racing here make two equivalent engines; setdefault keeps one
        found = engine.__dict__.setdefault(_READ_ENGINE, engine.execution_options(isolation_level="AUTOCOMMIT"))
    return found


def read_sessions(engine: Engine) -> sessionmaker[Session]:
    """ORM sessions on :func:`read_engine`, for read-only paths (same caveats)."""
    found: sessionmaker[Session] | None = engine.__dict__.get(_READ_SESSIONS)
    if found is None:
        found = engine.__dict__.setdefault(_READ_SESSIONS, sessionmaker(read_engine(engine), expire_on_commit=False))
    return found


def _catalog_unreachable(context: ExceptionContext) -> None:
    """A catalog connection that cannot be made (server down, no slot left, refused) or that broke mid-way is
    :class:`CatalogUnavailable` for every caller: REST answers 503 with ``Retry-After``, an MCP tool call a
    tool error saying so, the CLI exit code 3. (A pre-ping, were one configured, is left alone: the pool
    reconnects.)"""
    if context.is_pre_ping:
        return
    original = context.original_exception
    if context.is_disconnect or (context.connection is None and isinstance(original, psycopg.OperationalError)):
        raise CatalogUnavailable("agentpg's catalog database cannot be reached right now; retry shortly") from None


_REVISION = re.compile(r"^revision\s*=\s*[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*=\s*[\"']([^\"']+)[\"']", re.MULTILINE)


def head_revision() -> str | None:
    """The newest migration's id, read from the files (``None`` if the history is not one straight line)."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (_MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text()
        revisions.update(_REVISION.findall(source))
        parents.update(_DOWN_REVISION.findall(source))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _at_head(engine: Engine) -> bool:
    """Whether the catalog is already migrated: one cheap query instead of importing Alembic, which is most
    of a CLI command's start-up time."""
    head = head_revision()
    if head is None:
        return False
    try:
        with engine.connect() as connection:
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except CatalogUnavailable:
        raise
    except Exception as exc:
        if "OperationalError" in type(exc).__name__:
            raise CatalogUnavailable("the catalog database cannot be reached") from None
        return False  # no alembic_version table yet: a fresh catalog
    return current == [head]


def migrate(engine: Engine) -> None:
    """Bring the catalog to the newest revision; concurrent callers wait on one advisory lock."""
    if _at_head(engine):
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    try:
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except Exception as exc:
        if isinstance(exc, psycopg.OperationalError) or "OperationalError" in type(exc).__name__:
            raise CatalogUnavailable("the catalog database cannot be reached") from None
        raise


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def singleton_lock(engine: Engine, key: int) -> Iterator[bool]:
    """Hold the catalog's session advisory lock ``key`` for the block, if no other process holds it; yields
    whether it was obtained. For background jobs that one ``serve`` instance at a time must run (the usage
    sync, the storage check): the others skip that round. A process that dies lets go with its connection."""
    with engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
