"""Usage over time: one sample per user and UTC day, written by the usage sync, read for the explorer's chart.

The sync already computes each user's period total and knows each database's storage; :func:`record_day`
upserts them as today's row in the same transaction as the budget totals, so a day's row is the last sync's
view of it. :func:`history` reads a user's last days back, with the cost of each day derived from the
cumulative period totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, sessionmaker

from agentpg.catalog.models import UsageDay

MAX_DAYS = 366


@dataclass(frozen=True)
class DayUsage:
    """One day of a user's usage. ``cost_cents`` is what the period's total grew by since the previous sample
    (after days without a sync, it holds those days too); the first sample of a period counts its whole total."""

    day: date
    cost_cents: int
    period_cost_cents: int
    storage_bytes: int


def record_day(s: Session, now: datetime, period: datetime, totals: Sequence[tuple[str, int, int]]) -> None:
    """Upsert today's row of each ``(user_id, period cost in cents, storage bytes)`` in ``s``'s transaction."""
    if not totals:
        return
    day = now.astimezone(UTC).date()
    rows = [{"user_id": user_id, "day": day, "period_start": period, "cost_cents": cost, "storage_bytes": size,
             "updated_at": now} for user_id, cost, size in totals]
    stmt = pg_insert(UsageDay).values(rows)
    s.execute(stmt.on_conflict_do_update(
        index_elements=[UsageDay.user_id, UsageDay.day],
        set_={"period_start": stmt.excluded.period_start, "cost_cents": stmt.excluded.cost_cents,
              "storage_bytes": stmt.excluded.storage_bytes, "updated_at": stmt.excluded.updated_at}))


def history(sessions: sessionmaker[Session], user_id: str, days: int, *, today: date | None = None) -> list[DayUsage]:
    """The user's samples of the last ``days`` days (1..:data:`MAX_DAYS`), oldest first; days without a sync
    are absent (the chart shows gaps as such, not as zero). Raises ``ValueError`` for ``days`` out of range."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be between 1 and {MAX_DAYS}")
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    with sessions() as s:
        # And the last sample before the range: the first shown day's own cost is the growth since it.
        before_range = s.scalars(select(UsageDay).where(UsageDay.user_id == user_id, UsageDay.day < first)
                                 .order_by(UsageDay.day.desc()).limit(1)).first()
        rows = ([before_range] if before_range else []) + list(s.scalars(
            select(UsageDay).where(UsageDay.user_id == user_id, UsageDay.day >= first, UsageDay.day <= today)
            .order_by(UsageDay.day)))
    out: list[DayUsage] = []
    before: UsageDay | None = None
    for row in rows:
        same_period = before is not None and before.period_start == row.period_start
        added = row.cost_cents - before.cost_cents if same_period and before is not None else row.cost_cents
        if row.day >= first:
            out.append(DayUsage(day=row.day, cost_cents=max(added, 0), period_cost_cents=row.cost_cents,
                                storage_bytes=row.storage_bytes))
        before = row
    return out
