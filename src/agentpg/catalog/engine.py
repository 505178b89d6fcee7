"""Reaching the catalog: the engine, the database it lives in, and its migrations."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.orm import Session, sessionmaker

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


def make_engine(dsn: str, *, connect_timeout_s: int = 5, pool_size: int = 5) -> Engine:
    engine = create_engine(
        sqlalchemy_url(dsn),
        pool_size=pool_size,
        max_overflow=10,
        pool_pre_ping=True,
        connect_args={"connect_timeout": connect_timeout_s, "application_name": "agentpg catalog"},
        hide_parameters=True,
    )
    event.listen(engine, "handle_error", _catalog_unreachable)
    return engine


def _catalog_unreachable(context: ExceptionContext) -> None:
    """A catalog connection that cannot be made (server down, no slot left, refused) or that broke mid-way is
    :class:`CatalogUnavailable` for every caller: REST answers 503 with ``Retry-After``, an MCP tool call a
    tool error saying so, the CLI exit code 3. A failed pre-ping is left alone: the pool reconnects."""
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
