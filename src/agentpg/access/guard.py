"""What keeps one tenant from starving the others on a shared server (issue 18): the limits every tenant role
carries (:class:`agentpg.providers.limits.TenantLimits`), and the termination of backends agentpg gave up on
(:class:`Reaper`).

**Role limits.** :meth:`TenantLimits.role_settings` lists the ``ALTER ROLE … SET`` defaults agentpg gives every
tenant login role it creates (:meth:`agentpg.providers.local.LocalProvider._ensure_role`):

* ``temp_file_limit`` — a superuser-only setting: the role cannot ``SET`` it, ``set_config`` it, change or
  ``RESET`` its own role default for it, nor put it in a function's ``SET`` clause. It is enforced whoever
  connects as the role (agentpg, or a direct connection through the MCP gateway).
* ``work_mem`` and ``maintenance_work_mem`` — *defaults only*: Postgres lets any role ``SET`` them (no
  maximum exists for a user-settable parameter). agentpg's own connections also start with them (startup
  packet, :meth:`TenantLimits.session_settings`) and MCP refuses ``SET``/``set_config``, but a function that
  runs ``SET`` in dynamic SQL, or a direct connection, can raise them. docs/limits.md says so.
* ``client_connection_check_interval`` — so a backend whose client went away notices it while it runs and
  ends itself (it can lower it too: this is a backstop, the termination below is the guarantee).

The runtime builds one :class:`TenantLimits` from :class:`~agentpg.settings.Settings` and hands it to the
provider (role defaults) and to the query limits (session settings); nothing here is process-wide.

**Termination.** :meth:`Reaper.terminate` ends a tenant backend by pid with ``pg_terminate_backend`` (which no
plpgsql handler can catch), as agentpg's admin when the reaper was given the admin DSN of the tenant's server
(the runtime gives it the servers it manages), else as the tenant's own role (a role may terminate its own
backends; this is the fallback for servers agentpg has no admin on, e.g. Neon).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import psycopg
from psycopg.conninfo import conninfo_to_dict

log = logging.getLogger(__name__)

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


class Reaper:
    """Terminates tenant backends agentpg gave up on; ``admin_dsns`` are the servers agentpg administers
    (secrets: kept in this object only, never logged)."""

    def __init__(self, admin_dsns: Iterable[str] = ()) -> None:
        self.terminated = 0
        """Backends ended (or found gone) after agentpg gave up on their statement (for /metrics)."""
        self.failed = 0
        """Terminations that failed (server unreachable, no right): their connection was closed anyway."""
        self._admin_dsns: dict[tuple[str, int], str] = {}
        for dsn in admin_dsns:
            server = _server_of(dsn)
            if server is not None:
                self._admin_dsns[server] = dsn

    def admin_dsn_for(self, uri: str) -> str | None:
        """The admin DSN of the server ``uri`` reaches, if agentpg administers it."""
        server = _server_of(uri)
        return None if server is None else self._admin_dsns.get(server)

    async def terminate(self, uri: str, pid: int, *, wait_s: float = 5.0, connect_timeout_s: int = 5) -> bool:
        """End backend ``pid`` of ``uri``'s role and database, and wait (up to ``wait_s``) until it has exited.

        Only a backend of that role in that database is touched (a pid is never trusted alone). True if it is
        gone (or was already); False if it could not be terminated (the server unreachable, no right to).
        Never raises.
        """
        try:  # a URI or a key=value DSN
            params = conninfo_to_dict(uri)
        except psycopg.ProgrammingError:
            self.failed += 1
            return False
        role, database = str(params.get("user") or ""), str(params.get("dbname") or "")
        timeout_ms = max(1, int(wait_s * 1000))
        started = time.monotonic()
        for dsn, who in ((self.admin_dsn_for(uri), "admin"), (uri, "role")):
            if dsn is None:
                continue
            if who == "admin":
                # The admin could end anyone's backend: only a pid of this role, in this database, is ended. No
                # such pid at all: gone. The pid someone else's (it cannot be ours): not ended, not "gone".
                statement = ("SELECT CASE WHEN NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %(pid)s) "
                             "THEN true ELSE coalesce((SELECT bool_and(pg_terminate_backend(pid, %(wait)s)) "
                             "FROM pg_stat_activity WHERE pid = %(pid)s AND usename = %(role)s "
                             "AND datname = %(db)s), false) END")
                args: dict[str, object] | tuple[object, ...] = {"pid": pid, "wait": timeout_ms, "role": role,
                                                                 "db": database}
            else:
                # A tenant role cannot read pg_stat_activity (agentpg revokes it) and Postgres lets it signal only
                # backends of roles it belongs to (a foreign pid is an error). False is "not a backend" or "still
                # there after the wait": a second signal without a wait tells them apart (false: no such backend).
                statement = ("SELECT CASE WHEN pg_terminate_backend(%s, %s) THEN true "
                             "ELSE NOT pg_terminate_backend(%s) END")
                args = (pid, timeout_ms, pid)
            try:
                async with await psycopg.AsyncConnection.connect(
                        dsn, autocommit=True, connect_timeout=connect_timeout_s,
                        application_name="agentpg reaper") as conn:
                    row = await (await conn.execute(statement, args)).fetchone()
                gone = bool(row and row[0])
                if gone:
                    self.terminated += 1
                else:
                    self.failed += 1
                log.info("terminated a tenant backend agentpg gave up on (as %s, %.0f ms, gone: %s)", who,
                         (time.monotonic() - started) * 1000, gone)
                return gone
            except (psycopg.Error, OSError) as exc:
                log.warning("could not terminate a tenant backend as %s: %s", who, type(exc).__name__)
        self.failed += 1
        return False
