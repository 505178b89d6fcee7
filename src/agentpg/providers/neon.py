"""Tenant databases on Neon: one Neon project per database, as the original design has it.

How the provider contract maps onto Neon (docs/neon.md has the long version):

* ``create_database`` creates a project named ``plan.database`` (so it can be found by name later) whose
  default branch holds a database of that name owned by ``<database>_admin``. That role is Neon's project
  owner (a member of ``neon_superuser``: CREATEROLE, CREATEDB, BYPASSRLS, read/write-all-data) and is the
  provider's admin inside the project; no tenant ever receives it.
* Everything else is plain SQL as that admin, the same isolation as the local provider: a NOLOGIN owner role
  owns schema ``public``; the login role and agent roles are created **with SQL**, not with Neon's roles
  API, because Neon makes every API-created role a member of ``neon_superuser``, which would hand tenants
  CREATEROLE, BYPASSRLS and read access to every table. Neon wants clear-text passwords in ``CREATE/ALTER
  ROLE`` (it rejects pre-hashed ones), so those statements are written so that they cannot fail.
* The event trigger that adopts new tables needs what vanilla Postgres reserves to superusers; Neon lets
  ``neon_superuser`` members create event triggers (https://neon.com/blog/postgres-event-triggers).
* The admin is not a superuser, so it is made a member of every role it must act for: INHERIT (and SET for
  the owner role) lets it re-own, grant and drop what tenants create, exactly what PG16+ checks.
* Roles live and die with their project: ``inventory`` reports projects, never roles.
* Undo is Neon's own history and branches (checkpoints are LSNs, restores are branches): ``neon_undo.py``.

Secrets: Neon answers with the admin's URI and password; they stay in this object's memory (a cache per
database) and are never logged. Errors name databases and projects only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psycopg
from psycopg import sql

from agentpg.errors import ProviderError, ProviderUnavailable
from agentpg.providers.base import (
    GRANTS_LOCK_KEY,
    NAME_PREFIX,
    TRUSTED_SEARCH_PATH,
    AgentPermissions,
    ArchiveStatus,
    DatabasePlan,
    Inventory,
    Provider,
    Provisioned,
    RecoveryTarget,
    UsageSample,
)
from agentpg.providers.neon_api import (
    DEFAULT_BASE_URL,
    DEFAULT_BURST,
    PUBLISHED_REQUESTS_PER_MINUTE,
    NeonApi,
    RateLimiter,
    RetryPolicy,
)
from agentpg.providers.neon_projects import NeonProject, NeonProjects
from agentpg.providers.neon_undo import NeonUndo
from agentpg.providers.tenant_sql import BOOTSTRAP
from agentpg.providers.tenant_sql import ROLE_ATTRIBUTES as _ROLE_ATTRIBUTES

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]

# The event trigger is installed on its own, after the rest of the bootstrap has committed.
_TRIGGER_MARK = "DROP EVENT TRIGGER IF EXISTS agentpg_adopt;"
_BOOTSTRAP_BODY, _mark, _trigger_tail = BOOTSTRAP.partition(_TRIGGER_MARK)
EVENT_TRIGGER_SQL = _mark + _trigger_tail


@dataclass(frozen=True)
class NeonQuota:
    """A project's consumption quota as Neon's ``settings.quota`` has it; 0 means unlimited (Neon's rule).

    Past a quota Neon suspends the project's computes until the period resets or the quota is raised.
    """

    active_time_seconds: int = 0
    compute_time_seconds: int = 0
    written_data_bytes: int = 0
    data_transfer_bytes: int = 0
    logical_size_bytes: int = 0

    def to_json(self) -> dict[str, int]:
        values = dict(self.__dict__)
        if any(not isinstance(v, int) or v < 0 for v in values.values()):
            raise ProviderError("Neon quotas are whole numbers, 0 or more (0 means unlimited)")
        return values


def with_credentials(uri: str, role: str, password: str, database: str) -> str:
    """``uri`` (host, port, query such as ``sslmode=require`` kept) for another role, password and database."""
    parts = urlsplit(uri)
    hostport = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(database, safe=""), parts.query, ""))


class NeonProvider(Provider):
    """Neon's API v2 for projects, plain SQL inside each project. ``server`` is always ``None``."""

    name = "neon"

    def __init__(self, api_key: str, *, base_url: str = DEFAULT_BASE_URL, region_id: str = "aws-us-east-2",
                 pg_version: int = 17, org_id: str | None = None, connection_limit: int = 20,
                 connect_timeout_s: int = 15, operation_timeout_s: float = 300.0,
                 requests_per_minute: int = PUBLISHED_REQUESTS_PER_MINUTE, burst: int = DEFAULT_BURST,
                 retry: RetryPolicy | None = None, page_size: int = 400,
                 transport: httpx.BaseTransport | None = None, read_only_compute_grace_s: int = 3600,
                 history_retention_s: int | None = None) -> None:
        self.api = NeonApi(api_key, base_url, retry=retry, transport=transport,
                           limiter=RateLimiter(max(2, requests_per_minute),
                                               max(1, min(burst, requests_per_minute - 1))))
        self.region_id, self.pg_version, self.org_id = region_id, pg_version, org_id
        self._connection_limit = connection_limit
        self._connect_timeout_s = connect_timeout_s
        self.projects = NeonProjects(self.api, org_id=org_id, page_size=page_size,
                                     operation_timeout_s=operation_timeout_s)
        """Neon's project requests (``neon_projects.py``); the cache of the projects met is ``_projects``."""
        self._projects: dict[str, NeonProject] = {}
        self._lock = threading.Lock()
        self.read_only_compute_grace_s = read_only_compute_grace_s
        self.history_retention_s = history_retention_s
        """Neon's ``history_retention_seconds`` for new projects (how far back undo reaches); None: the plan's."""
        self.undo = NeonUndo(self)

    def close(self) -> None:
        self.api.close()

    # -- projects (this process's cache; the requests to Neon are in neon_projects.py) -----------------

    def _ref(self, plan: DatabasePlan, *, missing_ok: bool = False, uri: bool = True,
             branch: bool = False) -> NeonProject | None:
        """The project of ``plan``: cached, else found by name; its admin URI (``uri``) and default branch
        (``branch``) are asked for once each, when first needed. ``None`` only if ``missing_ok``."""
        with self._lock:
            ref = self._projects.get(plan.database)
        if ref is None:
            ref = self.undo.known(plan.database)  # a restored branch is a database too (neon_undo)
        if ref is None:
            projects = self.projects.find_all(plan.database)
            if not projects:
                if missing_ok:
                    return None
                raise ProviderError(f"database {plan.database} has no Neon project")
            ref = NeonProject(str(projects[0]["id"]))
        if uri and ref.admin_uri is None:
            ref.admin_uri = self.projects.admin_uri(plan, ref.project_id)
        if branch and ref.branch_id is None:
            ref.branch_id = self.projects.default_branch(plan, ref.project_id)
        with self._lock:
            self._projects[plan.database] = ref
        return ref

    def _must(self, plan: DatabasePlan, *, uri: bool = True, branch: bool = False) -> NeonProject:
        ref = self._ref(plan, uri=uri, branch=branch)
        assert ref is not None
        return ref

    def _forget(self, database: str) -> None:
        with self._lock:
            self._projects.pop(database, None)

    # -- SQL inside a project ------------------------------------------------------------------------

    @contextmanager
    def _sql(self, plan: DatabasePlan, what: str, ref: NeonProject | None = None) -> Iterator[Conn]:
        """An autocommit connection as the project's admin; driver errors become ProviderError."""
        ref = ref or self._must(plan)
        conn: Conn | None = None
        for attempt in range(3):  # a suspended compute wakes on connect; that can take a few seconds
            if attempt:
                time.sleep(0.5 * 2**attempt)
            try:
                conn = psycopg.connect(ref.uri, autocommit=True, connect_timeout=self._connect_timeout_s,
                                       application_name="agentpg provider")
                # Neon's proxy reads the startup "options" itself (its endpoint): set the path in the session.
                conn.execute(sql.SQL("SET search_path = {}").format(sql.SQL(TRUSTED_SEARCH_PATH)))
                break
            except psycopg.OperationalError:
                if attempt == 0:  # the cached admin password may have been reset since: ask Neon again
                    self._forget(plan.database)
                    ref = self._must(plan)
        if conn is None:
            raise ProviderUnavailable(f"the Neon compute of database {plan.database} cannot be reached")
        try:
            yield conn
        except psycopg.Error as exc:
            raise ProviderError(f"{what} failed: {type(exc).__name__}: {exc.diag.message_primary}") from None
        finally:
            conn.close()

    def _ensure_role(self, conn: Conn, role: str, *, login: bool, password: str | None = None) -> None:
        """Create or re-attribute a role, then set its password in a statement of its own.

        Neon takes passwords only in clear text, and Postgres logs a failing statement with its text: so the
        statement that carries the password runs only once the role certainly exists.
        """
        ident = sql.Identifier(role)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        # Only a superuser may even restate NOSUPERUSER in ALTER ROLE; the admin can't grant it anyway.
        attributes = _ROLE_ATTRIBUTES.replace("NOSUPERUSER ", "") if exists else _ROLE_ATTRIBUTES
        attrs: sql.Composable = sql.SQL(("LOGIN " if login else "NOLOGIN ") + attributes)
        if login:
            attrs += sql.SQL(" CONNECTION LIMIT {}").format(sql.Literal(self._connection_limit))
        conn.execute((sql.SQL("ALTER ROLE {} WITH ") if exists else sql.SQL("CREATE ROLE {} WITH ")).format(ident)
                     + attrs)
        if password is not None:
            conn.execute(sql.SQL("ALTER ROLE {} WITH PASSWORD {}").format(ident, sql.Literal(password)))

    @staticmethod
    def _grant(conn: Conn, group: str, member: sql.Composable, *, inherit: bool, set_role: bool) -> None:
        """``GRANT group TO member`` with explicit INHERIT/SET options on PG16+ (older servers: plain)."""
        stmt = sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), member)
        if conn.info.server_version >= 160000:
            stmt += sql.SQL(" WITH INHERIT {}, SET {}").format(sql.SQL(str(inherit).upper()),
                                                              sql.SQL(str(set_role).upper()))
        conn.execute(stmt)

    def _act_for(self, conn: Conn, role: str, *, set_role: bool = False) -> None:
        """Make the (non-superuser) admin a member of ``role``, so it may re-own, grant and drop its objects."""
        self._grant(conn, role, sql.SQL("CURRENT_USER"), inherit=True, set_role=set_role)

    def _install_event_trigger(self, conn: Conn, plan: DatabasePlan) -> None:
        """Create the adoption event trigger (allowed to ``neon_superuser`` members on Neon)."""
        if EVENT_TRIGGER_SQL:
            conn.execute(EVENT_TRIGGER_SQL)

    def _bootstrap(self, conn: Conn, plan: DatabasePlan, login_password: str) -> None:
        db = sql.Identifier(plan.database)
        with conn.transaction():
            self._ensure_role(conn, plan.owner_role, login=False)
            self._ensure_role(conn, plan.login_role, login=True, password=login_password)
            self._act_for(conn, plan.owner_role, set_role=True)
            self._act_for(conn, plan.login_role)
            self._grant(conn, plan.owner_role, sql.Identifier(plan.login_role), inherit=True, set_role=False)
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, sql.Identifier(plan.login_role)))
            conn.execute(_BOOTSTRAP_BODY)
            conn.execute("INSERT INTO agentpg_internal.config VALUES ('owner_role', %s), ('login_role', %s) "
                         "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (plan.owner_role, plan.login_role))
            conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(plan.owner_role)))
            conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        self._install_event_trigger(conn, plan)

    # -- the contract --------------------------------------------------------------------------------

    def place(self) -> None:
        return None

    def create_database(self, plan: DatabasePlan, login_password: str) -> Provisioned:
        ref = self.projects.create(plan, region_id=self.region_id, pg_version=self.pg_version,
                                   history_retention_s=self.history_retention_s)
        with self._lock:
            self._projects[plan.database] = ref
        with self._sql(plan, f"setting up database {plan.database}", ref) as conn:
            self._bootstrap(conn, plan, login_password)
        return Provisioned(uri=with_credentials(ref.uri, plan.login_role, login_password, plan.database),
                           server=None, project_id=ref.project_id, branch_id=ref.branch_id)

    def login_uri(self, plan: DatabasePlan, password: str) -> str:
        """The login URI. Neon's host is per project, so this asks the API once per database and process."""
        return with_credentials(self._must(plan).uri, plan.login_role, password, plan.database)

    def set_login_password(self, plan: DatabasePlan, password: str) -> Provisioned:
        ref = self._must(plan, branch=True)
        with self._sql(plan, f"setting the password of database {plan.database}", ref) as conn:
            self._ensure_role(conn, plan.login_role, login=True, password=password)
        return Provisioned(uri=with_credentials(ref.uri, plan.login_role, password, plan.database),
                           server=None, project_id=ref.project_id, branch_id=ref.branch_id)

    def drop_database(self, plan: DatabasePlan) -> None:
        """Delete every project named ``plan.database`` (its roles go with it). Neon keeps a deleted project
        recoverable for 7 days. A restored copy is a branch of its source's project: that branch is deleted."""
        if not self._drop_projects(plan.database):
            self.undo.drop_copy(plan.database)

    def _drop_projects(self, database: str) -> bool:
        """Delete the projects named ``database``; False if there was none."""
        self._forget(database)
        projects = self.projects.find_all(database)
        for project in projects:
            self.api.request("DELETE", f"/projects/{project['id']}", ok_missing=True,
                             what=f"deleting the Neon project of database {database}")
        return bool(projects)

    def create_agent_role(self, plan: DatabasePlan, role: str, password: str, permissions: AgentPermissions) -> str:
        ref = self._must(plan)
        with self._sql(plan, f"creating an agent role in {plan.database}", ref) as conn, conn.transaction():
            self._ensure_role(conn, role, login=True, password=password)
            self._act_for(conn, role)
            self._set_grants(conn, role, permissions)
        return with_credentials(ref.uri, role, password, plan.database)

    @staticmethod
    def _set_grants(conn: Conn, role: str, permissions: AgentPermissions) -> None:
        tables = list(permissions.allowed_tables) if permissions.allowed_tables is not None else None
        # Concurrent grant changes in one database wait for each other (see GRANTS_LOCK_KEY).
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (GRANTS_LOCK_KEY,))
        conn.execute("SELECT agentpg_internal.set_agent_grants(%s, %s, %s, %s, %s, %s)",
                     (role, permissions.can_read, permissions.can_write, permissions.can_create_tables,
                      permissions.can_drop_tables, tables))

    def set_agent_permissions(self, plan: DatabasePlan, role: str, permissions: AgentPermissions) -> None:
        with self._sql(plan, f"setting agent permissions in {plan.database}") as conn, conn.transaction():
            self._set_grants(conn, role, permissions)

    def drop_agent_role(self, plan: DatabasePlan, role: str) -> None:
        ref = self._ref(plan, missing_ok=True)
        if ref is None:  # the project is gone, and its roles with it
            return
        with self._sql(plan, f"dropping an agent role in {plan.database}", ref) as conn:
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                return
            self._act_for(conn, role)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (GRANTS_LOCK_KEY,))
                conn.execute("SELECT agentpg_internal.forget_agent(%s)", (role,))
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    def set_read_only(self, plan: DatabasePlan, read_only: bool) -> None:
        with self._sql(plan, f"changing write access of {plan.database}") as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (GRANTS_LOCK_KEY,))
            conn.execute("SELECT agentpg_internal.set_read_only(%s)", (read_only,))
            if read_only:
                # set_read_only() revokes the owner role from all its members, the admin included; without
                # that membership the admin's re-grants were no-ops. Restore it and grant again.
                self._act_for(conn, plan.owner_role, set_role=True)
                conn.execute("SELECT agentpg_internal.set_agent_grants(role_name, can_read, can_write, can_create,"
                             " can_drop, allowed_tables) FROM agentpg_internal.agent_grants")
        # Grants stop writes and keep reads. Behind them, the project's quota is the hard ceiling Neon's API
        # offers: past any quota Neon suspends the compute (reads too), so it is set with a grace of
        # compute time for reads, and lifted (0 = unlimited) when writes are restored.
        if read_only:
            used = int(self.usage(plan).compute_seconds or 0)
            self.set_quota(plan, NeonQuota(compute_time_seconds=used + self.read_only_compute_grace_s))
        else:
            self.set_quota(plan, NeonQuota())

    def _project_body(self, plan: DatabasePlan, what: str) -> tuple[NeonProject, dict[str, Any]]:
        ref = self._must(plan, uri=False)
        body = self.api.request("GET", f"/projects/{ref.project_id}", what=what) or {}
        project = body.get("project")
        if not isinstance(project, dict):
            raise ProviderError(f"{what}: the Neon API answered without the project")
        return ref, project

    # -- undo: Neon's history and branches (neon_undo.py) ---------------------------------------------

    def archive_status(self) -> list[ArchiveStatus]:
        return self.undo.archive_status()

    def mark_point(self, plan: DatabasePlan, label: str) -> tuple[str, datetime]:
        return self.undo.mark_point(plan)  # Neon has no named restore points: the catalog keeps the label

    def restore_database(self, plan: DatabasePlan, target: RecoveryTarget, into: DatabasePlan) -> None:
        self.undo.restore_database(plan, target, into)

    def replace_database(self, plan: DatabasePlan, restored: DatabasePlan) -> None:
        self.undo.replace_database(plan, restored)

    def restored_copy_uri(self, uri: str, database: str) -> str:
        return self.undo.copy_uri(uri, database)

    def usage(self, plan: DatabasePlan) -> UsageSample:
        """Neon's consumption counters of the project (they restart at each billing period)."""
        _, project = self._project_body(plan, f"reading the usage of database {plan.database}")

        def number(key: str) -> int:
            value = project.get(key)
            return int(value) if isinstance(value, (int, float)) else 0

        return UsageSample(storage_bytes=number("synthetic_storage_size"),
                           compute_seconds=float(number("compute_time_seconds")),
                           active_seconds=float(number("active_time_seconds")),
                           written_bytes=number("written_data_bytes"), transfer_bytes=number("data_transfer_bytes"))

    def set_quota(self, plan: DatabasePlan, quota: NeonQuota) -> None:
        """Make the project's quota exactly ``quota`` (``PATCH /projects/{id}``, ``settings.quota``)."""
        ref = self._must(plan, uri=False)
        self.api.request("PATCH", f"/projects/{ref.project_id}",
                         json={"project": {"settings": {"quota": quota.to_json()}}},
                         what=f"setting the quota of database {plan.database}")

    def quota(self, plan: DatabasePlan) -> NeonQuota:
        """The project's quota as Neon reports it."""
        _, project = self._project_body(plan, f"reading the quota of database {plan.database}")
        raw = (project.get("settings") or {}).get("quota") or {}
        return NeonQuota(**{k: int(raw.get(k) or 0) for k in NeonQuota.__dataclass_fields__})

    def inventory(self) -> Inventory:
        """The agentpg projects (by name). Roles are never listed: on Neon they cannot outlive a project."""
        projects = self.projects.list_all(NAME_PREFIX, "listing the Neon projects")
        names = frozenset(str(p["name"]) for p in projects if str(p.get("name") or "").startswith(NAME_PREFIX))
        return Inventory(databases=names, roles=frozenset())

    def drop_orphan(self, *, database: str | None = None, role: str | None = None) -> None:
        for name in (database, role):
            if name is not None and not name.startswith(NAME_PREFIX):
                raise ProviderError(f"refusing to drop {name!r}: agentpg only drops what it made")
        if database is not None:
            self._drop_projects(database)
        # A role lives inside one project; inventory() reports none, and dropping the project drops them.

    def check(self) -> None:
        params: dict[str, str | int] = {"limit": 1}
        if self.org_id:
            params["org_id"] = self.org_id
        self.api.request("GET", "/projects", params=params, what="checking the Neon API")
