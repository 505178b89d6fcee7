"""Connection pools to tenant databases: one small async pool per (database, role), kept in an LRU.

Idle tenants cost nothing: a pool opens no connection until asked (``min_size=0``), closes connections idle
for ``max_idle`` seconds, and the least recently used pool is closed when more than ``max_pools`` exist.
Every connection is reset with ``DISCARD ALL`` before it goes back, so whatever a call changed in its
session (a setting, a temp table, an advisory lock, a prepared statement) cannot leak into the next call.

Pools are keyed by a hash of the URI, never the URI itself, and no URI is ever logged.

With a :class:`~agentpg.access.governor.Governor` (``serve`` and ``agentpg mcp`` make one), every call also
holds one of its server's call slots, handed out fairly between users, and a pool opens a connection only
within the grants the governor gave it: the connections all pools hold on one server stay within its budget.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import PoolTimeout

from agentpg.access.governed_pool import GovernedPool
from agentpg.access.governor import Governor, ServerGate
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


#: Session settings a pool's connections start with, as (name, value) pairs, e.g.
#: ``(("default_transaction_read_only", "on"),)``. They are sent in the startup packet (``options``), so
#: they are the session's *defaults*: ``RESET ALL`` (part of ``DISCARD ALL``) returns to them, and a role's
#: or database's own ``ALTER ... SET`` cannot override them.
SessionSettings = tuple[tuple[str, str], ...]


def startup_options(uri: str, session: SessionSettings) -> str | None:
    """The ``options`` connection parameter: whatever ``uri`` already carries (e.g. a Neon endpoint id)
    followed by ``-c name=value`` for each setting. Names and values are agentpg's own constants; a space or
    backslash in a value is escaped as libpq's options syntax requires."""
    existing = conninfo_to_dict(uri).get("options")
    parts = [str(existing)] if existing else []
    for name, value in session:
        escaped = value.replace("\\", "\\\\").replace(" ", "\\ ")
        parts.append(f"-c {name}={escaped}")
    return " ".join(parts) or None


async def _configure(conn: AsyncConnection[object]) -> None:
    # DISCARD ALL also drops prepared statements, so never let psycopg prepare any behind our back.
    conn.prepare_threshold = None
    # DISCARD ALL cannot run inside a transaction block, which is where a non-autocommit connection's
    # execute() would put it: the reset would fail and the pool would throw every connection away. Callers
    # open their transactions explicitly (``conn.transaction()``).
    await conn.set_autocommit(True)


@functools.lru_cache(maxsize=4096)
def _pool_key(uri: str, session: SessionSettings) -> str:
    """Hashing the URI on every call costs more than the rest of the lookup; remembered per process."""
    settings = hashlib.sha256(repr(session).encode()).hexdigest()[:16] if session else ""
    return f"{hashlib.sha256(uri.encode()).hexdigest()}:{settings}"


@dataclass(eq=False)
class _Entry:
    """One pool, the user it serves (for the governor's fair share) and its server's gate."""

    pool: GovernedPool
    user: str
    gate: ServerGate | None
    active: int = 0
    """Calls holding a call slot for this pool."""
    last_used: float = field(default_factory=time.monotonic)


class TenantPools:
    """The LRU of pools. Create one per process in a lifespan; ``close()`` it on the way out. ``governor``
    (shared by every TenantPools of the process) keeps the connections to each server within its budget."""

    def __init__(self, limits: PoolLimits | None = None, *, governor: Governor | None = None) -> None:
        self.limits = limits or PoolLimits()
        self.governor = governor
        self._pools: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = asyncio.Lock()
        self._already_reset: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()
        self._opened: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()

    def backend_pids(self) -> set[int]:
        """The server pids of the connections these pools hold (open ones): the session bounds leave them alone,
        as agentpg's own statements have their own timeouts (lifecycle/session_bounds.py)."""
        for _ in range(3):  # read from another thread while the event loop may add to the set
            try:
                return {conn.info.backend_pid for conn in list(self._opened) if not conn.closed}
            except RuntimeError:
                continue
        return set()

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        self._opened.add(conn)
        await _configure(conn)

    def mark_reset(self, conn: AsyncConnection[Any]) -> None:
        """``conn``'s session was just ``DISCARD ALL``-ed by its caller (a read does it in the same round trip):
        the pool need not do it again when the connection comes back."""
        self._already_reset.add(conn)

    async def _reset(self, conn: AsyncConnection[Any]) -> None:
        # Run by the pool's worker after the connection is handed back (psycopg_pool returns connections in a
        # background task when a reset is configured): the caller's answer never waits for this round trip.
        if conn in self._already_reset:
            self._already_reset.discard(conn)
            return
        await conn.execute("DISCARD ALL")

    @staticmethod
    def _key(uri: str, session: SessionSettings = ()) -> str:
        """The pool's key: a hash of the URI (never the URI itself), then one of the settings."""
        return _pool_key(uri, session)

    async def _pool(self, uri: str, session: SessionSettings, user: str | None = None) -> _Entry:
        key = self._key(uri, session)
        entry = self._pools.get(key)
        if entry is not None:  # the common case, without the lock: nothing awaits between lookup and move
            self._pools.move_to_end(key)
            return entry
        gate = await self.governor.gate(uri) if self.governor is not None else None
        async with self._lock:
            entry = self._pools.get(key)
            if entry is not None:  # made while this call waited for the lock
                self._pools.move_to_end(key)
                return entry
            # Governed, a pool starts allowed no connection: each is granted as its calls need it.
            pool = GovernedPool(
                uri, min_size=0, max_size=self.limits.max_size, start_empty=gate is not None,
                max_idle=self.limits.max_idle_s,
                timeout=self.limits.acquire_timeout_s, reset=self._reset, configure=self._configure, open=False,
                reset_done=self._already_reset.__contains__,  # a read's reset: returned without the worker
                # Autocommit, so DISCARD ALL can run on return (it refuses to run inside a transaction);
                # every call opens its own transaction explicitly with conn.transaction().
                kwargs={"connect_timeout": self.limits.connect_timeout_s, "application_name": "agentpg",
                        "autocommit": True, **({"options": startup_options(uri, session)} if session else {})},
                name=f"tenant-{key[:8]}", reconnect_timeout=30,
                connection_class=gate.connection_class() if gate is not None else AsyncConnection,
            )
            await pool.open(wait=False)
            entry = _Entry(pool, user or f"db:{key[:16]}", gate)
            if gate is not None:
                gate.register(entry)
            self._pools[key] = entry
            evicted = []
            while len(self._pools) > self.limits.max_pools:
                evicted.append(self._pools.popitem(last=False)[1])
        for old in evicted:
            await self._close_entry(old)
        return entry

    @staticmethod
    async def _close_entry(entry: _Entry) -> None:
        """Close the pool, then give its grants back (its connections are closed by then)."""
        try:
            await entry.pool.close()
        finally:
            if entry.gate is not None:
                entry.gate.unregister(entry)

    @asynccontextmanager
    async def connection(self, uri: str, session: SessionSettings = (), *,
                         user: str | None = None) -> AsyncIterator[AsyncConnection[object]]:
        """A connection to ``uri`` for one call, from the pool of connections that start with ``session``
        settings (one pool per URI and settings). ``user`` is whose call it is (the governor's fair share is
        per user; by default each database counts as its own user). Raises ``ServerBusy`` (governed: the
        server's budget stayed spent for the governor's wait), ``PoolExhausted`` or ``ProviderUnavailable``.

        Leave it idle (no transaction open) when the block ends; the pool resets it (``DISCARD ALL``) in the
        background before anyone else gets it."""
        entry = await self._pool(uri, session, user)
        gate = entry.gate
        if gate is None or self.governor is None:
            async with self._checkout(entry.pool) as conn:
                yield conn
            return
        async with self.governor.call(gate, entry.user, entry) as deadline:
            entry.active += 1
            entry.last_used = time.monotonic()
            try:
                await gate.ensure_connection(entry, self.limits.max_size, deadline)
                # The wait for the pool's connection is the governor's wait too (at least a connect's time):
                # a server that refuses connects for want of a slot is busy, not unreachable.
                timeout = max(deadline - time.monotonic(), float(self.limits.connect_timeout_s))
                try:
                    async with self._checkout(entry.pool, timeout) as conn:
                        yield conn
                except ProviderUnavailable:
                    if gate.recently_refused():
                        raise gate.busy() from None
                    raise
            finally:
                entry.active -= 1

    @staticmethod
    @asynccontextmanager
    async def _checkout(pool: GovernedPool, timeout: float | None = None) -> AsyncIterator[AsyncConnection[object]]:
        errors_before = pool.get_stats().get("connections_errors", 0)
        try:
            async with pool.connection(timeout=timeout) as conn:
                yield conn
        except PoolTimeout:
            # psycopg_pool raises PoolTimeout both when all connections are busy and when none can be made:
            # no connection at all, or connection attempts failing while we waited, mean the latter.
            stats = pool.get_stats()
            if stats.get("pool_size", 0) == 0 or stats.get("connections_errors", 0) > errors_before:
                raise ProviderUnavailable("the database server cannot be reached right now; retry shortly") from None
            raise PoolExhausted("too many concurrent calls on this database; retry shortly") from None

    async def discard_broken(self, uri: str, session: SessionSettings = ()) -> None:
        """A connection of ``uri``'s pool turned out dead (the server restarted, or killed it): check every idle
        connection of that pool now and drop the dead ones, so the next checkout gets a live one."""
        entry = self._pools.get(self._key(uri, session))
        if entry is not None:
            try:
                await entry.pool.check()
            except Exception as exc:  # a check that fails only means the next checkout connects afresh
                log.warning("checking a tenant pool failed: %s", type(exc).__name__)

    async def forget(self, uri: str) -> None:
        """Close the pool of a database or role that is being dropped or re-passworded."""
        prefix = self._key(uri).partition(":")[0] + ":"
        async with self._lock:
            doomed = [self._pools.pop(key) for key in [k for k in self._pools if k.startswith(prefix)]]
        for entry in doomed:  # every settings variant of this URI
            await self._close_entry(entry)

    async def close(self) -> None:
        async with self._lock:
            entries = list(self._pools.values())
            self._pools.clear()
        await asyncio.gather(*(self._close_entry(e) for e in entries), return_exceptions=True)

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
