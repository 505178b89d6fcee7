"""Connection pools to tenant databases: one small async pool per (database, role), kept in an LRU.

Idle tenants cost nothing: a pool opens no connection until asked (``min_size=0``), closes connections idle
for ``max_idle`` seconds, and the least recently used pool is closed when more than ``max_pools`` exist.
Every connection is reset with ``DISCARD ALL`` before it goes back, so whatever a call changed in its
session (a setting, a temp table, an advisory lock, a prepared statement) cannot leak into the next call.

Pools are keyed by a hash of the URI, never the URI itself, and no URI is ever logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agentpg.errors import AgentpgError, ProviderUnavailable
from agentpg.settings import Settings

log = logging.getLogger(__name__)


class PoolExhausted(AgentpgError):
    """Every connection of this database and role is busy: back-pressure, retry shortly."""

    status = 429
    code = "pool_exhausted"


@dataclass(frozen=True)
class PoolLimits:
    max_size: int = 5
    max_idle_s: float = 60.0
    acquire_timeout_s: float = 10.0
    max_pools: int = 1000
    connect_timeout_s: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolLimits:
        """The limits ``AGENTPG_TENANT_POOL_*`` and ``AGENTPG_CONNECT_TIMEOUT_S`` configure."""
        return cls(max_size=settings.tenant_pool_max_size, acquire_timeout_s=settings.tenant_pool_acquire_timeout_s,
                   connect_timeout_s=settings.connect_timeout_s)


#: What DISCARD ALL does, as statements that may follow a COMMIT/ROLLBACK in one Query message (DISCARD ALL
#: itself refuses to run in a multi-statement string). The query path ends each call with
#: ``ROLLBACK; <this>`` (one round trip instead of two) and then :func:`mark_reset`.
RESET_STATEMENTS = ("CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
                    "SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES")
_RESET_DONE: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()


def mark_reset(conn: AsyncConnection[Any]) -> None:
    """``conn`` has just run :data:`RESET_STATEMENTS` successfully: the pool need not reset it again."""
    _RESET_DONE.add(conn)


async def _reset(conn: AsyncConnection[object]) -> None:
    if conn in _RESET_DONE:
        _RESET_DONE.discard(conn)
        return
    await conn.execute("DISCARD ALL")


async def _configure(conn: AsyncConnection[object]) -> None:
    # DISCARD ALL also drops prepared statements, so never let psycopg prepare any behind our back.
    conn.prepare_threshold = None
    # DISCARD ALL cannot run inside a transaction block, which is where a non-autocommit connection's
    # execute() would put it: the reset would fail and the pool would throw every connection away. Callers
    # open their transactions explicitly (``conn.transaction()``).
    await conn.set_autocommit(True)


class TenantPools:
    """The LRU of pools. Create one per process in a lifespan; ``close()`` it on the way out."""

    def __init__(self, limits: PoolLimits | None = None) -> None:
        self.limits = limits or PoolLimits()
        self._pools: OrderedDict[str, AsyncConnectionPool[AsyncConnection[object]]] = OrderedDict()
        self._lock = asyncio.Lock()

    @staticmethod
    def _key(uri: str) -> str:
        return hashlib.sha256(uri.encode()).hexdigest()

    async def _pool(self, uri: str) -> AsyncConnectionPool[AsyncConnection[object]]:
        key = self._key(uri)
        async with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            pool = AsyncConnectionPool(
                uri, min_size=0, max_size=self.limits.max_size, max_idle=self.limits.max_idle_s,
                timeout=self.limits.acquire_timeout_s, reset=_reset, configure=_configure, open=False,
                # Autocommit, so DISCARD ALL can run on return (it refuses to run inside a transaction);
                # every call opens its own transaction explicitly with conn.transaction().
                kwargs={"connect_timeout": self.limits.connect_timeout_s, "application_name": "agentpg",
                        "autocommit": True},
                name=f"tenant-{key[:8]}", reconnect_timeout=30,
            )
            await pool.open(wait=False)
            self._pools[key] = pool
            evicted = []
            while len(self._pools) > self.limits.max_pools:
                evicted.append(self._pools.popitem(last=False)[1])
        for old in evicted:
            await old.close()
        return pool

    @asynccontextmanager
    async def connection(self, uri: str) -> AsyncIterator[AsyncConnection[object]]:
        """A connection to ``uri`` for one call. Raises ``PoolExhausted`` or ``ProviderUnavailable``."""
        pool = await self._pool(uri)
        errors_before = pool.get_stats().get("connections_errors", 0)
        try:
            async with pool.connection() as conn:
                yield conn
        except PoolTimeout:
            # psycopg_pool raises PoolTimeout both when all connections are busy and when none can be made:
            # no connection at all, or connection attempts failing while we waited, mean the latter.
            stats = pool.get_stats()
            if stats.get("pool_size", 0) == 0 or stats.get("connections_errors", 0) > errors_before:
                raise ProviderUnavailable("the database server cannot be reached right now; retry shortly") from None
            raise PoolExhausted("too many concurrent calls on this database; retry shortly") from None

    async def discard_broken(self, uri: str) -> None:
        """A connection of ``uri``'s pool turned out dead (the server restarted, or killed it): check every idle
        connection of that pool now and drop the dead ones, so the next checkout gets a live one."""
        pool = self._pools.get(self._key(uri))
        if pool is not None:
            try:
                await pool.check()
            except Exception as exc:  # a check that fails only means the next checkout connects afresh
                log.warning("checking a tenant pool failed: %s", type(exc).__name__)

    async def forget(self, uri: str) -> None:
        """Close the pool of a database or role that is being dropped or re-passworded."""
        async with self._lock:
            pool = self._pools.pop(self._key(uri), None)
        if pool is not None:
            await pool.close()

    async def close(self) -> None:
        async with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)

    def __len__(self) -> int:
        return len(self._pools)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.OperationalError)


def is_connection_lost(exc: BaseException) -> bool:
    """The connection itself failed (no server answer, a connection-class SQLSTATE 08…, or the server
    shutting down or not yet accepting, 57P…), as opposed to the statement failing."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))
