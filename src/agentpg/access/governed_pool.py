"""The connection side of the governor (:mod:`agentpg.access.governor`): a pool whose size is the governor's
grant, and a connection class that waits out a slot still held by a backend on its way out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

SLOT_RETRY_S = 3.0
"""How long a connect keeps retrying while the server says its slots are taken."""

EXIT_WAIT_S = 2.0
"""How long closing a governed connection waits for its backend to exit before it counts the slot as free."""


class SlotWatcher(Protocol):
    def slots_refused(self) -> None:
        """The server kept refusing for want of a slot although the budget allowed the connection."""


def slots_taken(exc: psycopg.OperationalError) -> bool:
    """The server refused the connection for want of a slot (53300), not for any other reason."""
    text = str(exc)
    return exc.sqlstate == "53300" or "remaining connection slots are reserved" in text or "too many clients" in text


class SlotPatientConnection(AsyncConnection[object]):
    """The connection class of governed pools. The governor never grants more connections than the budget,
    and a governed pool hands a grant back only once the backend exited (:func:`close_and_await_exit`), but
    a slot can still be taken for a moment by what the governor does not see (a backend terminated from
    outside, or one that outlived :data:`EXIT_WAIT_S`). That is a wait, not a failure: retry for up to
    :data:`SLOT_RETRY_S` before giving up. Each gate has its own
    subclass (:meth:`agentpg.access.governor.ServerGate.connection_class`) that tells the gate when the
    slots stayed taken."""

    gate: SlotWatcher | None = None

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> SlotPatientConnection:
        deadline = time.monotonic() + SLOT_RETRY_S
        pause = 0.01
        while True:
            try:
                return await super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                if not slots_taken(exc):
                    raise
                if time.monotonic() + pause > deadline:
                    if cls.gate is not None:
                        cls.gate.slots_refused()
                    raise
            await asyncio.sleep(pause)
            pause = min(0.2, pause * 2)


async def close_and_await_exit(conn: AsyncConnection[Any], timeout_s: float = EXIT_WAIT_S) -> None:
    """Close ``conn``, then wait (up to ``timeout_s``) until its backend has exited.

    Closing sends Terminate and returns at once; the backend exits on its own time, and a backend with
    work left at exit (temporary tables to drop) holds its server slot for a while. A backend closes its
    socket only after it released its slot and its ``pg_stat_activity`` entry (the socket is closed by
    the last of its exit callbacks), so end of file on a duplicate of the socket means the slot is free."""
    try:
        fd = os.dup(conn.pgconn.socket)
    except (psycopg.Error, OSError):  # already closed or broken: nothing to wait for
        await conn.close()
        return
    with socket.socket(fileno=fd) as sock:
        await conn.close()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(timeout_s):
                while await loop.sock_recv(sock, 4096):
                    pass


class GovernedPool(AsyncConnectionPool[AsyncConnection[object]]):
    """A tenant pool whose ``max_size`` is the governor's grant: it can never open more connections than that.
    The two methods below change the size under the pool's own lock, the one its growth is decided under
    (psycopg_pool has no public way to close one idle connection)."""

    def __init__(self, *args: Any, start_empty: bool = False,
                 reset_done: Callable[[AsyncConnection[object]], bool] | None = None, **kwargs: Any) -> None:
        """``reset_done(conn)``: whether a connection handed back needs no reset (its caller already reset
        its session); such a connection goes back to the pool at once, without the worker's hop."""
        super().__init__(*args, **kwargs)
        self._reset_done = reset_done
        if start_empty:  # allowed no connection until granted one (psycopg_pool refuses max_size=0 here)
            self._max_size = 0

    async def _putconn(self, conn: AsyncConnection[object], from_getconn: bool) -> None:
        # With a reset function configured, psycopg_pool returns every connection through a worker task (so the
        # reset's round trip is off the caller's time): a queue hop and a task wake-up per agent call, ~8 % of
        # its CPU. A connection already reset (an agent read resets in its own round trip) has no round trip
        # left: return it inline. The same checks run (transaction status, expiry); the reset function still
        # runs too, and finds nothing to do.
        if not from_getconn and self._reset_done is not None and self._reset_done(conn):
            await self._return_connection(conn, from_getconn=False)
        else:
            await super()._putconn(conn, from_getconn)

    async def grant_one(self) -> bool:
        """One more connection allowed (False if the pool is closed); grow now if callers already wait."""
        async with self._lock:
            if self._closed:
                return False
            self._max_size += 1
            if self._waiting:
                self._maybe_grow_pool()
        return True

    async def give_back_one(self) -> bool | None:
        """One connection fewer allowed: None if an allowed connection was not open (nothing closed), True if
        an idle connection was closed to make room (its backend gone when this returns), False if neither
        (every connection busy or on its way back)."""
        taken = await self.take_back_one()
        if isinstance(taken, AsyncConnection):
            await self.close_taken(taken)
            return True
        return taken

    async def take_back_one(self) -> AsyncConnection[object] | bool | None:
        """As :meth:`give_back_one`, but an idle connection taken out to make room is returned to the caller,
        not yet closed: the grant it held is free only once :meth:`close_taken` returned. (The governor closes
        it outside its own lock, so that one slow backend exit does not hold up every other handoff.)"""
        async with self._lock:
            if self._closed or self._max_size <= 0:
                return False
            if self._nconns < self._max_size and not self._waiting:
                self._max_size -= 1
                return None
            if not self._pool:
                return False
            closing = self._pool.popleft()  # the longest idle
            self._nconns -= 1
            self._max_size -= 1
            self._nconns_min = min(self._nconns_min, len(self._pool))
        return closing

    async def close_taken(self, conn: AsyncConnection[object]) -> None:
        """Close a connection :meth:`take_back_one` returned and wait for its backend to exit. Never raises."""
        with contextlib.suppress(Exception):
            await self._close_connection(conn)

    async def _close_connection(self, conn: AsyncConnection[object]) -> None:
        # Every connection of a governed pool is closed through here (given back, shrunk, expired, broken, or
        # with the pool): the grant it held goes to another pool only once its backend is really gone.
        conn._pool = None
        await close_and_await_exit(conn)

    def open_connections(self) -> int:
        """Connections open or being opened."""
        return self._nconns
