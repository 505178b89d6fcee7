"""Building agentpg from settings: the one place where engines, pools, the key ring and providers are made.

Edges open a :class:`Runtime` in their lifespan (the API) or per command (the CLI) and pass it down; nothing
is created at import time.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy import Engine

from agentpg.catalog.engine import ensure_database, make_engine, migrate, session_factory
from agentpg.crypto import KeyRing, keyring_from_secret, load_or_create_keyring
from agentpg.embedded import EmbeddedPostgres, EmbeddedPostgresError
from agentpg.errors import AgentpgError, CatalogUnavailable, ProviderUnavailable
from agentpg.lifecycle.autovacuum import AutovacuumPacer
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.lifecycle.warm import Refiller
from agentpg.providers.base import Provider
from agentpg.providers.fleet import FleetProvider, server_name_of
from agentpg.providers.local import LocalProvider
from agentpg.service import Service
from agentpg.settings import Settings
from agentpg.tokens import TokenStore
from agentpg.usage.budgets import UsagePolicy, UsageSyncer
from agentpg.usage.pricing import PriceTable

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

    def start_background_jobs(self) -> None:
        self.refiller.start()
        self.usage_syncer.start()
        if self.autovacuum_pacer is not None:
            self.autovacuum_pacer.start()


def prepare_home(settings: Settings) -> None:
    settings.home.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # The embedded server's unprivileged user must traverse (not list) the home to reach its data.
        settings.home.chmod(0o711)


def admin_dsn(settings: Settings) -> tuple[str, EmbeddedPostgres | None]:
    """The admin DSN: the configured server's, or the embedded server's (started if need be)."""
    if settings.postgres_url is not None:
        return settings.postgres_url.get_secret_value(), None
    if settings.fleet:  # the catalog lives on the fleet's first server unless AGENTPG_CATALOG_URL says otherwise
        return settings.fleet[0].get_secret_value(), None
    embedded = EmbeddedPostgres(settings.home, os_user=settings.postgres_os_user, fsync=settings.embedded_fsync)
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
            handle.write("apg_a_" + secrets.token_urlsafe(32))
        try:
            os.link(tmp, path)
            log.warning("generated the admin token; read it from %s (mode 0600)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


def usage_policy(settings: Settings) -> UsagePolicy:
    prices = PriceTable(storage_cents_per_gb_month=settings.price_storage_cents_per_gb_month,
                        compute_cents_per_hour=settings.price_compute_cents_per_hour,
                        written_cents_per_gb=settings.price_written_cents_per_gb,
                        transfer_cents_per_gb=settings.price_transfer_cents_per_gb,
                        bytes_per_written_row=settings.price_bytes_per_written_row)
    return UsagePolicy(prices=prices, default_budget_cents=settings.default_budget_cents,
                       warning_percent=settings.budget_warning_percent)


def make_provider(settings: Settings, admin: str) -> Provider:
    """Neon when asked for, the fleet when ``AGENTPG_FLEET`` lists servers, else the one server ``admin`` reaches."""
    if settings.provider == "neon":
        from agentpg.providers.neon import NeonProvider  # imported only when used: it brings httpx

        if settings.neon_api_key is None:
            raise StartupError("AGENTPG_PROVIDER=neon needs AGENTPG_NEON_API_KEY")
        return NeonProvider(settings.neon_api_key.get_secret_value(), base_url=settings.neon_api_url,
                            region_id=settings.neon_region_id, pg_version=settings.neon_pg_version,
                            org_id=settings.neon_org_id, connection_limit=settings.tenant_connection_limit,
                            connect_timeout_s=max(settings.connect_timeout_s, 15),
                            operation_timeout_s=settings.neon_operation_timeout_s,
                            requests_per_minute=settings.neon_requests_per_minute)
    if settings.fleet or settings.provider == "fleet":
        dsns = [d.get_secret_value() for d in settings.fleet]
        return FleetProvider({server_name_of(d): d for d in dsns}, connection_limit=settings.tenant_connection_limit,
                             connect_timeout_s=settings.connect_timeout_s)
    return LocalProvider(admin, connection_limit=settings.tenant_connection_limit,
                         connect_timeout_s=settings.connect_timeout_s)


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


@contextmanager
def open_runtime(settings: Settings | None = None, *, migrate_catalog: bool = True) -> Iterator[Runtime]:
    """Start (or reach) Postgres, open and migrate the catalog, load the key ring; close it all on exit."""
    settings = settings or Settings()
    prepare_home(settings)
    admin, embedded = admin_dsn(settings)
    ring = keyring(settings)
    engine = make_engine(_as_url(catalog_dsn(settings, admin)), connect_timeout_s=settings.connect_timeout_s)
    refiller: Refiller | None = None
    syncer: UsageSyncer | None = None
    pacer = AutovacuumPacer(admin, settings.embedded_autovacuum_pace_s) if embedded is not None else None
    provider = make_provider(settings, admin)
    try:
        if migrate_catalog:
            migrate(engine)
        if embedded is not None and isinstance(provider, LocalProvider):
            provider.harden_server()
        deps = LifecycleDeps(engine=engine, sessions=session_factory(engine), provider=provider, keyring=ring,
                             crashpoint=os.environ.get("AGENTPG_CRASHPOINT"))
        warm_size = settings.warm_pool_size
        if settings.provider == "neon" and "warm_pool_size" not in settings.model_fields_set:
            warm_size = 0  # a warm Neon database is an idle project counted against the plan's project limit
        refiller = Refiller(deps, warm_size)
        deps.on_claim = refiller.kick
        status = embedded.status() if embedded is not None else None
        policy = usage_policy(settings)
        service = Service(deps, TokenStore(deps.sessions, admin_token(settings)),
                          embedded=embedded is not None, postgres_status=status, usage_policy=policy)
        syncer = UsageSyncer(deps, policy.prices, settings.usage_sync_interval_s, policy.default_budget_cents)
        yield Runtime(settings=settings, service=service, engine=engine, keyring=ring, admin_dsn=admin,
                      embedded=embedded, refiller=refiller, usage_syncer=syncer, autovacuum_pacer=pacer)
    except ProviderUnavailable:
        raise
    finally:
        if pacer is not None:
            pacer.stop()
        if syncer is not None:
            syncer.stop()
        if refiller is not None:
            refiller.stop()
        provider.close()
        engine.dispose()
