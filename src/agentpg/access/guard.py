"""What keeps one tenant from starving the others on a shared server (issue 18): the limits every tenant role
carries, and the termination of backends agentpg gave up on.

**Role limits.** :func:`tenant_role_settings` lists the ``ALTER ROLE … SET`` defaults agentpg gives every
tenant role it creates (:meth:`agentpg.providers.local.LocalProvider._ensure_role`):

* ``temp_file_limit`` — a superuser-only setting: the role cannot ``SET`` it, ``set_config`` it, change or
  ``RESET`` its own role default for it, nor put it in a function's ``SET`` clause. It is enforced whoever
  connects as the role (agentpg, or a direct connection through the MCP gateway).
* ``work_mem`` and ``maintenance_work_mem`` — *defaults only*: Postgres lets any role ``SET`` them (no
  maximum exists for a user-settable parameter). agentpg's own connections also start with them (startup
  packet, see :func:`agentpg.access.query.session_settings`) and MCP refuses ``SET``/``set_config``, but a
  function that runs ``SET`` in dynamic SQL, or a direct connection, can raise them. docs/limits.md says so.
* ``client_connection_check_interval`` — so a backend whose client went away notices it while it runs and
  ends itself (it can lower it too: this is a backstop, the termination below is the guarantee).

They are process-wide, set from :class:`~agentpg.settings.Settings` by :func:`configure_from_settings` when a
runtime opens; :func:`configure_role_limits` changes them (tests).

**Termination.** :func:`terminate_backend` ends a tenant backend by pid with ``pg_terminate_backend`` (which
no plpgsql handler can catch), as agentpg's admin when this process knows the admin DSN of the tenant's server
(:func:`register_admin_dsn`, called by the runtime for the servers it manages), else as the tenant's own role
(a role may terminate its own backends; this is the fallback for servers agentpg has no admin on, e.g. Neon).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from agentpg.settings import Settings

log = logging.getLogger(__name__)

#: ``client_connection_check_interval`` of tenant roles and of agentpg's tenant connections.
CONNECTION_CHECK_INTERVAL_MS = 1000


@dataclass(frozen=True)
class RoleLimits:
    temp_file_limit_mb: int = 1024
    work_mem_mb: int = 4
    maintenance_work_mem_mb: int = 64


_limits = RoleLimits()


def role_limits() -> RoleLimits:
    """The limits new tenant roles get."""
    return _limits


def configure_role_limits(*, temp_file_limit_mb: int, work_mem_mb: int, maintenance_work_mem_mb: int) -> None:
    """Set the limits roles created from now on get (existing roles keep theirs until re-created)."""
    global _limits
    for name, value in (("temp_file_limit_mb", temp_file_limit_mb), ("work_mem_mb", work_mem_mb),
                        ("maintenance_work_mem_mb", maintenance_work_mem_mb)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number of MB")
    _limits = RoleLimits(temp_file_limit_mb=temp_file_limit_mb, work_mem_mb=work_mem_mb,
                         maintenance_work_mem_mb=maintenance_work_mem_mb)


def configure_from_settings(settings: Settings) -> None:
    """Take ``AGENTPG_TENANT_TEMP_FILE_LIMIT_MB``, ``…_WORK_MEM_MB`` and ``…_MAINTENANCE_WORK_MEM_MB``."""
    configure_role_limits(temp_file_limit_mb=settings.tenant_temp_file_limit_mb,
                          work_mem_mb=settings.tenant_work_mem_mb,
                          maintenance_work_mem_mb=settings.tenant_maintenance_work_mem_mb)


def tenant_role_settings() -> tuple[tuple[str, str], ...]:
    """``(name, value)`` pairs every tenant role gets with ``ALTER ROLE … SET`` (values are agentpg's own)."""
    limits = _limits
    return (("temp_file_limit", f"{limits.temp_file_limit_mb}MB"),
            ("work_mem", f"{limits.work_mem_mb}MB"),
            ("maintenance_work_mem", f"{limits.maintenance_work_mem_mb}MB"),
            ("client_connection_check_interval", f"{CONNECTION_CHECK_INTERVAL_MS}ms"))


def session_limits() -> tuple[tuple[str, str], ...]:
    """The user-settable limits agentpg's own tenant connections start with (startup packet)."""
    limits = _limits
    return (("work_mem", f"{limits.work_mem_mb}MB"),
            ("maintenance_work_mem", f"{limits.maintenance_work_mem_mb}MB"),
            ("client_connection_check_interval", f"{CONNECTION_CHECK_INTERVAL_MS}ms"))


# -- admin DSNs, by server -------------------------------------------------------------------------------------

_ADMIN_DSNS: dict[tuple[str, int], str] = {}


def _server_of(dsn: str) -> tuple[str, int] | None:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return None
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    try:
        port = int(str(params.get("port") or 5432).split(",")[0])
    except ValueError:
        return None
    return host, port


def register_admin_dsn(dsn: str) -> None:
    """agentpg administers the server ``dsn`` reaches: terminate tenant backends there as this superuser."""
    server = _server_of(dsn)
    if server is not None:
        _ADMIN_DSNS[server] = dsn


def admin_dsn_for(uri: str) -> str | None:
    server = _server_of(uri)
    return None if server is None else _ADMIN_DSNS.get(server)


async def terminate_backend(uri: str, pid: int, *, wait_s: float = 5.0, connect_timeout_s: int = 5) -> bool:
    """End backend ``pid`` of ``uri``'s role and database, and wait (up to ``wait_s``) until it has exited.

    Only a backend of that role in that database is touched (a pid is never trusted alone). True if it is
    gone (or was already); False if it could not be terminated (the server unreachable, no right to).
    Never raises.
    """
    parts = urlsplit(uri)
    role, database = unquote(parts.username or ""), unquote(parts.path.lstrip("/"))
    admin = admin_dsn_for(uri)
    started = time.monotonic()
    for dsn, who in ((admin, "admin"), (uri, "role")):
        if dsn is None:
            continue
        try:
            async with await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, connect_timeout=connect_timeout_s,
                    application_name="agentpg reaper") as conn:
                row = await (await conn.execute(
                    "SELECT coalesce(bool_and(pg_terminate_backend(pid, %s)), true) FROM pg_stat_activity "
                    "WHERE pid = %s AND usename = %s AND datname = %s",
                    (max(1, int(wait_s * 1000)), pid, role, database))).fetchone()
            gone = bool(row and row[0])
            log.info("terminated a tenant backend agentpg gave up on (as %s, %.0f ms, gone: %s)", who,
                     (time.monotonic() - started) * 1000, gone)
            return gone
        except psycopg.Error as exc:
            log.warning("could not terminate a tenant backend as %s: %s", who, type(exc).__name__)
        except OSError as exc:
            log.warning("could not terminate a tenant backend as %s: %s", who, type(exc).__name__)
    return False


def forget_admin_dsns() -> None:
    """Drop every registered admin DSN (tests)."""
    _ADMIN_DSNS.clear()
