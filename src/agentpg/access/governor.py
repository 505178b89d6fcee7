"""A connection governor per Postgres server (issue 18): one budget of server connections shared by every
tenant pool of this process, handed out fairly between users.

Without it each (database, role) pool may open ``max_size`` connections and up to 1,000 pools exist, so a few
hundred busy agents exhaust ``max_connections`` and the next connect fails. With it, per server (``host:port``):

* **Calls** (a checkout of a tenant connection) hold one of ``budget`` call slots while they run. A call that
  finds none free waits in a queue served **round-robin between users**, a user under its fair share
  (``budget // users with calls running or waiting``) before one over it: one user's burst cannot hold more
  than its share while others wait, nor (alone) the last few slots another user's first call will need.
  After ``wait_s`` the call fails with :class:`ServerBusy` (HTTP 429 with ``Retry-After``, an MCP tool
  error): the server is busy, retry; never a connect failure.
* **Connections.** A pool may open a connection only within its *grants*: its ``max_size`` is the number of
  connections the governor granted it (:class:`GovernedPool`), and the grants of all pools of a server never
  exceed the budget, so the connections agentpg holds open on the server never do either. A pool whose calls
  need more connections than it holds gets a free grant, or takes one from another pool: an unused grant
  first (connections closed by idleness), else an idle connection of the least recently used pool is closed.

The budget of a server is ``AGENTPG_GOVERNOR_BUDGET`` if set, else derived from the server itself:
``(max_connections - superuser_reserved_connections - reserved_connections) // AGENTPG_SERVE_INSTANCES``
minus :data:`OWN_CONNECTIONS`. The reserved slots are *not* where agentpg's own (superuser) connections go:
Postgres gives a superuser any free slot and only refuses others once no more than the reserved ones are
free, so the catalog's, the provider's, the archiver's and the reaper's connections take ordinary slots, and
the tenants' share must leave room for them (bench/fair_sharing.py found connect refusals without this).
Should the server still refuse a governed connect for want of a slot (other clients: psql, the gateway's
children), the gate lowers its budget to what it holds for a while and the call waits, then gets
:class:`ServerBusy`, never "cannot be reached".
Nothing here is module state: a :class:`Governor` is made by the edge that makes the pools and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict

from agentpg.access.governed_pool import GovernedPool, SlotPatientConnection
from agentpg.errors import AgentpgError

log = logging.getLogger(__name__)

#: How many of the busiest users' figures the metrics show (by rank, never by id).
TOP_USERS = 5


class ServerBusy(AgentpgError):
    """The Postgres server's connection budget is spent and the call waited its turn in vain: retryable."""

    status = 429
    code = "server_busy"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


#: Superuser connections one agentpg process may hold on a server: the catalog's pool (5 + 10 overflow), the
#: provider's maintenance pool (4) and direct connections (8), the archiver (2) and the reaper (3).
OWN_CONNECTIONS = 32

#: How long a gate keeps a budget it lowered after the server refused a connection for want of a slot.
LOWERED_FOR_S = 30.0


@dataclass(frozen=True)
class GovernorConfig:
    budget: int | None = None
    """Connections per server for this process; None: derived from the server (see the module docstring)."""
    instances: int = 1
    """serve processes sharing each server: a derived budget is divided between them."""
    wait_s: float = 5.0
    """How long a call may wait for a call slot or a connection before :class:`ServerBusy`."""
    user_cap: int | None = None
    """:attr:`ServerGate.user_cap` of every server (None: no cap beyond the fair share)."""
    own_connections: int = OWN_CONNECTIONS
    """Slots a derived budget leaves to this process's own superuser connections (see the module docstring)."""
    fallback_budget: int = 20
    """The budget of a server whose settings cannot be read (asked again after ``probe_retry_s``)."""
    probe_retry_s: float = 30.0
    connect_timeout_s: int = 5

    @classmethod
    def from_settings(cls, settings: Any) -> GovernorConfig:
        """``AGENTPG_GOVERNOR_BUDGET``, ``AGENTPG_GOVERNOR_WAIT_S``, ``AGENTPG_SERVE_INSTANCES``."""
        cap = settings.governor_user_cap
        return cls(budget=settings.governor_budget, instances=settings.serve_instances,
                   wait_s=settings.governor_wait_s, connect_timeout_s=settings.connect_timeout_s,
                   user_cap=None if cap < 0 else cap or 2 * (os.cpu_count() or 1))




class Holder(Protocol):
    """What the governor needs of a pool's entry."""

    user: str
    active: int
    last_used: float
    pool: GovernedPool


@dataclass
class ServerStats:
    waits: int = 0
    """Calls that had to queue for a call slot."""
    refusals: int = 0
    """Calls answered :class:`ServerBusy`."""
    terminations: int = 0
    """Idle connections of other pools closed to make room."""
    reclaimed: int = 0
    """Unused grants moved to another pool."""
    peak_open: int = 0
    """Most connections seen open at once (sampled when a grant is given)."""
    slot_refusals: int = 0
    """Connects the server refused for want of a slot although the budget allowed them."""


@dataclass
class ServerGate:
    """One server's budget: call slots with a fair queue, and connection grants."""

    name: str
    budget: int
    wait_s: float
    user_cap: int | None = None
    """Most calls one user may run at once while another user has calls running or waiting (None: only the
    fair share applies, and a lone user may take every slot). A connection budget shares out connections, not
    CPU: this is what keeps one user's CPU-heavy statements from taking every core while others wait (see the
    module docstring). A user alone may go over it, but leaves :meth:`headroom` slots free."""
    flight: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    granted: int = 0
    holders: dict[int, Holder] = field(default_factory=dict)
    stats: ServerStats = field(default_factory=ServerStats)
    _waiters: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)
    _grant_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    full_budget: int = 0
    """The budget as configured or derived; ``budget`` is lower for a while after a slot refusal."""
    lowered_until: float = 0.0
    _connection_class: type[SlotPatientConnection] | None = None

    def __post_init__(self) -> None:
        self.full_budget = self.full_budget or self.budget

    def connection_class(self) -> type[SlotPatientConnection]:
        """The connection class of this server's governed pools (it reports slot refusals here)."""
        if self._connection_class is None:
            self._connection_class = type("GovernedConnection", (SlotPatientConnection,), {"gate": self})
        return self._connection_class

    def slots_refused(self) -> None:
        """The server refused a connection for want of a slot although the budget allowed it (other clients
        hold slots): hold no more than what is open now, for :data:`LOWERED_FOR_S`; calls meanwhile wait their
        turn and get :class:`ServerBusy` rather than a connect failure."""
        self.stats.slot_refusals += 1
        # Open connections include the connects still under way, this failing one too: one fewer each time,
        # so concurrent refusals bring the budget down to what the server really lets agentpg hold.
        lowered = max(1, min(self.budget, self.open_connections()) - 1)
        if lowered < self.budget:
            log.warning("server %s refused a connection for want of a slot: holding %d connections (not %d) for "
                        "%.0f s", self.name, lowered, self.budget, LOWERED_FOR_S)
        self.budget = lowered
        self.lowered_until = time.monotonic() + LOWERED_FOR_S

    def recently_refused(self) -> bool:
        return time.monotonic() < self.lowered_until

    def set_budget(self, budget: int) -> None:
        """A new configured or derived budget (kept lowered while a recent slot refusal says so)."""
        self.full_budget = budget
        if not self.recently_refused():
            self.budget = budget

    # -- call slots --------------------------------------------------------------------------------------
    def queue_length(self) -> int:
        return sum(len(q) for q in self._waiters.values())

    def share(self) -> int:
        users = {u for u, n in self.flight.items() if n > 0} | set(self._waiters)
        return max(1, self.budget // max(1, len(users)))

    async def enter(self, user: str, deadline: float, holder: Holder | None = None) -> None:
        """Take a call slot for ``user``, waiting (fairly) until ``deadline`` (monotonic); else ServerBusy.
        ``holder`` is the pool the call will use (a waiter whose pool has a connection to spare goes first
        among its user's waiters)."""
        if self.calls < self.budget and not self._waiters and self._may_run(user):
            self._admit(user)
            return
        self.stats.waits += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fut, holder)
        self._waiters.setdefault(user, deque()).append(waiter)
        self._dispatch()
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                await asyncio.shield(fut)
        except BaseException as exc:
            queue = self._waiters.get(user)
            if queue is not None and waiter in queue:
                queue.remove(waiter)
                if not queue:
                    del self._waiters[user]
            if fut.done() and not fut.cancelled():
                self.leave(user)  # granted just as the wait ended: hand it on
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise self.busy() from None
            raise

    def _admit(self, user: str) -> None:
        self.flight[user] = self.flight.get(user, 0) + 1
        self.calls += 1

    def leave(self, user: str) -> None:
        left = self.flight.get(user, 0) - 1
        if left > 0:
            self.flight[user] = left
        else:
            self.flight.pop(user, None)
        self.calls -= 1
        self._dispatch()

    def headroom(self) -> int:
        """Call slots a user alone leaves free (with a cap): another user's first call then starts at once
        instead of waiting for one of the busy user's statements to end (measured: ~30 ms at p50 under a flood,
        bench/README.md "Fair sharing"). At most :attr:`user_cap`, at most an eighth of the budget, at least 1."""
        return max(1, min(self.user_cap or 1, self.budget // 8))

    def _may_run(self, user: str) -> bool:
        """Under :attr:`user_cap`; or, over it, nobody else has calls running or waiting and the user leaves
        :meth:`headroom` slots free."""
        mine = self.flight.get(user, 0)
        if self.user_cap is None or mine < self.user_cap:
            return True
        alone = not any(n > 0 for u, n in self.flight.items() if u != user) and all(
            u == user for u in self._waiters)
        return alone and mine < self.budget - self.headroom()

    def _dispatch(self) -> None:
        while self.calls < self.budget and self._waiters:
            share = self.share()
            runnable = [u for u in self._waiters if self._may_run(u)]
            if not runnable:
                return  # every waiting user is at its cap while others run: a call's end dispatches again
            user = next((u for u in runnable if self.flight.get(u, 0) < share), runnable[0])
            queue = self._waiters[user]
            waiter = _pick(queue)
            fut = waiter.fut
            if queue:
                self._waiters.move_to_end(user)  # round-robin: this user's next waiter goes behind the others
            else:
                del self._waiters[user]
            if fut.done():
                continue
            fut.set_result(None)
            self._admit(user)

    def busy(self) -> ServerBusy:
        self.stats.refusals += 1
        return ServerBusy(f"the database server is busy: all {self.budget} connections agentpg may use on it are "
                          f"in use and this call waited {self.wait_s:g} s for one; retry in a second or two "
                          "(nothing of this call ran)", retry_after_s=1)

    # -- connection grants -------------------------------------------------------------------------------
    def open_connections(self) -> int:
        return sum(h.pool.open_connections() for h in self.holders.values())

    async def ensure_connection(self, holder: Holder, cap: int, deadline: float) -> None:
        """``holder`` has a call that may need a connection it is not yet allowed to open: grant one (taking it
        from another pool if the budget is spent), or, if it already holds some, let the call queue on them."""
        pause = 0.002
        while holder.pool.max_size < min(holder.active, cap):
            closing: tuple[GovernedPool, AsyncConnection[object]] | None = None
            async with self._grant_lock:
                if holder.pool.max_size >= min(holder.active, cap):
                    return
                # A pool without a connection may close another pool's idle one; one that has some grows only
                # into free or unused grants (closing connections to grow would only churn them).
                freed = self.granted < self.budget
                if not freed:
                    taken = await self._reclaim(holder, close_idle=holder.pool.max_size == 0)
                    freed = taken is True
                    closing = taken if isinstance(taken, tuple) else None
                if freed:
                    if not await self._grant(holder):
                        return  # its pool was closed (evicted): the call fails on it as without a governor
                    continue
            if closing is not None:
                # Shielded: a call cancelled meanwhile must not leave the grant in transit for ever.
                if not await asyncio.shield(self._hand_over(closing, holder)):
                    return
                continue
            if holder.pool.max_size > 0:
                return  # its own connections come back within a call's time: wait on them in its pool
            if time.monotonic() >= deadline:
                raise self.busy()
            await asyncio.sleep(pause)  # connections on their way back to another pool: look again
            pause = min(0.02, pause * 2)

    async def _hand_over(self, closing: tuple[GovernedPool, AsyncConnection[object]], holder: Holder) -> bool:
        """Close the connection :meth:`_reclaim` took and give its grant to ``holder``. The grant stays counted
        (in transit) until the closed backend has exited; other handoffs go on meanwhile, outside the lock.
        False: ``holder``'s pool was closed (the grant returns to the budget)."""
        await closing[0].close_taken(closing[1])
        async with self._grant_lock:
            self.granted -= 1
            return await self._grant(holder)

    async def _grant(self, holder: Holder) -> bool:
        """Give ``holder`` one grant (under the grant lock; the budget has room for it). False: its pool is
        closed, and the grant stays free."""
        if not await holder.pool.grant_one():
            return False
        self.granted += 1
        self.stats.peak_open = max(self.stats.peak_open, self.open_connections())
        return True

    async def _reclaim(self, needy: Holder, *,
                       close_idle: bool) -> bool | tuple[GovernedPool, AsyncConnection[object]]:
        """Free one grant held by another pool beyond what its calls use: an unused one (True: freed), else
        (``close_idle``) an idle connection of the least recently used pool, taken out of it and returned with
        its pool for the caller to close (its grant is still counted until then); False: none found."""
        others = sorted((h for h in self.holders.values() if h is not needy and h.pool.max_size > h.active),
                        key=lambda h: h.last_used)
        for closing in (False, True) if close_idle else (False,):
            for other in others:
                pool = other.pool
                if not closing and pool.open_connections() >= pool.max_size:
                    continue
                outcome = await pool.take_back_one()
                if outcome is None:
                    self.stats.reclaimed += 1
                    self.granted -= 1
                    return True
                if outcome is False or outcome is True:
                    continue
                self.stats.terminations += 1
                return pool, outcome
        return False

    def register(self, holder: Holder) -> None:
        self.holders[id(holder)] = holder

    def unregister(self, holder: Holder) -> None:
        """``holder``'s pool is closed (its size no longer changes): its grants return to the budget."""
        if self.holders.pop(id(holder), None) is not None:
            self.granted -= holder.pool.max_size

    def snapshot(self) -> ServerSnapshot:
        top = sorted(self.flight.values(), reverse=True)[:TOP_USERS]
        return ServerSnapshot(server=self.name, budget=self.budget, open=self.open_connections(),
                              granted=self.granted, calls=self.calls, queue=self.queue_length(),
                              users=len(self.flight), top_user_calls=top, stats=ServerStats(**vars(self.stats)))


@dataclass(eq=False)
class _Waiter:
    fut: asyncio.Future[None]
    holder: Holder | None


#: How far into a user's queue the dispatcher looks for a call whose pool has a connection to spare.
_AFFINITY_SCAN = 32


def _pick(queue: deque[_Waiter]) -> _Waiter:
    """Take the user's first waiter whose pool may use a connection without opening one beyond its grants
    (an idle one, or an unused grant) among the first few; else the first. Serving those first makes a call
    that would have closed another pool's connection and opened its own rarer: fewer connects under load."""
    for i, waiter in enumerate(queue):
        if i >= _AFFINITY_SCAN:
            break
        holder = waiter.holder
        if holder is not None and not waiter.fut.done() and holder.pool.max_size > holder.active:
            del queue[i]
            return waiter
    return queue.popleft()


@dataclass(frozen=True)
class ServerSnapshot:
    server: str
    budget: int
    open: int
    granted: int
    calls: int
    queue: int
    users: int
    top_user_calls: list[int]
    stats: ServerStats


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def server_key(uri: str) -> str:
    """``host:port`` of ``uri``: the governor's key (never the URI, which holds a password)."""
    params = conninfo_to_dict(uri)
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    port = str(params.get("port") or 5432).split(",")[0]
    return f"{host}:{port}"


BudgetProbe = Callable[[str], Awaitable[int]]
"""Connections tenants may hold on the server ``uri`` reaches (before dividing between instances)."""


async def probe_budget(uri: str, connect_timeout_s: int = 5, admin_dsn: str | None = None) -> int:
    """``max_connections`` minus the slots reserved for superusers and ``pg_use_reserved_connections``, read
    from the server (as agentpg's admin when ``admin_dsn`` is given, so the probe uses a reserved slot)."""
    dsn = admin_dsn or uri
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=connect_timeout_s) as conn:
        cur = await conn.execute("SELECT current_setting('max_connections')::int, "
                                 "current_setting('superuser_reserved_connections')::int, "
                                 "coalesce(current_setting('reserved_connections', true)::int, 0)")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]) - int(row[1]) - int(row[2])


class Governor:
    """The gates of every server this process's tenant pools reach."""

    def __init__(self, config: GovernorConfig | None = None, *, probe: BudgetProbe | None = None,
                 admin_dsn_for: Callable[[str], str | None] = lambda uri: None) -> None:
        """``admin_dsn_for`` names agentpg's admin on a tenant's server (the runtime's reaper knows them): the
        budget is read as that admin when known."""
        self.config = config or GovernorConfig()
        self._probe = probe or (lambda uri: probe_budget(uri, self.config.connect_timeout_s, admin_dsn_for(uri)))
        self._gates: dict[str, ServerGate] = {}
        self._retry_probe: dict[str, float] = {}
        self._probing: dict[str, asyncio.Task[int]] = {}

    async def gate(self, uri: str) -> ServerGate:
        name = server_key(uri)
        gate = self._gates.get(name)
        retry_at = self._retry_probe.get(name)
        if gate is not None and gate.lowered_until and not gate.recently_refused():
            gate.lowered_until = 0.0
            gate.budget = gate.full_budget  # the refusal is old: back to the full budget
        if gate is not None and (retry_at is None or time.monotonic() < retry_at):
            return gate  # known (or its probe failed and is not due again yet)
        budget = await self._budget(name, uri)
        if gate is None:
            gate = self._gates.setdefault(name, ServerGate(name, budget, self.config.wait_s,
                                                           user_cap=self.config.user_cap))
        else:
            gate.set_budget(budget)
        return gate

    async def _budget(self, name: str, uri: str) -> int:
        if self.config.budget is not None:
            return max(1, self.config.budget)
        task = self._probing.get(name)
        if task is None:
            task = asyncio.ensure_future(self._probe(uri))
            self._probing[name] = task
        try:
            server = await asyncio.shield(task)
        except Exception as exc:
            log.warning("could not read the connection settings of a tenant server (%s); its budget is %d "
                        "connections until asked again", type(exc).__name__, self.config.fallback_budget)
            self._retry_probe[name] = time.monotonic() + self.config.probe_retry_s
            return self.config.fallback_budget
        finally:
            self._probing.pop(name, None)
        self._retry_probe.pop(name, None)
        return max(1, server // max(1, self.config.instances) - self.config.own_connections)

    @contextlib.asynccontextmanager
    async def call(self, gate: ServerGate, user: str, holder: Holder | None = None) -> AsyncIterator[float]:
        """Hold a call slot of ``gate`` for ``user`` (using ``holder``'s pool); yields the call's deadline for
        a connection."""
        deadline = time.monotonic() + self.config.wait_s
        await gate.enter(user, deadline, holder)
        try:
            yield deadline
        finally:
            gate.leave(user)

    def snapshot(self) -> list[ServerSnapshot]:
        return [gate.snapshot() for gate in self._gates.values()]
