"""Short-lived in-process caches for the per-call lookups of the agent and REST hot paths.

What is cached, and for how long (:data:`TTL_S`, 2 seconds):

* a bearer token's principal, by token hash (successes only: an unknown or revoked token is looked up
  every time, so nothing negative is ever remembered);
* where an agent's call runs (:class:`~agentpg.access.permissions.AgentTarget`: URI and permissions), by
  (workspace, logical database);
* a user's budget block reason, and the platform URI the REST browse routes read with.

Every change this process makes that could make an entry wrong (revoking a token, deleting a user or a
workspace, changing an agent's permissions or a budget, a usage sync) bumps the service's :class:`Invalidation`, which
makes every entry of every cache of that service stale at once. A change made by another process (the CLI,
another ``serve``) is seen within :data:`TTL_S`: **revocation takes effect within 2 seconds**. Postgres'
grants remain the boundary for what an agent can do: a stale permission entry can only make a refusal's
message less precise (the server's "permission denied" instead of agentpg's explanation), never let a
statement through that the role's grants refuse.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

#: How long an entry is trusted without a change seen in this process.
TTL_S = 2.0


class Invalidation:
    """One process's invalidation generation, shared by every cache the service owns.

    Read :meth:`current` *before* a lookup whose result you will :meth:`TtlCache.put`; :meth:`bump` after
    any change that could make an entry wrong. An object, not a module global, so two services in one
    process (tests, a CLI beside ``serve``) never invalidate each other by accident.
    """

    def __init__(self) -> None:
        self._generation = 0
        self._lock = threading.Lock()

    def current(self) -> int:
        return self._generation

    def bump(self) -> None:
        """Make every entry of every cache sharing this object stale."""
        with self._lock:
            self._generation += 1


class TtlCache(Generic[K, V]):
    """A bounded map whose entries expire after ``ttl_s`` or at the next :meth:`Invalidation.bump`."""

    def __init__(self, invalidation: Invalidation, ttl_s: float = TTL_S, max_entries: int = 50_000) -> None:
        self.invalidation = invalidation
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, int, V]] = {}

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, gen, value = entry
        if gen != self.invalidation.current() or expires < time.monotonic():
            self._entries.pop(key, None)
            return None
        return value

    def put(self, key: K, value: V, gen: int) -> None:
        """Remember ``value``, looked up while the generation was ``gen`` (a change since: not stored)."""
        if self.ttl_s <= 0 or gen != self.invalidation.current():
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl_s, gen, value)

    def clear(self) -> None:
        self._entries.clear()
