"""The role and grant SQL of the local provider (:class:`~.local.LocalProvider`): creating tenant roles with
client-side SCRAM verifiers, memberships, setting and forgetting agents' grants, dropping roles, fencing dead
clients' statements, and running grant changes under the database's grants lock with bounded waits and retries.

Kept apart from ``local.py`` so that module holds the provider contract (connections, databases, usage,
inventory, undo) while this one holds the statements whose exact form carries the security and concurrency
rules: no clear-text password in any statement, and grant changes that wait for each other instead of failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg
from psycopg import sql

from agentpg.errors import Busy, ProviderError
from agentpg.providers.base import GRANTS_LOCK_KEY, AgentPermissions, is_transient_grant_error
from agentpg.providers.limits import TenantLimits
from agentpg.providers.tenant_sql import ROLE_ATTRIBUTES as _ROLE_ATTRIBUTES

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]

#: How many times a grant change that lost a race (see :func:`is_transient_grant_error`) is run again.
GRANT_ATTEMPTS = 5
#: How long a grant change waits for the database's grants lock (and any lock its statements need). Every
#: role may call the advisory lock functions, so an agent could hold the lock; this bounds the wait.
GRANT_LOCK_TIMEOUT = "30s"


class AdminConnect(Protocol):
    """How :func:`changing_grants` opens an admin connection (``LocalProvider._admin``)."""

    def __call__(self, dbname: str | None = None, *, tag: str | None = None) -> AbstractContextManager[Conn]: ...


def configure_admin(conn: Conn) -> None:
    """Make verifiers computed on the admin connection ``conn`` cheap (PG16+; older servers: unchanged), and
    its bulk writes (``CREATE DATABASE``) flushed as they go."""
    # SCRAM's iteration count exists to slow down guessing of human passwords. Ours are 256-bit random,
    # so 4096 rounds buy nothing and cost ~2 ms per verifier (and per tenant login). PG16+ reports this
    # setting to libpq, which then uses it when computing verifiers on this connection.
    if conn.info.server_version >= 160000:
        conn.execute("SET scram_iterations = 64")
    # CREATE DATABASE copies the template through a ring of buffers and leaves what it evicts dirty in the
    # page cache; asking for writeback as it goes keeps its ~8 MB per database from landing later on other
    # sessions' commit fsyncs (the embedded server sets this for every backend; an operator's server may not).
    conn.execute("SET backend_flush_after = '256kB'")


def scram_verifier(conn: Conn, role: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of ``password``, computed client-side by libpq.

    ``CREATE ROLE … PASSWORD`` is a utility statement and cannot take a bound parameter. Sending the verifier
    instead of the password (as psql's ``\\password`` does) keeps the clear text out of the statement, so it
    can never surface in the server's log or in an error message.
    """
    return conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()


def ensure_role(conn: Conn, role: str, *, login: bool, password: str | None, connection_limit: int,
                tenant_limits: TenantLimits) -> None:
    """Create ``role`` (or re-attribute it if it exists); a login role gets ``password`` (as a verifier),
    ``connection_limit`` and the ``tenant_limits`` role settings. Raises psycopg errors."""
    ident = sql.Identifier(role)
    if login:
        assert password is not None
        attrs = sql.SQL("LOGIN " + _ROLE_ATTRIBUTES + " CONNECTION LIMIT {} PASSWORD {}").format(
            sql.Literal(connection_limit), sql.Literal(scram_verifier(conn, role, password)))
    else:
        attrs = sql.Composed([sql.SQL("NOLOGIN " + _ROLE_ATTRIBUTES)])
    try:
        conn.execute(sql.SQL("CREATE ROLE {} WITH ").format(ident) + attrs)
    except psycopg.errors.DuplicateObject:
        conn.execute(sql.SQL("ALTER ROLE {} WITH ").format(ident) + attrs)
    except psycopg.errors.UniqueViolation:  # a concurrent creator won the race on pg_authid
        conn.execute(sql.SQL("ALTER ROLE {} WITH ").format(ident) + attrs)
    if login:  # issue 18: limits on every tenant login role (temp_file_limit is superuser-only: unraisable)
        conn.execute(sql.SQL("; ").join(
            sql.SQL("ALTER ROLE {} SET {} = {}").format(ident, sql.Identifier(name), sql.Literal(value))
            for name, value in tenant_limits.role_settings()))


def fence(conn: Conn, tag: str) -> None:
    """Stop statements a dead client left running for ``tag`` before dropping what they create.

    A client killed during ``CREATE DATABASE`` does not stop the server, which finishes the statement
    later: a drop that ran in between would see nothing to drop, and the database would reappear
    as an orphan. Terminating the tagged backends (and waiting for them to go) closes that window.
    """
    conn.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                 "WHERE application_name = %s AND pid <> pg_backend_pid()", (f"agentpg {tag}",))


def drop_role(conn: Conn, role: str) -> None:
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def grant_membership(conn: Conn, group: str, member: str, server_version: int | None) -> None:
    # PG16+ can grant a membership that inherits privileges without allowing SET ROLE.
    option = sql.SQL(" WITH INHERIT TRUE, SET FALSE") if (server_version or 0) >= 160000 else sql.SQL("")
    conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(member)) + option)


def set_agent_grants(conn: Conn, role: str, permissions: AgentPermissions) -> None:
    """Make agent ``role``'s grants in ``conn``'s database exactly ``permissions``; run it under the grants
    lock (:func:`changing_grants`). Raises psycopg errors."""
    tables = list(permissions.allowed_tables) if permissions.allowed_tables is not None else None
    conn.execute("SELECT agentpg_internal.set_agent_grants(%s, %s, %s, %s, %s, %s)",
                 (role, permissions.can_read, permissions.can_write, permissions.can_create_tables,
                  permissions.can_drop_tables, tables))


def forget_agent(conn: Conn, role: str) -> None:
    """Remove agent ``role`` from ``conn``'s database (its grants, sessions and objects) so the role can be
    dropped; run it under the grants lock (:func:`changing_grants`). Raises psycopg errors."""
    conn.execute("SELECT agentpg_internal.forget_agent(%s)", (role,))
    # Terminate the role's sessions so DROP ROLE is not blocked by them.
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
    # DROP OWNED revokes the role's grants: the same catalog rows other agents' grants change.
    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))


def changing_grants(admin: AdminConnect, database: str, what: str, change: Callable[[Conn], object], *,
                    tag: str | None = None) -> None:
    """Run ``change`` in one transaction of ``database`` that first takes the database's grants lock
    (:data:`GRANTS_LOCK_KEY`), so concurrent grant changes there wait for each other instead of failing;
    one that still loses a race (e.g. to a table an agent drops meanwhile) is run again.

    Raises Busy when the lock is not had within :data:`GRANT_LOCK_TIMEOUT`, ProviderError on other failures
    (and ProviderUnavailable from ``admin``)."""
    for attempt in range(1, GRANT_ATTEMPTS + 1):
        try:
            with admin(database, tag=tag) as conn, conn.transaction():
                conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(GRANT_LOCK_TIMEOUT)))
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (GRANTS_LOCK_KEY,))
                change(conn)
            return
        except psycopg.errors.LockNotAvailable:
            raise Busy(f"{what} in {database} waited {GRANT_LOCK_TIMEOUT} for other changes of its grants; "
                       "retry shortly") from None
        except psycopg.Error as exc:
            if attempt < GRANT_ATTEMPTS and is_transient_grant_error(exc):
                log.info("%s in %s lost a race (%s); running it again", what, database, exc.sqlstate)
                time.sleep(0.02 * attempt)
                continue
            raise ProviderError(f"{what} in {database} failed: {exc.diag.message_primary}") from None
