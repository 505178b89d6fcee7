"""The provider contract: create and drop tenant databases and their roles on some Postgres.

Providers know nothing of users, workspaces or the catalog. They get opaque names chosen by the lifecycle
layer and passwords it generated, and they hand back connection URIs, which are secrets: the caller seals
them at once and never logs them. Every method is idempotent, so an interrupted operation can simply be
run again (that is how ``reconcile`` repairs a crash).
"""

from __future__ import annotations

import abc
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote, urlsplit, urlunsplit

from agentpg.errors import AgentpgError, ProviderError

#: Every database and role agentpg creates starts with this, so ``reconcile`` can tell ours from others'.
NAME_PREFIX = "apg_"

#: The search path of every connection agentpg opens into a tenant database with more rights than its
#: tenants (the server's admin; a Neon project's owner). A tenant may define functions and operators in
#: schema public, and an unqualified name in agentpg's own SQL would resolve to a tenant's object that
#: matches the arguments better than the built-in (``public.format(text, text)`` beats
#: ``pg_catalog.format(text, VARIADIC "any")``), which would then run with agentpg's rights. With only
#: ``pg_catalog`` (and ``pg_temp``, last, which is never searched for functions or operators) on the path,
#: every unqualified name is a built-in, and anything of ``public`` must be named so.
TRUSTED_SEARCH_PATH = "pg_catalog, pg_temp"

#: The advisory lock (``pg_advisory_xact_lock``, taken *inside* a tenant database, so it is per database) that
#: every transaction changing grants there holds first: ``set_agent_grants``, ``set_read_only``, an agent's
#: ``DROP OWNED``. Concurrent GRANT/REVOKE on one object (schema ``public``, the database's CONNECT, a table, a
#: role membership) otherwise fails with "tuple concurrently updated" instead of waiting its turn.
GRANTS_LOCK_KEY = 0x61677470_6772616E


def is_transient_grant_error(exc: BaseException) -> bool:
    """A grant change lost a race that waiting and running it again resolves: a serialisation failure or
    deadlock, Postgres' "tuple concurrently updated/deleted" (XX000) on a catalog row, or a relation that an
    agent dropped while the grants were being rewritten."""
    state = getattr(exc, "sqlstate", None)
    if state in ("40001", "40P01", "42P01"):
        return True
    diag = getattr(exc, "diag", None)
    message = str(getattr(diag, "message_primary", "") or "")
    return state == "XX000" and "concurrently" in message


def opaque_name() -> str:
    """A fresh name for a tenant database: random, so no user id or email ever shows in ``pg_database``."""
    return f"{NAME_PREFIX}{secrets.token_hex(8)}"


def new_password() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class DatabasePlan:
    """The names of one tenant database, its two fixed roles, and the server it lives on.

    Written to the intent log before anything is created, so a crash can always be repaired: the server is
    chosen (:meth:`Provider.place`) before the database exists, not discovered after.
    """

    database: str
    owner_role: str
    login_role: str
    server: str | None = None

    @classmethod
    def fresh(cls, server: str | None = None) -> DatabasePlan:
        name = opaque_name()
        return cls(database=name, owner_role=f"{name}_owner", login_role=f"{name}_login", server=server)

    def to_json(self) -> dict[str, str | None]:
        return {"database": self.database, "owner_role": self.owner_role, "login_role": self.login_role,
                "server": self.server}

    @classmethod
    def from_json(cls, data: Mapping[str, str | None]) -> DatabasePlan:
        database, owner, login = data["database"], data["owner_role"], data["login_role"]
        if not (database and owner and login):
            raise ValueError("a database plan needs a database, an owner role and a login role")
        return cls(database=database, owner_role=owner, login_role=login, server=data.get("server"))


@dataclass(frozen=True)
class AgentPermissions:
    """What one agent may do in a database it does not own (its user's global database)."""

    can_read: bool = True
    can_write: bool = True
    can_create_tables: bool = True
    can_drop_tables: bool = False
    allowed_tables: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Provisioned:
    """What a provider made. ``uri`` is a secret (``repr`` hides it)."""

    uri: str = field(repr=False)
    server: str | None = None
    project_id: str | None = None
    branch_id: str | None = None


@dataclass(frozen=True)
class UsageSample:
    """A database's running counters as its provider measures them. All but storage only ever grow
    (until the server's statistics are reset); pricing works on the difference between two samples."""

    storage_bytes: int
    transactions: int | None = None
    rows_written: int | None = None
    blocks_read: int | None = None
    compute_seconds: float | None = None
    active_seconds: float | None = None
    written_bytes: int | None = None
    transfer_bytes: int | None = None

    def to_json(self) -> dict[str, int | float | None]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, int | float | None]) -> UsageSample:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RecoveryTarget:
    """Where a restore stops; exactly one of the two is set.

    ``lsn``: just before this WAL position (``recovery_target_lsn``, not inclusive): a checkpoint's position,
    or one taken just before an audited statement ran. ``time``: before the first transaction that committed
    after this instant (``recovery_target_time``, not inclusive).
    """

    lsn: str | None = None
    time: datetime | None = None

    def __post_init__(self) -> None:
        if (self.lsn is None) == (self.time is None):
            raise ValueError("a recovery target is an LSN or a time, exactly one of them")


@dataclass(frozen=True)
class ArchiveStatus:
    """What continuous archiving protects on one server (``Provider.archive_status``)."""

    server: str | None
    protected: bool
    """Base backups and WAL are being kept: any point in [earliest, latest] can be restored."""
    reason: str | None = None
    """Why not, when not protected (e.g. the admin role may not replicate), in words an operator acts on."""
    earliest: datetime | None = None
    latest: datetime | None = None
    """The newest instant whose WAL is safely in the backup directory (the recovery point)."""
    base_backups: int = 0
    bytes: int = 0
    synchronous: bool = False
    """Commits wait until their WAL is flushed in the backup directory (nothing acknowledged is lost)."""
    rebase_pending: bool = False
    """A rebase (providers/rebase.py) was asked for and is not done yet."""


@dataclass(frozen=True)
class RebaseResult:
    """One server's archive rebased (``Provider.rebase_backups``): a new full base backup, nothing older."""

    server: str | None
    base_backup: str
    restorable_from: datetime
    """The new start of the restorable window (the new base backup's end): nothing before it is restorable."""
    deleted_base_backups: int
    deleted_wal_segments: int
    bytes_before: int
    bytes_after: int


class NotRestorable(AgentpgError):
    """The requested point is outside what the backups hold (before the oldest base backup, after the newest
    archived WAL, or archiving is off for that server)."""

    status = 409
    code = "not_restorable"


@dataclass(frozen=True)
class Inventory:
    """The agentpg-made databases and roles a server holds (names starting with :data:`NAME_PREFIX`)."""

    databases: frozenset[str]
    roles: frozenset[str]


class Provider(abc.ABC):
    """A home for tenant databases.

    Contract for every implementation:

    * all methods are idempotent: creating what exists re-sets its password and grants, dropping what is
      gone succeeds;
    * names are created exactly as given and validated by the caller (opaque, prefix :data:`NAME_PREFIX`);
    * the database is owned by the provider's admin, ``REVOKE ALL … FROM PUBLIC``; a NOLOGIN owner role owns
      the schema and every object in it; login roles never have SUPERUSER, CREATEDB, CREATEROLE,
      BYPASSRLS or REPLICATION;
    * errors are :class:`~agentpg.errors.ProviderError` (or ``ProviderUnavailable`` when the server can't be
      reached) with a message that names the database, never a URI or password.
    """

    name: str
    extensions: tuple[str, ...] = ()
    """The operator's extension allow-list (AGENTPG_TENANT_EXTENSIONS, checked): what new databases get."""

    @abc.abstractmethod
    def place(self) -> str | None:
        """Choose the server a new database should go to (``None`` where the provider has no such notion)."""

    @abc.abstractmethod
    def create_database(self, plan: DatabasePlan, login_password: str) -> Provisioned:
        """Create the database, its owner role and its full-rights login role; return the login URI."""

    @abc.abstractmethod
    def login_uri(self, plan: DatabasePlan, password: str) -> str:
        """The URI the login role of ``plan`` will have with ``password``. No database is touched, though a
        provider may look up where the database lives (Neon asks its API for the project's host, once)."""

    @abc.abstractmethod
    def set_login_password(self, plan: DatabasePlan, password: str) -> Provisioned:
        """Give the database's login role a new password (claiming a warm database); return the login URI."""

    @abc.abstractmethod
    def drop_database(self, plan: DatabasePlan) -> None:
        """Drop the database (terminating its sessions) and its owner and login roles."""

    @abc.abstractmethod
    def create_agent_role(
        self,
        plan: DatabasePlan,
        role: str,
        password: str,
        permissions: AgentPermissions,
    ) -> str:
        """Create (or re-password) an agent's LOGIN role in ``plan.database`` with exactly ``permissions``;
        return its URI."""

    @abc.abstractmethod
    def set_agent_permissions(
        self, plan: DatabasePlan, role: str, permissions: AgentPermissions
    ) -> None:
        """Make the role's grants exactly ``permissions``, on every existing and every future table."""

    @abc.abstractmethod
    def drop_agent_role(self, plan: DatabasePlan, role: str) -> None:
        """Remove the role's privileges in ``plan.database`` (if it still exists) and drop the role."""

    @abc.abstractmethod
    def set_read_only(self, plan: DatabasePlan, read_only: bool) -> None:
        """Revoke (or restore) every role's write rights on the database, at the grant level; reads stay."""

    def refresh_tenant_sql(self, plan: DatabasePlan) -> list[str]:
        """Re-install agentpg's tenant SQL (:mod:`.tenant_sql`) in an existing database, so one made by an
        older agentpg gets today's rules (the shared-database lockdown included, where agents are granted in).

        Idempotent. Returns the routines found in its schema ``public`` that a tenant defined in a shared
        database (they predate the lockdown; an operator should look at them), as ``schema.name(args)``.
        The default does nothing: a provider whose admin may not run the SQL keeps what creation installed.
        """
        return []

    # -- undo: continuous archiving, restore points, point-in-time restore of one database -----------------

    def archive_status(self) -> list[ArchiveStatus]:
        """One entry per server this provider manages. The default: nothing is archived (say so)."""
        return [ArchiveStatus(server=None, protected=False,
                              reason=f"the {self.name} provider does not archive its databases")]

    def restorable_from(self, server: str | None) -> tuple[str, datetime] | None:
        """The oldest restorable point of ``server`` (its WAL position and time), or None when not known (not
        archived here). Checkpoints before it are expired."""
        return None

    def request_backup_rebase(self, reason: str) -> list[str | None]:
        """Ask for a rebase of every archived server's backups (providers/rebase.py), done in the background
        by ``serve``'s archiving (or ``agentpg backups rebase``); the servers it was asked of."""
        return []

    def rebase_backups(self) -> list[RebaseResult]:
        """Rebase every archived server's backups now: a fresh full base backup, verified, then every older
        base backup and WAL segment deleted (points before it are no longer restorable). Raises ProviderError
        (nothing deleted) when the new base backup cannot be taken or verified."""
        return []

    def mark_point(self, plan: DatabasePlan, label: str) -> tuple[str, datetime]:
        """Write a named restore point in the WAL of ``plan``'s server (``pg_create_restore_point``) and return
        its LSN and the server's time. Costs one small WAL record, whatever the database's size.

        Raises NotRestorable when that server is not archived (a point nothing could restore to is a lie),
        ProviderUnavailable when it cannot be reached.
        """
        raise NotRestorable(f"the {self.name} provider does not archive its databases: no checkpoint can be made")

    def restore_database(self, plan: DatabasePlan, target: RecoveryTarget, into: DatabasePlan) -> None:
        """Create database ``into.database`` on ``plan``'s server holding ``plan.database`` as it was at
        ``target``: built from the backups in a side instance (the running server and its other databases are
        not touched), then loaded as agentpg's admin. Its objects belong to ``plan.owner_role``; it has
        agentpg's tenant SQL (:mod:`.tenant_sql`) and extensions; CONNECT is granted to ``plan.login_role``
        only; rows of ``agentpg_internal.agent_grants`` whose role no longer exists are removed (the caller
        re-applies every current agent's permissions). Materialized views come back unpopulated (their query
        is an agent's, and would run as the admin).

        Idempotent: a half-made ``into.database`` (an earlier attempt that crashed) is dropped and made again.
        Raises NotRestorable when ``target`` is outside the backups, ProviderError when the restore fails.
        """
        raise NotRestorable(f"the {self.name} provider does not archive its databases")

    def replace_database(self, plan: DatabasePlan, restored: DatabasePlan) -> None:
        """Make ``restored.database`` (made by :meth:`restore_database`) take ``plan.database``'s place: new
        connections are refused during the swap, sessions on both are terminated, ``plan.database`` is renamed
        away and dropped, ``restored.database`` is renamed to ``plan.database``. The roles, URIs and passwords
        of ``plan`` are unchanged.

        Idempotent and resumable: after a crash at any step, calling it again finishes the swap; once
        ``plan.database`` is the restored one, it does nothing. Raises ProviderError.
        """
        raise NotRestorable(f"the {self.name} provider does not archive its databases")

    def restored_copy_uri(self, uri: str, database: str) -> str:
        """``uri`` (a login URI of a restored copy's source database: its role and password) made to reach the
        copy ``database`` (made by :meth:`restore_database`). A secret. The default: another database on the
        same server; a provider whose copies live elsewhere (Neon: a branch with its own endpoint) overrides it.
        Raises ProviderError when the copy cannot be found."""
        return urlunsplit(urlsplit(uri)._replace(path="/" + quote(database, safe="")))

    def install_extension(self, plan: DatabasePlan, name: str) -> None:
        """Install extension ``name`` (already checked against the operator's list) in ``plan.database``, as
        the provider's admin, so its objects belong to a trusted role. Idempotent.

        Raises ProviderError when the server lacks it or the provider cannot install extensions.
        """
        raise ProviderError(f"this provider cannot install extension {name!r}")

    def extension_status(self) -> dict[str, list[str]]:
        """Of the operator's extension list: ``installed`` (what new databases get) and ``missing`` (what the
        server lacks, skipped). Raises ProviderUnavailable when the server cannot be reached. The default, for
        a provider that does not install extensions (Neon): every listed one is missing, and said so."""
        return {"installed": [], "missing": [f"{name} (the {self.name} provider does not install extensions)"
                                             for name in self.extensions]}

    @abc.abstractmethod
    def usage(self, plan: DatabasePlan) -> UsageSample:
        """The database's counters now (see :class:`UsageSample`)."""

    def usage_many(self, plans: Sequence[DatabasePlan]) -> dict[str, UsageSample | AgentpgError]:
        """Each database's counters keyed by its name, or the error reading that one failed with: one
        database's failure never fails the others. The default asks :meth:`usage` once per database; a
        provider that can read many in one request overrides it (the usage sync reads every database)."""
        samples: dict[str, UsageSample | AgentpgError] = {}
        for plan in plans:
            try:
                samples[plan.database] = self.usage(plan)
            except AgentpgError as exc:
                samples[plan.database] = exc
        return samples

    @abc.abstractmethod
    def inventory(self) -> Inventory:
        """Every agentpg-made database and role on the provider's servers."""

    @abc.abstractmethod
    def drop_orphan(self, *, database: str | None = None, role: str | None = None) -> None:
        """Drop one database or role that no catalog record owns (``reconcile --fix``)."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise ``ProviderUnavailable`` unless the provider's servers answer."""

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release pooled connections. The provider must not be used afterwards."""
