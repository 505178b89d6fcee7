"""Tenant databases spread over several PostgreSQL servers: how users outgrow one machine.

Each member is a :class:`~agentpg.providers.local.LocalProvider`. A new database goes to the reachable server
holding the fewest agentpg databases (ties: least storage). Records remember their server (the plan's
``server``), so every later call goes straight to it; a server that is down fails only the calls that need
it, with a message naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from urllib.parse import urlsplit

from agentpg.errors import AgentpgError, ProviderError, ProviderUnavailable
from agentpg.providers.base import (
    NAME_PREFIX,
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
from agentpg.providers.local import LocalProvider

log = logging.getLogger(__name__)


def server_name_of(dsn: str) -> str:
    """A stable, secret-free name for a server: ``host:port`` of its admin DSN."""
    parts = urlsplit(dsn if "://" in dsn else "postgresql://" + dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}"


class FleetProvider(Provider):
    """Several servers. ``servers`` maps a server name to its admin DSN."""

    name = "fleet"

    def __init__(self, servers: Mapping[str, str], *, connection_limit: int = 20, connect_timeout_s: int = 5,
                 extensions: Sequence[str] = (), tenant_limits: TenantLimits | None = None) -> None:
        if not servers:
            raise ProviderError("a fleet needs at least one server")
        self.members: dict[str, LocalProvider] = {
            name: LocalProvider(dsn, connection_limit=connection_limit, connect_timeout_s=connect_timeout_s,
                                server_name=name, extensions=extensions, tenant_limits=tenant_limits)
            for name, dsn in servers.items()
        }
        self.extensions = tuple(extensions)
        self.retry_after_s = 30.0
        self._down_until: dict[str, float] = {}

    def _member(self, plan: DatabasePlan) -> LocalProvider:
        if plan.server is None or plan.server not in self.members:
            raise ProviderError(f"database {plan.database} lives on server {plan.server!r}, "
                                "which is not in this fleet (AGENTPG_FLEET)")
        return self.members[plan.server]

    def load(self) -> dict[str, tuple[int, int] | None]:
        """Per server: (agentpg databases, their total bytes), or ``None`` when it cannot be reached.

        A server that just failed is skipped for ``retry_after_s`` instead of being waited on at every
        placement: one dead server must not slow every registration down by a connect timeout.
        """
        loads: dict[str, tuple[int, int] | None] = {}
        now = time.monotonic()
        for name, member in self.members.items():
            if self._down_until.get(name, 0.0) > now:
                loads[name] = None
                continue
            try:
                loads[name] = member.load()
                self._down_until.pop(name, None)
            except ProviderError as exc:
                log.warning("fleet server %s is unavailable for placement: %s", name, exc.message)
                self._down_until[name] = now + self.retry_after_s
                loads[name] = None
        return loads

    def place(self) -> str:
        candidates = [(load, name) for name, load in self.load().items() if load is not None]
        if not candidates:
            raise ProviderUnavailable("no server of the fleet can be reached")
        return min(candidates)[1]

    def create_database(self, plan: DatabasePlan, login_password: str) -> Provisioned:
        return self._member(plan).create_database(plan, login_password)

    def login_uri(self, plan: DatabasePlan, password: str) -> str:
        return self._member(plan).login_uri(plan, password)

    def set_login_password(self, plan: DatabasePlan, password: str) -> Provisioned:
        return self._member(plan).set_login_password(plan, password)

    def drop_database(self, plan: DatabasePlan) -> None:
        self._member(plan).drop_database(plan)

    def create_agent_role(self, plan: DatabasePlan, role: str, password: str, permissions: AgentPermissions) -> str:
        return self._member(plan).create_agent_role(plan, role, password, permissions)

    def set_agent_permissions(self, plan: DatabasePlan, role: str, permissions: AgentPermissions) -> None:
        self._member(plan).set_agent_permissions(plan, role, permissions)

    def drop_agent_role(self, plan: DatabasePlan, role: str) -> None:
        self._member(plan).drop_agent_role(plan, role)

    def set_read_only(self, plan: DatabasePlan, read_only: bool) -> None:
        self._member(plan).set_read_only(plan, read_only)

    def refresh_tenant_sql(self, plan: DatabasePlan) -> list[str]:
        return self._member(plan).refresh_tenant_sql(plan)

    def archive_status(self) -> list[ArchiveStatus]:
        return [status for member in self.members.values() for status in member.archive_status()]

    def mark_point(self, plan: DatabasePlan, label: str) -> tuple[str, datetime]:
        return self._member(plan).mark_point(plan, label)

    def restorable_from(self, server: str | None) -> tuple[str, datetime] | None:
        """``server``'s, or (None) the latest of every member's: from then on, all of them are restorable."""
        if server is None:
            starts = [member.restorable_from(name) for name, member in self.members.items()]
            known = [start for start in starts if start is not None]
            return max(known, key=lambda start: start[1]) if known else None
        member = self.members.get(server)
        return member.restorable_from(server) if member is not None else None

    def request_backup_rebase(self, reason: str) -> list[str | None]:
        return [name for member in self.members.values() for name in member.request_backup_rebase(reason)]

    def rebase_backups(self) -> list[RebaseResult]:
        return [done for member in self.members.values() for done in member.rebase_backups()]

    def restore_database(self, plan: DatabasePlan, target: RecoveryTarget, into: DatabasePlan) -> None:
        if into.server not in (None, plan.server):
            raise ProviderError(f"database {plan.database} can only be restored on its own server {plan.server!r}")
        self._member(plan).restore_database(plan, target, into)

    def replace_database(self, plan: DatabasePlan, restored: DatabasePlan) -> None:
        self._member(plan).replace_database(plan, restored)

    def install_extension(self, plan: DatabasePlan, name: str) -> None:
        self._member(plan).install_extension(plan, name)

    def extension_status(self) -> dict[str, list[str]]:
        merged: dict[str, list[str]] = {"installed": [], "missing": []}
        for member_name, member in self.members.items():
            try:
                status = member.extension_status()
            except AgentpgError:
                continue
            merged["installed"] = sorted(set(merged["installed"]) | set(status["installed"]))
            merged["missing"] += [f"{name} (server {member_name})" for name in status["missing"]]
        return merged

    def usage(self, plan: DatabasePlan) -> UsageSample:
        return self._member(plan).usage(plan)

    def usage_many(self, plans: Sequence[DatabasePlan]) -> dict[str, UsageSample | AgentpgError]:
        """One request per server (a down server fails only its own databases)."""
        samples: dict[str, UsageSample | AgentpgError] = {}
        by_server: dict[str, list[DatabasePlan]] = {}
        for plan in plans:
            try:
                self._member(plan)
            except ProviderError as exc:
                samples[plan.database] = exc
                continue
            by_server.setdefault(str(plan.server), []).append(plan)
        for server, group in by_server.items():
            samples.update(self.members[server].usage_many(group))
        return samples

    def inventory(self) -> Inventory:
        """The union over every reachable server; raises if any is down, since a partial inventory would
        make ``reconcile`` call the missing server's databases orphans."""
        dbs: set[str] = set()
        roles: set[str] = set()
        for member in self.members.values():
            inv = member.inventory()
            dbs |= inv.databases
            roles |= inv.roles
        return Inventory(databases=frozenset(dbs), roles=frozenset(roles))

    def drop_orphan(self, *, database: str | None = None, role: str | None = None) -> None:
        for name in (database, role):
            if name is not None and not name.startswith(NAME_PREFIX):
                raise ProviderError(f"refusing to drop {name!r}: agentpg only drops what it made")
        for member in self.members.values():
            inv = member.inventory()
            if (database and database in inv.databases) or (role and role in inv.roles):
                member.drop_orphan(database=database if database in inv.databases else None,
                                   role=role if role in inv.roles else None)

    def check(self) -> None:
        """Ready while at least one server answers (new databases can still be placed)."""
        down = []
        for name, member in self.members.items():
            try:
                member.check()
            except ProviderError:
                down.append(name)
        if len(down) == len(self.members):
            raise ProviderUnavailable("no server of the fleet can be reached")

    def close(self) -> None:
        for member in self.members.values():
            member.close()
