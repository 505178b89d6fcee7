"""Tenant databases on one PostgreSQL server reached with an admin DSN (embedded or existing)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from agentpg.errors import AgentpgError, ProviderError, ProviderUnavailable
from agentpg.providers import pitr, rebase
from agentpg.providers.archive import Archiver
from agentpg.providers.base import (
    NAME_PREFIX,
    TRUSTED_SEARCH_PATH,
    AgentPermissions,
    ArchiveStatus,
    DatabasePlan,
    Inventory,
    Provider,
    Provisioned,
    RebaseResult,
    RecoveryTarget,
    UsageSample,
)
from agentpg.providers.limits import TenantLimits
from agentpg.providers.local_roles import (
    changing_grants,
    configure_admin,
    drop_role,
    ensure_role,
    fence,
    forget_agent,
    grant_membership,
    scram_verifier,
    set_agent_grants,
)
from agentpg.providers.tenant_sql import BOOTSTRAP

Conn = psycopg.Connection[tuple[Any, ...]]


class LocalProvider(Provider):
    """One PostgreSQL server. ``server`` arguments are ignored: there is only one."""

    name = "local"

    def __init__(self, admin_dsn: str, *, connection_limit: int = 20, connect_timeout_s: int = 5,
                 server_name: str = "local", max_direct_connections: int = 8,
                 extensions: Sequence[str] = (), tenant_limits: TenantLimits | None = None) -> None:
        self._admin_dsn = admin_dsn
        self.tenant_limits = tenant_limits or TenantLimits()
        """What every tenant login role made from now on gets (issue 18); roles made earlier keep theirs."""
        self.extensions = tuple(extensions)
        self._available: frozenset[str] | None = None  # of those, what the server has (asked once)
        self._connection_limit = connection_limit
        self._connect_timeout_s = connect_timeout_s
        self.server_name = server_name
        self.archiver: Archiver | None = None
        """Continuous archiving of this server (undo); None: not archived."""
        params = conninfo_to_dict(admin_dsn)
        self._host = str(params.get("host") or "127.0.0.1")
        self._port = int(params.get("port") or 5432)
        self._server_version: int | None = None
        # Connections to the server's maintenance database are pooled: SCRAM authentication alone costs
        # milliseconds, more than the statement a warm-pool claim needs. Per-tenant-database admin work
        # (bootstrap, grants) is rare and opens its own connection.
        self._pool: ConnectionPool[Conn] | None = None
        self._pool_lock = threading.Lock()
        # agentpg's own connection budget on this server: the pool above plus at most this many direct
        # connections at once (more concurrent operations wait their turn). Together with the catalog's pool
        # it fits in the slots the embedded server reserves for superusers, so tenants that hold every
        # ordinary slot cannot lock agentpg out (see embedded.RESERVED_CONNECTIONS).
        self._direct = threading.BoundedSemaphore(max_direct_connections)
        self._direct_wait_s = max(30.0, 6.0 * connect_timeout_s)

    # -- connections ---------------------------------------------------------------------------------

    def _maintenance_pool(self) -> ConnectionPool[Conn]:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._admin_dsn, min_size=1, max_size=4, open=False, name=f"admin-{self.server_name}",
                    kwargs={"autocommit": True, "connect_timeout": self._connect_timeout_s,
                            "application_name": "agentpg provider"}, timeout=self._connect_timeout_s,
                    check=ConnectionPool.check_connection, configure=configure_admin)
                self._pool.open(wait=False)
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    @contextmanager
    def _admin(self, dbname: str | None = None, *, tag: str | None = None) -> Iterator[Conn]:
        """An autocommit admin connection: pooled for the maintenance database, fresh otherwise.

        ``tag`` marks a fresh connection's ``application_name`` with the name of what it creates, so a
        later drop can :func:`~.local_roles.fence` statements still running for a client that has died.
        """
        if dbname is None and tag is None:
            pool = self._maintenance_pool()
            try:
                pooled = pool.getconn()
            except PoolTimeout:
                # After an outage the pool backs off between reconnection attempts; the server may already
                # be back, so try one direct connection before calling it unreachable.
                pooled = None
            if pooled is not None:
                if self._server_version is None:
                    self._server_version = pooled.info.server_version
                try:
                    yield pooled
                finally:
                    pool.putconn(pooled)
                return
        kwargs: dict[str, object] = {"autocommit": True, "connect_timeout": self._connect_timeout_s,
                                     "application_name": f"agentpg {tag}" if tag else "agentpg provider"}
        if dbname is not None:  # a tenant database: only built-ins resolve unqualified (base.TRUSTED_SEARCH_PATH)
            kwargs["dbname"] = dbname
            kwargs["options"] = "-c search_path=" + TRUSTED_SEARCH_PATH.replace(" ", "")
        if not self._direct.acquire(timeout=self._direct_wait_s):
            raise ProviderUnavailable(f"the PostgreSQL server {self.server_name!r} is busy with other changes "
                                      "of agentpg's; retry shortly")
        try:
            try:
                conn = psycopg.connect(self._admin_dsn, **kwargs)  # type: ignore[arg-type]
            except psycopg.OperationalError:
                raise ProviderUnavailable(
                    f"the PostgreSQL server {self.server_name!r} ({self._host}:{self._port}) cannot be reached"
                ) from None
            try:
                if self._server_version is None:
                    self._server_version = conn.info.server_version
                yield conn
            finally:
                conn.close()
        finally:
            self._direct.release()

    def _changing_grants(self, database: str, what: str, change: Callable[[Conn], object], *,
                         tag: str | None = None) -> None:
        """Run ``change`` under the grants lock of ``database``, retried on lost races
        (:func:`~.local_roles.changing_grants`, which says what it raises)."""
        changing_grants(self._admin, database, what, change, tag=tag)

    def uri(self, database: str, role: str, password: str) -> str:
        user, secret, db = (quote(v, safe="") for v in (role, password, database))
        return f"postgresql://{user}:{secret}@{self._host}:{self._port}/{db}"

    # -- roles (the SQL is in local_roles.py) ---------------------------------------------------------

    def _ensure_role(self, conn: Conn, role: str, *, login: bool,
                     password: str | None = None) -> None:
        """:func:`~.local_roles.ensure_role` with this server's connection limit and tenant limits."""
        ensure_role(conn, role, login=login, password=password, connection_limit=self._connection_limit,
                    tenant_limits=self.tenant_limits)

    # -- databases -----------------------------------------------------------------------------------

    def place(self) -> str:
        return self.server_name

    def create_database(self, plan: DatabasePlan, login_password: str) -> Provisioned:
        db = sql.Identifier(plan.database)
        try:
            with self._admin(tag=plan.database) as conn:
                configure_admin(conn)
                self._ensure_role(conn, plan.owner_role, login=False)
                self._ensure_role(conn, plan.login_role, login=True, password=login_password)
                grant_membership(conn, plan.owner_role, plan.login_role, self._server_version)
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (plan.database,)).fetchone()
                if not exists:
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # a concurrent retry won
                        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template1 ENCODING 'UTF8'").format(db))
                conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
                conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, sql.Identifier(plan.login_role)))
            with self._admin(plan.database, tag=plan.database) as conn, conn.transaction():
                conn.execute(BOOTSTRAP)
                self._install_extensions(conn, self.extensions)
                conn.execute(
                    "INSERT INTO agentpg_internal.config VALUES ('owner_role', %s), ('login_role', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (plan.owner_role, plan.login_role))
                conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(plan.owner_role)))
                conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        except psycopg.Error as exc:
            raise ProviderError(
                f"creating database {plan.database} failed: {type(exc).__name__}: {exc.diag.message_primary}"
            ) from None
        return Provisioned(uri=self.uri(plan.database, plan.login_role, login_password), server=self.server_name)

    def login_uri(self, plan: DatabasePlan, password: str) -> str:
        return self.uri(plan.database, plan.login_role, password)

    def set_login_password(self, plan: DatabasePlan, password: str) -> Provisioned:
        try:
            with self._admin() as conn:
                conn.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(
                    sql.Identifier(plan.login_role), sql.Literal(scram_verifier(conn, plan.login_role, password))))
        except psycopg.Error as exc:
            raise ProviderError(f"setting the password of database {plan.database} failed: "
                                f"{exc.diag.message_primary}") from None
        return Provisioned(uri=self.uri(plan.database, plan.login_role, password), server=self.server_name)

    def drop_database(self, plan: DatabasePlan) -> None:
        try:
            with self._admin() as conn:
                fence(conn, plan.database)
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(plan.database)))
                drop_role(conn, plan.login_role)
                drop_role(conn, plan.owner_role)
        except psycopg.Error as exc:
            raise ProviderError(
                f"dropping database {plan.database} failed: {type(exc).__name__}: {exc.diag.message_primary}"
            ) from None

    # -- agent roles ---------------------------------------------------------------------------------

    def create_agent_role(self, plan: DatabasePlan, role: str, password: str, permissions: AgentPermissions) -> str:
        try:
            with self._admin(tag=role) as conn:
                configure_admin(conn)
                self._ensure_role(conn, role, login=True, password=password)
        except psycopg.Error as exc:
            raise ProviderError(
                f"creating an agent role in {plan.database} failed: {exc.diag.message_primary}") from None
        self.set_agent_permissions(plan, role, permissions)
        return self.uri(plan.database, role, password)

    def set_agent_permissions(self, plan: DatabasePlan, role: str, permissions: AgentPermissions) -> None:
        self._changing_grants(plan.database, "setting agent permissions",
                              lambda conn: set_agent_grants(conn, role, permissions), tag=role)

    def drop_agent_role(self, plan: DatabasePlan, role: str) -> None:
        try:
            with self._admin() as conn:
                fence(conn, role)
                role_exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                db_exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (plan.database,)).fetchone()
            if role_exists and db_exists:
                self._changing_grants(plan.database, "dropping an agent role", lambda conn: forget_agent(conn, role))
            if role_exists:
                with self._admin() as conn:
                    drop_role(conn, role)
        except psycopg.Error as exc:
            raise ProviderError(
                f"dropping an agent role in {plan.database} failed: {exc.diag.message_primary}") from None

    def set_read_only(self, plan: DatabasePlan, read_only: bool) -> None:
        # Privileges are checked per statement, so open sessions lose write rights at once too.
        self._changing_grants(plan.database, "changing write access",
                              lambda conn: conn.execute("SELECT agentpg_internal.set_read_only(%s)", (read_only,)))

    def refresh_tenant_sql(self, plan: DatabasePlan) -> list[str]:
        found: list[str] = []

        def refresh(conn: Conn) -> None:
            found.clear()  # a retried attempt starts over
            conn.execute(BOOTSTRAP)
            self._install_extensions(conn, self.extensions)
            shared = conn.execute("SELECT EXISTS (SELECT 1 FROM agentpg_internal.agent_grants)").fetchone()
            if shared and shared[0]:
                conn.execute("SELECT agentpg_internal.lock_down_shared()")
                conn.execute("SELECT agentpg_internal.revoke_shared_builtins()")  # what was added since
                found.extend(str(row[0]) for row in conn.execute(
                    "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
                    "WHERE p.pronamespace = 'public'::regnamespace AND NOT r.rolsuper ORDER BY 1"))

        self._changing_grants(plan.database, "refreshing agentpg's SQL", refresh, tag=plan.database)
        return found

    def _available_extensions(self, conn: Conn) -> frozenset[str]:
        if self._available is None:
            rows = conn.execute("SELECT name FROM pg_available_extensions WHERE name = ANY(%s)",
                                (list(self.extensions),)).fetchall()
            self._available = frozenset(str(row[0]) for row in rows)
        return self._available

    def _install_extensions(self, conn: Conn, names: Sequence[str]) -> None:
        """``CREATE EXTENSION IF NOT EXISTS`` each available one, in schema public, owned by the admin."""
        available = self._available_extensions(conn)
        for name in names:
            if name in available:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} SCHEMA public").format(sql.Identifier(name)))

    def install_extension(self, plan: DatabasePlan, name: str) -> None:
        try:
            with self._admin(plan.database, tag=plan.database) as conn:
                available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", (name,)).fetchone()
                if available is None:
                    raise ProviderError(f"extension {name!r} is not installed on this PostgreSQL server")
                with conn.transaction():
                    conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {} SCHEMA public").format(
                        sql.Identifier(name)))
        except psycopg.Error as exc:
            raise ProviderError(f"installing extension {name!r} in {plan.database} failed: "
                                f"{exc.diag.message_primary}") from None

    def extension_status(self) -> dict[str, list[str]]:
        try:
            with self._admin() as conn:
                available = self._available_extensions(conn)
        except psycopg.OperationalError as exc:
            raise ProviderUnavailable(f"server {self.server_name!r} cannot be reached") from exc
        return {"installed": [n for n in self.extensions if n in available],
                "missing": [n for n in self.extensions if n not in available]}

    def usage(self, plan: DatabasePlan) -> UsageSample:
        sample = self._read_usage([plan.database]).get(plan.database)
        if sample is None:
            raise ProviderError(f"database {plan.database} does not exist on server {self.server_name!r}")
        return sample

    def usage_many(self, plans: Sequence[DatabasePlan]) -> dict[str, UsageSample | AgentpgError]:
        """All of them in one query (the usage sync reads every database: one round trip per database made
        it seconds of work at a few thousand)."""
        names = [plan.database for plan in plans]
        try:
            found = self._read_usage(names)
        except ProviderUnavailable as exc:  # the server is down: asking per database would wait N times
            return dict.fromkeys(names, exc)
        except ProviderError:  # e.g. a database dropped between the catalog read and the size: one by one
            return super().usage_many(plans)
        return {name: found.get(name) or ProviderError(
            f"database {name} does not exist on server {self.server_name!r}") for name in names}

    def _read_usage(self, names: Sequence[str]) -> dict[str, UsageSample]:
        try:
            with self._admin() as conn:
                rows = conn.execute(
                    "SELECT d.datname, pg_database_size(d.oid), s.xact_commit + s.xact_rollback, "
                    "s.tup_inserted + s.tup_updated + s.tup_deleted, s.blks_read "
                    "FROM pg_database d LEFT JOIN pg_stat_database s ON s.datid = d.oid WHERE d.datname = ANY(%s)",
                    (list(names),)).fetchall()
        except psycopg.Error as exc:
            what = names[0] if len(names) == 1 else f"{len(names)} databases"
            raise ProviderError(f"reading usage of {what} failed: {exc.diag.message_primary}") from None
        return {str(row[0]): UsageSample(storage_bytes=int(row[1]), transactions=int(row[2] or 0),
                                         rows_written=int(row[3] or 0), blocks_read=int(row[4] or 0))
                for row in rows}

    def load(self) -> tuple[int, int]:
        """(number of agentpg databases, their total size in bytes): what fleet placement compares."""
        with self._admin() as conn:
            row = conn.execute("SELECT count(*), coalesce(sum(pg_database_size(datname)), 0) FROM pg_database "
                               "WHERE datname LIKE %s", (NAME_PREFIX.replace("_", "\\_") + "%",)).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    # -- inventory -----------------------------------------------------------------------------------

    def inventory(self) -> Inventory:
        pattern = NAME_PREFIX.replace("_", "\\_") + "%"
        with self._admin() as conn:
            dbs = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,)).fetchall()
            roles = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (pattern,)).fetchall()
        return Inventory(databases=frozenset(r[0] for r in dbs), roles=frozenset(r[0] for r in roles))

    def drop_orphan(self, *, database: str | None = None, role: str | None = None) -> None:
        for name in (database, role):
            if name is not None and not name.startswith(NAME_PREFIX):
                raise ProviderError(f"refusing to drop {name!r}: agentpg only drops what it made")
        if database is not None:
            with self._admin() as conn:
                fence(conn, database)
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        if role is None:
            return
        with self._admin() as conn:
            fence(conn, role)
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                return
            dbs = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND datname LIKE %s",
                (NAME_PREFIX.replace("_", "\\_") + "%",)).fetchall()]
        for dbname in dbs:  # privileges the role holds anywhere must go before the role can
            with self._admin(dbname) as conn:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with self._admin() as conn:
            drop_role(conn, role)

    def harden_server(self) -> None:
        """Close the databases every server ships with to tenant roles (by default PUBLIC may connect).

        Only for a server agentpg owns (the embedded one): on a shared server the operator decides.
        """
        with self._admin() as conn:
            for name in ("postgres", "template1"):
                conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC")
                             .format(sql.Identifier(name)))

    # -- undo (providers/archive.py, providers/pitr.py) -------------------------------------------------

    def archive_status(self) -> list[ArchiveStatus]:
        return [pitr.archive_status(self)]

    def mark_point(self, plan: DatabasePlan, label: str) -> tuple[str, datetime]:
        return pitr.mark_point(self, plan, label)

    def restorable_from(self, server: str | None) -> tuple[str, datetime] | None:
        return rebase.window_start(self.archiver) if self.archiver is not None else None

    def request_backup_rebase(self, reason: str) -> list[str | None]:
        if self.archiver is None:
            return []
        try:
            rebase.request(self.archiver, reason)
        except OSError as exc:
            raise ProviderError(f"asking for a rebase of the backups failed: {exc.strerror or exc}") from None
        return [self.server_name]

    def rebase_backups(self) -> list[RebaseResult]:
        return [] if self.archiver is None else [rebase.rebase_now(self.archiver)]

    def restore_database(self, plan: DatabasePlan, target: RecoveryTarget, into: DatabasePlan) -> None:
        pitr.restore_database(self, plan, target, into)

    def replace_database(self, plan: DatabasePlan, restored: DatabasePlan) -> None:
        pitr.replace_database(self, plan, restored)

    def check(self) -> None:
        with self._admin() as conn:
            conn.execute("SELECT 1")
