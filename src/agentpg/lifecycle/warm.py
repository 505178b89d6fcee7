"""The warm pool: tenant databases made ahead of time so registration only has to claim one.

``CREATE DATABASE`` copies a template and checkpoints: tens of milliseconds at best, far more under load.
A claimed warm database needs one ``ALTER ROLE … PASSWORD`` instead. Names are opaque and random, so a
database made for nobody in particular can become anybody's without renaming.
"""

from __future__ import annotations

import logging
import threading
import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agentpg.catalog.models import WarmDatabase
from agentpg.errors import AgentpgError
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.periodic import PeriodicJob
from agentpg.providers.base import DatabasePlan, new_password

log = logging.getLogger(__name__)


def claim(s: Session, provider: str) -> DatabasePlan | None:
    """Take one ready warm database inside the caller's transaction; ``None`` if the pool is empty.

    ``SKIP LOCKED`` lets concurrent registrations each take a different one without waiting.
    """
    row = s.scalars(select(WarmDatabase)
                    .where(WarmDatabase.state == "ready", WarmDatabase.provider == provider)
                    .order_by(WarmDatabase.created_at).limit(1).with_for_update(skip_locked=True)).one_or_none()
    if row is None:
        return None
    s.delete(row)
    return DatabasePlan(row.database_name, row.owner_role, row.login_role, row.provider_server)


def fill(deps: LifecycleDeps, target: int, *, stop: threading.Event | None = None) -> int:
    """Create warm databases until ``target`` exist (ready or being made); return how many were made.

    Each one is crash-safe like any operation: its row (state ``creating``) is written and its advisory lock
    held before the provider is touched.
    """
    made = 0
    while target > 0 and not (stop is not None and stop.is_set()):
        row_id = str(uuid.uuid4())
        plan = DatabasePlan.fresh(deps.provider.place())
        with deps.operation_lease(row_id):
            with deps.sessions.begin() as s:
                count = s.scalar(select(func.count()).select_from(WarmDatabase)
                                 .where(WarmDatabase.provider == deps.provider.name)) or 0
                if count >= target:
                    return made
                s.add(WarmDatabase(id=row_id, provider=deps.provider.name, database_name=plan.database,
                                   owner_role=plan.owner_role, login_role=plan.login_role, state="creating",
                                   provider_server=plan.server))
            try:
                deps.provider.create_database(plan, new_password())
            except AgentpgError as exc:
                log.warning("warm pool refill failed: %s", exc.message)
                discard(deps, row_id)
                return made
            with deps.sessions.begin() as s:
                row = s.get(WarmDatabase, row_id)
                if row is not None:
                    row.state = "ready"
            made += 1
    return made


def discard(deps: LifecycleDeps, row_id: str) -> None:
    """Drop a warm database and forget it (a failed or abandoned refill)."""
    with deps.sessions() as s:
        row = s.get(WarmDatabase, row_id)
        if row is None:
            return
        plan = DatabasePlan(row.database_name, row.owner_role, row.login_role, row.provider_server)
    deps.provider.drop_database(plan)
    with deps.sessions.begin() as s:
        row = s.get(WarmDatabase, row_id)
        if row is not None:
            s.delete(row)


def drain(deps: LifecycleDeps) -> int:
    """Drop every ready warm database (``agentpg pool drain``, or setting the size to 0)."""
    with deps.sessions() as s:
        ids = list(s.scalars(select(WarmDatabase.id).where(WarmDatabase.state == "ready")))
    for row_id in ids:
        discard(deps, row_id)
    return len(ids)


class Refiller(PeriodicJob):
    """Keeps the pool at ``target`` from a background thread, every ``interval_s``; ``kick()`` after a claim
    wakes it early. A target of 0 never starts."""

    def __init__(self, deps: LifecycleDeps, target: int, interval_s: float = 5.0) -> None:
        super().__init__("warm-pool", lambda: fill(deps, target, stop=self.stopping),
                         interval_s if target > 0 else 0, first_run_now=True)
