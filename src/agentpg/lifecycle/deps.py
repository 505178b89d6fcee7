"""What the lifecycle needs from below, bundled so functions stay plain and testable."""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, QueuePool, text
from sqlalchemy.orm import Session, sessionmaker

from agentpg.access.cache import Invalidation
from agentpg.crypto import KeyRing, SealContext
from agentpg.errors import Busy, InvalidInput
from agentpg.providers.base import Provider

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_EMAIL_PATTERN = re.compile(r"[^@\s\x00]{1,64}@[^@\s\x00]{1,255}")

#: How long an operation waits for a free slot (see :func:`_operation_slots`) before answering "busy".
OPERATION_SLOT_WAIT_S = 120.0
_slots: weakref.WeakKeyDictionary[Engine, threading.BoundedSemaphore] = weakref.WeakKeyDictionary()
_slots_lock = threading.Lock()


def _operation_slots(engine: Engine) -> threading.BoundedSemaphore:
    """How many operations may run at once against this catalog engine's pool.

    An operation holds two catalog connections (its lease, and one for its own transactions). Twenty
    operations started together on a pool of fifteen would each take a lease, then all wait for a second
    connection none would give back: the pool's timeout, then 500s. A third of the pool's connections go to
    operations (two each), the rest stay free for everything else (token checks, reads, permission changes).
    """
    with _slots_lock:
        slots = _slots.get(engine)
        if slots is None:
            pool = engine.pool
            capacity = pool.size() + max(pool._max_overflow, 0) if isinstance(pool, QueuePool) else 15
            slots = _slots[engine] = threading.BoundedSemaphore(max(1, capacity // 3))
        return slots


def validate_id(value: object, what: str) -> str:
    """A user or workspace id as the platform gave it: 1 to 128 of ``A-Z a-z 0-9 . _ : @ -``."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise InvalidInput(
            f"{what} must be 1 to 128 characters of letters, digits and . _ : @ - "
            "and start with a letter or digit"
        )
    return value


def validate_email(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 320 or not _EMAIL_PATTERN.fullmatch(value):
        raise InvalidInput("email must look like name@example.com (at most 320 characters)")
    return value


@dataclass
class LifecycleDeps:
    engine: Engine
    sessions: sessionmaker[Session]
    provider: Provider
    keyring: KeyRing
    on_claim: Callable[[], None] | None = None
    invalidation: Invalidation = field(default_factory=Invalidation)
    """The service's cache generation: bumped by every change that could make a cached answer wrong."""
    """Called after a warm database was claimed (wakes the refiller)."""
    crashpoint: str | None = None
    """Testing aid (``AGENTPG_CRASHPOINT``): the process exits abruptly when it reaches this named step,
    exactly as if it had been killed there, so tests can show ``reconcile`` repairs every such state."""

    def reached(self, point: str) -> None:
        if self.crashpoint == point:
            os._exit(86)

    def seal(self, plaintext: str, table: str, row_id: str, field: str) -> str:
        return self.keyring.seal(plaintext, SealContext(table, row_id, field))

    def open(self, sealed: str, table: str, row_id: str, field: str) -> str:
        return self.keyring.open(sealed, SealContext(table, row_id, field))

    @contextmanager
    def operation_lease(self, operation_id: str) -> Iterator[Lease]:
        """Hold the operation's advisory lock on a dedicated catalog connection for the block's duration.

        ``lease.acquired`` says whether the lock was obtained. If this process dies, the connection closes and
        the lock goes with it, which is how ``reconcile`` knows the operation is abandoned. The operation's
        own transactions can run on the same connection (``lease.transaction()``): a session-level advisory
        lock outlives the transactions, and one connection saves a pool checkout per step.
        """
        slots = _operation_slots(self.engine)
        if not slots.acquire(timeout=OPERATION_SLOT_WAIT_S):
            raise Busy("agentpg is busy with other changes right now; retry shortly")
        try:
            with self._leased(operation_id) as lease:
                yield lease
        finally:
            slots.release()

    @contextmanager
    def _leased(self, operation_id: str) -> Iterator[Lease]:
        with self.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:id, 0))"),
                                    {"id": operation_id}).scalar())
            conn.commit()
            try:
                yield Lease(got, conn)
            finally:
                if conn.in_transaction():
                    conn.rollback()
                if got and not conn.closed and not conn.invalidated:
                    conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:id, 0))"), {"id": operation_id})
                    conn.commit()


@dataclass
class Lease:
    acquired: bool
    connection: Connection

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """An ORM session on the lease's connection, committed at the end of the block."""
        with Session(bind=self.connection, expire_on_commit=False) as session, session.begin():
            yield session
