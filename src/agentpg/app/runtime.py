"""Building agentpg from settings: the one place where engines, pools, the key ring and providers are made.

Edges open a :class:`Runtime` in their lifespan (the API) or per command (the CLI) and pass it down; nothing
is created at import time.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Engine

from agentpg.access.cache import Invalidation
from agentpg.access.guard import Reaper
from agentpg.catalog.engine import ensure_database, make_engine, migrate, session_factory
from agentpg.crypto import KeyRing, keyring_from_secret, load_or_create_keyring
from agentpg.embedded import EmbeddedPostgres, EmbeddedPostgresError
from agentpg.errors import AgentpgError, CatalogUnavailable, ProviderUnavailable
from agentpg.lifecycle.autovacuum import AutovacuumPacer
from agentpg.lifecycle.cpu_groups import find_cpu_groups
from agentpg.lifecycle.cpu_shares import CpuShares, CpuSharesJob, catalog_owners
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.lifecycle.session_bounds import SessionBounds, SessionBoundsJob, SessionLimits
from agentpg.lifecycle.warm import Refiller, WarmSizing
from agentpg.periodic import stop_all
from agentpg.providers.archiving import ArchiveJob, attach_archivers
from agentpg.providers.base import Provider
from agentpg.providers.extensions import ExtensionNotAllowed, check_allowed
from agentpg.providers.fleet import FleetProvider, server_name_of
from agentpg.providers.limits import TenantLimits
from agentpg.providers.local import LocalProvider
from agentpg.service import Service
from agentpg.settings import Settings
from agentpg.tokens import TokenStore, new_admin_secret
from agentpg.usage.budgets import UsagePolicy, UsageSyncer
from agentpg.usage.pricing import PriceTable
from agentpg.usage.storage import StorageGuard, blocked_users

log = logging.getLogger(__name__)


class StartupError(AgentpgError):
    """agentpg could not start: its Postgres, catalog or key is not usable. The message says how to fix it."""

    status = 503
    code = "startup_failed"


@dataclass
class Runtime:
    settings: Settings
    service: Service
    engine: Engine
    keyring: KeyRing
    admin_dsn: str
    embedded: EmbeddedPostgres | None
    refiller: Refiller
    """Keeps the warm pool full; only long-running processes (``serve``) start it."""
    usage_syncer: UsageSyncer
    """Syncs usage and enforces budgets periodically; only ``serve`` starts it."""
    autovacuum_pacer: AutovacuumPacer | None = None
    """Paces autovacuum on the embedded server as databases accumulate; only ``serve`` starts it."""
    archive_job: ArchiveJob | None = None
    """Continuous archiving of the servers (undo: providers/archive.py); only ``serve`` starts it."""
    storage_guard: StorageGuard | None = None
    """Checks every user's storage against AGENTPG_USER_STORAGE_LIMIT_MB every few seconds; only ``serve``."""
    cpu_shares: CpuSharesJob | None = None
    """Demotes the embedded server's backends of users over their CPU share; only ``serve`` starts it."""
    session_bounds: SessionBoundsJob | None = None
    """Ends tenants' own sessions past agentpg's bounds (lifecycle/session_bounds.py); only ``serve``."""

    def start_background_jobs(self) -> None:
        try:
            missing = self.service.deps.provider.extension_status()["missing"]
        except AgentpgError:
            missing = []
        if missing:  # said once, at start-up of a long-running process; `agentpg status` says it too
            log.warning("the PostgreSQL server lacks these extensions of AGENTPG_TENANT_EXTENSIONS; tenant "
                        "databases will not have them: %s", ", ".join(missing))
        self.refiller.start()
        self.usage_syncer.start()
        if self.autovacuum_pacer is not None:
            self.autovacuum_pacer.start()
        if self.archive_job is not None:
            self.archive_job.start()
        if self.storage_guard is not None:
            self.storage_guard.start()
        if self.cpu_shares is not None:
            self.cpu_shares.start()
        if self.session_bounds is not None:
            self.session_bounds.start()


def uses_embedded(settings: Settings) -> bool:
    """True when agentpg runs its own PostgreSQL server under ``home`` (no server DSN is configured)."""
    return settings.postgres_url is None and not settings.fleet


def prepare_home(settings: Settings) -> None:
    """Create the home if it does not exist; never loosen the permissions of one that does.

    As root the embedded server's unprivileged user must traverse (not list) the home to reach its data: a
    home agentpg creates is made 0711 for that; an existing one that user cannot traverse is an error that
    says which ``chmod`` to run (agentpg does not change permissions of a folder it did not create)."""
    home = settings.home
    as_root = os.geteuid() == 0
    if not home.exists():
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o711 if as_root and uses_embedded(settings) else 0o700)
        return
    if as_root and uses_embedded(settings) and not _traversable_by(home, settings.postgres_os_user):
        mode = stat.S_IMODE(home.stat().st_mode)
        raise StartupError(
            f"AGENTPG_HOME {home} is mode {mode:04o}: the embedded PostgreSQL server's user "
            f"{settings.postgres_os_user!r} cannot traverse it to reach its data. agentpg does not loosen the "
            f"permissions of a folder it did not create: run `chmod o+x {home}` (it lets others traverse, not "
            "list, the folder), or point AGENTPG_HOME at a path that does not exist yet and agentpg creates it")


def _traversable_by(path: Path, os_user: str) -> bool:
    """Whether ``os_user`` may traverse (search) ``path`` by its mode bits; an unknown user is left to the
    embedded server's own check, which names it."""
    try:
        user = pwd.getpwnam(os_user)
    except KeyError:
        return True
    st = path.stat()
    groups = {user.pw_gid, *(g.gr_gid for g in grp.getgrall() if os_user in g.gr_mem)}
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def admin_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The admin DSN: the configured server's, or the embedded server's (started if need be)."""
    if settings.postgres_url is not None:
        return settings.postgres_url.get_secret_value(), None
    if settings.fleet:  # the catalog lives on the fleet's first server unless AGENTPG_CATALOG_URL says otherwise
        return settings.fleet[0].get_secret_value(), None
    embedded = EmbeddedPostgres(settings.home, os_user=settings.postgres_os_user, fsync=settings.embedded_fsync,
                                extra_conf={"max_connections": str(settings.embedded_max_connections)},
                                backend_memory_mb=settings.embedded_backend_memory_mb)
    try:
        info = embedded.ensure_running()
    except EmbeddedPostgresError as exc:
        raise StartupError(f"the embedded PostgreSQL server could not start: {exc}") from None
    return info.dsn("postgres"), embedded


def admin_token(settings: Settings) -> str:
    """The platform's admin token: from settings, or made once into a 0600 file whose path is logged once."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.home / "admin-token"
    if not path.exists():
        tmp = path.with_name(f".admin-token.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(new_admin_secret())
        try:
            os.link(tmp, path)
            log.warning("generated the admin token; read it from %s (mode 0600)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def _existing_admin_token(settings: Settings) -> str:
    """The admin token if one exists; else a random one nobody holds (nothing is written)."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.home / "admin-token"
    try:
        return path.read_text().strip()
    except OSError:
        return new_admin_secret()


def usage_policy(settings: Settings) -> UsagePolicy:
    prices = PriceTable(storage_cents_per_gb_month=settings.price_storage_cents_per_gb_month,
                        compute_cents_per_hour=settings.price_compute_cents_per_hour,
                        written_cents_per_gb=settings.price_written_cents_per_gb,
                        transfer_cents_per_gb=settings.price_transfer_cents_per_gb,
                        backup_cents_per_gb_month=settings.price_backup_cents_per_gb_month,
                        bytes_per_written_row=settings.price_bytes_per_written_row)
    return UsagePolicy(prices=prices, default_budget_cents=settings.default_budget_cents,
                       warning_percent=settings.budget_warning_percent)


def make_provider(settings: Settings, admin: str) -> Provider:
    """Neon when asked for, the fleet when ``AGENTPG_FLEET`` lists servers, else the one server ``admin`` reaches."""
    try:
        extensions = check_allowed(settings.tenant_extensions)
    except ExtensionNotAllowed as exc:
        raise StartupError(f"AGENTPG_TENANT_EXTENSIONS: {exc}") from None
    if settings.provider == "neon":
        from agentpg.providers.neon import NeonProvider  # imported only when used: it brings httpx

        if settings.neon_api_key is None:
            raise StartupError("AGENTPG_PROVIDER=neon needs AGENTPG_NEON_API_KEY")
        neon = NeonProvider(settings.neon_api_key.get_secret_value(), base_url=settings.neon_api_url,
                            region_id=settings.neon_region_id, pg_version=settings.neon_pg_version,
                            org_id=settings.neon_org_id, connection_limit=settings.tenant_connection_limit,
                            connect_timeout_s=max(settings.connect_timeout_s, 15),
                            operation_timeout_s=settings.neon_operation_timeout_s,
                            requests_per_minute=settings.neon_requests_per_minute)
        neon.extensions = extensions  # not installed there: status and start-up say so
        return neon
    if settings.fleet or settings.provider == "fleet":
        dsns = [d.get_secret_value() for d in settings.fleet]
        return FleetProvider({server_name_of(d): d for d in dsns}, connection_limit=settings.tenant_connection_limit,
                             connect_timeout_s=settings.connect_timeout_s, extensions=extensions,
                             tenant_limits=TenantLimits.from_settings(settings))
    return LocalProvider(admin, connection_limit=settings.tenant_connection_limit,
                         connect_timeout_s=settings.connect_timeout_s, extensions=extensions,
                         tenant_limits=TenantLimits.from_settings(settings))


def keyring(settings: Settings) -> KeyRing:
    if settings.secret_key is not None:
        return keyring_from_secret(settings.secret_key.get_secret_value())
    return load_or_create_keyring(settings.home / "secret.key")


def catalog_dsn(settings: Settings, admin: str) -> str:
    if settings.catalog_url is not None:
        return settings.catalog_url.get_secret_value()
    try:
        ensure_database(admin, settings.catalog_database)
    except Exception:
        raise CatalogUnavailable("the PostgreSQL server for the catalog cannot be reached") from None
    return make_conninfo(admin, dbname=settings.catalog_database)


def _as_url(dsn: str) -> str:
    """SQLAlchemy needs a URL; turn a key=value DSN into one."""
    if "://" in dsn:
        return dsn
    from urllib.parse import quote

    p = conninfo_to_dict(dsn)
    auth = quote(str(p.get("user", "")), safe="")
    if p.get("password"):
        auth += ":" + quote(str(p["password"]), safe="")
    return f"postgresql://{auth}@{p.get('host', '127.0.0.1')}:{p.get('port', 5432)}/{p.get('dbname', 'postgres')}"


def attach_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The admin DSN of a server that already runs: for ``agentpg mcp``, which serves agents of an agentpg
    set up elsewhere (``agentpg serve``) and so never creates a home or starts a server of its own. Raises
    ``StartupError`` saying which home it looked in and what is missing."""
    home = settings.home
    origin = ("AGENTPG_HOME" if "home" in settings.model_fields_set or os.environ.get("AGENTPG_HOME")
              else "the default home; AGENTPG_HOME is unset")
    hint = ("set AGENTPG_HOME to the home `agentpg serve` uses (`GET /api/workspaces/{id}/mcp-config` gives "
            "the whole stdio config, AGENTPG_HOME included)")
    missing_key = settings.secret_key is None and not (home / "secret.key").is_file()
    if missing_key or (uses_embedded(settings) and not (home / "postgres" / "data").is_dir()):
        raise StartupError(f"no agentpg home at {home} ({origin}): agentpg mcp serves the agents of an "
                           f"agentpg set up by `agentpg serve` and creates no home of its own; {hint}")
    if not uses_embedded(settings):
        return admin_dsn(settings)
    embedded = EmbeddedPostgres(home, os_user=settings.postgres_os_user, fsync=settings.embedded_fsync,
                                extra_conf={"max_connections": str(settings.embedded_max_connections)},
                                backend_memory_mb=settings.embedded_backend_memory_mb)
    try:
        info = embedded.running_info()
    except EmbeddedPostgresError as exc:
        raise StartupError(f"the embedded PostgreSQL server of {home} cannot be reached: {exc}") from None
    if info is None:
        raise StartupError(f"no PostgreSQL server runs for the agentpg home {home} ({origin}): start "
                           f"`agentpg serve` with AGENTPG_HOME={home} first (agentpg mcp does not start one)")
    return info.dsn("postgres"), embedded


@contextmanager
def open_runtime(settings: Settings | None = None, *, migrate_catalog: bool = True,
                 attach_only: bool = False, invalidation: Invalidation | None = None) -> Iterator[Runtime]:
    """Start (or reach) Postgres, open and migrate the catalog, load the key ring; close it all on exit.

    ``attach_only`` (``agentpg mcp``): create nothing — no home, no server start, no key file, no admin
    token — and say exactly what is missing instead (:func:`attach_dsn`)."""
    settings = settings or Settings()
    if attach_only:
        admin, embedded = attach_dsn(settings)
    else:
        prepare_home(settings)
        admin, embedded = admin_dsn(settings)
    ring = keyring(settings)
    engine = make_engine(_as_url(catalog_dsn(settings, admin)), connect_timeout_s=settings.connect_timeout_s)
    refiller: Refiller | None = None
    syncer: UsageSyncer | None = None
    storage_guard: StorageGuard | None = None
    archive_job: ArchiveJob | None = None
    cpu_shares: CpuSharesJob | None = None
    session_bounds: SessionBoundsJob | None = None
    pacer = AutovacuumPacer(admin, settings.embedded_autovacuum_pace_s) if embedded is not None else None
    provider = make_provider(settings, admin)
    # Issue 18: the superuser that terminates backends agentpg gave up on (none on Neon: there, the role itself).
    administered = () if settings.provider == "neon" else (admin, *(d.get_secret_value() for d in settings.fleet))
    reaper = Reaper(administered)
    try:
        if migrate_catalog:
            migrate(engine)
        if embedded is not None and isinstance(provider, LocalProvider) and not attach_only:
            provider.harden_server()
        archive_job = ArchiveJob(attach_archivers(settings, provider, embedded))
        deps = LifecycleDeps(engine=engine, sessions=session_factory(engine), provider=provider, keyring=ring,
                             crashpoint=os.environ.get("AGENTPG_CRASHPOINT"),
                             invalidation=invalidation or Invalidation())
        warm_size = settings.warm_pool_size
        if settings.provider == "neon" and "warm_pool_size" not in settings.model_fields_set:
            warm_size = 0  # a warm Neon database is an idle project counted against the plan's project limit
        refiller = Refiller(deps, WarmSizing(base=warm_size, maximum=max(warm_size, settings.warm_pool_max)))
        deps.on_claim = refiller.kick
        status = embedded.status() if embedded is not None else None
        policy = usage_policy(settings)
        admin_secret = _existing_admin_token(settings) if attach_only else admin_token(settings)
        service = Service(deps, TokenStore(deps.sessions, admin_secret, invalidation=deps.invalidation),
                          embedded=embedded is not None, postgres_status=status, usage_policy=policy,
                          reaper=reaper, settings=settings)
        syncer = UsageSyncer(deps, policy.prices, settings.usage_sync_interval_s, policy.default_budget_cents)
        storage_every = settings.user_storage_check_interval_s
        if settings.provider == "neon" and storage_every:  # each database's size is one API call there
            storage_every = max(storage_every, settings.usage_sync_interval_s)
        if administered and not attach_only:
            session_bounds = SessionBoundsJob(SessionBounds(
                administered, catalog_owners(deps),
                SessionLimits(max_statement_s=settings.session_max_statement_s,
                              max_transaction_s=settings.session_max_transaction_s,
                              max_idle_s=settings.session_max_idle_s,
                              user_max_connections=settings.user_max_connections),
                own_pids=service.own_backend_pids, blocked_users=lambda: blocked_users(deps),
                other_instances=settings.serve_instances > 1,
            ), settings.session_check_interval_s)
        storage_guard = StorageGuard(deps, settings.user_storage_limit_mb, storage_every,
                                     policy.default_budget_cents,
                                     on_blocked=session_bounds.bounds.end_writes if session_bounds else None)
        if embedded is not None and not attach_only and settings.cpu_demoted_nice > 0:
            groups = find_cpu_groups(str(embedded.data_dir)) if settings.cpu_groups else None
            cpu_shares = CpuSharesJob(CpuShares(admin, catalog_owners(deps), settings.cpu_demoted_nice,
                                                groups=groups, demoted_idle=settings.cpu_demoted_idle),
                                      settings.cpu_shares_interval_s,
                                      serve_nice=settings.serve_nice)
        yield Runtime(settings=settings, service=service, engine=engine, keyring=ring, admin_dsn=admin,
                      embedded=embedded, refiller=refiller, usage_syncer=syncer, autovacuum_pacer=pacer,
                      archive_job=archive_job, storage_guard=storage_guard, cpu_shares=cpu_shares,
                      session_bounds=session_bounds)
    except ProviderUnavailable:
        raise
    finally:
        stop_all((archive_job, pacer, syncer, storage_guard, cpu_shares, session_bounds, refiller))
        provider.close()
        engine.dispose()
