"""Which base backups a server's archive takes, keeps and restores from: pure decisions over its files.

A restore starts from the newest restorable base backup that ended before its target and replays the
server's WAL from that backup's start, so what it replays is bounded by how often base backups are taken.
Three rules keep that bounded while the backups stay cheap (docs/undo.md "What is kept"):

* **when** (:func:`due`): a base backup once the newest is ``interval`` old, or once the server has written
  ``wal_trigger`` bytes of WAL since the newest one started: replay is bounded by bytes, which is what it
  costs, and a quiet server takes none it does not need. A server writing faster than its backups can keep up
  with is held to a duty cycle (:data:`MAX_DUTY`): replay is then bounded by the time a few backups take.
  A WAL-triggered one checkpoints at once (its duration is then its work, which the duty cycle measures; the
  checkpoint writes pages the server would write at its next checkpoint anyway), a periodic one is spread;
* **which kind** (:func:`full_needed`, :func:`parent_of`): incremental (PostgreSQL 17+ ``--incremental``:
  only the blocks changed since its parent), a full one once the chain's full backup is
  :data:`FULL_AFTER_INTERVALS` intervals old. Its parent is the newest backup, unless that one's chain has
  :data:`MAX_LINKS` links: then the chain's full one (the new backup holds every block changed since the full
  one, and the chain starts again at two links). A restore combines every link of its chain and each costs it
  a manifest to read (measured: ~0.35 s a link with 300 tenant databases), so chains stay short without
  more full backups (each a copy of the whole server);
* **what stays** (:func:`retained`): every backup a restore inside the window may start from (those that
  ended in it, plus the newest one that ended before it) with the links each builds on, and the WAL from the
  oldest such *start point*: a chain's older links are kept as links, not as start points, so their WAL goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from agentpg.providers.base import RecoveryTarget
from agentpg.providers.walfiles import BaseBackup, Segment, chain, contiguous_from, parse_lsn, segments

MAX_DUTY = 0.2
"""WAL-triggered base backups take at most this share of the time: the next one waits at least
``(1 / MAX_DUTY - 1)`` times as long as the newest one took when that was an incremental one (a server
writing GBs a minute would otherwise be backed up without a pause)."""
MIN_SPACING = timedelta(seconds=60)
"""And at least this long after the newest one."""
FULL_AFTER_INTERVALS = 7
"""A full base backup once the chain's full one is this many ``interval`` s old (weekly by default)."""
MAX_LINKS = 8
"""The longest chain (full one included) a restore combines; the next backup then builds on the full one."""


def due(backups: Sequence[BaseBackup], now: datetime, current_lsn: int, *, interval: timedelta,
        wal_trigger: int, min_spacing: timedelta = MIN_SPACING) -> Literal["first", "interval", "wal"] | None:
    """Whether a base backup is due, and why (``wal_trigger`` in bytes, 0: time only)."""
    if not backups:
        return "first"
    newest = backups[-1]
    age = now - newest.finished
    if age >= interval:
        return "interval"
    # What the next one will cost is what the newest incremental cost (a full one's duration says nothing).
    last = newest.finished - newest.started if newest.incremental_of is not None else timedelta(0)
    spacing = max(min_spacing, last * (1 / MAX_DUTY - 1))
    if wal_trigger > 0 and age >= spacing and current_lsn - newest.start_lsn >= wal_trigger:
        return "wal"
    return None


def parent_of(newest: BaseBackup, by_label: dict[str, BaseBackup]) -> BaseBackup:
    """What the next incremental builds on: ``newest``, or its chain's full one when that chain is
    :data:`MAX_LINKS` long (a missing link: ``newest``, and :func:`full_needed` says a full one)."""
    links = chain(newest, by_label)
    return links[0] if links is not None and len(links) >= MAX_LINKS else newest


def full_needed(links: Sequence[BaseBackup] | None, now: datetime, interval: timedelta) -> bool:
    """Whether the next base backup after the chain ``links`` (full one first; None: a link is missing) must
    be a full one: its full one is old (WAL summaries are kept 10 days: ``wal_summary_keep_time``)."""
    if not links:
        return True
    return now - links[0].finished >= interval * FULL_AFTER_INTERVALS


def retained(existing: Sequence[BaseBackup], window_start: datetime) -> tuple[set[str], int] | None:
    """The labels to keep and the first WAL segment number to keep, or None when nothing would be
    restorable (then nothing is deleted rather than guess)."""
    by_label = {b.label: b for b in existing}
    inside = [b for b in existing if b.finished >= window_start]
    before = [b for b in existing if b.finished < window_start]
    starts = ([before[-1]] if before else []) + inside
    keep: set[str] = set()
    start_points = []
    for backup in starts:
        links = chain(backup, by_label)
        if links is not None:
            keep.update(b.label for b in links)
            start_points.append(backup)
    if not start_points:
        return None
    return keep, min(b.start_segno for b in start_points)


def restorable(existing: Sequence[BaseBackup], wal_dir: Path) -> tuple[list[BaseBackup], list[Segment]]:
    """The base backups a restore can start from (complete chain, unbroken WAL from their start to the newest
    segment), oldest first, and the WAL segments held."""
    if not existing:
        return [], []
    found = segments(wal_dir, existing[0].seg_size)
    if not found:
        return [], []
    by_label = {b.label: b for b in existing}
    usable = []
    for backup in existing:
        run = contiguous_from(found, backup.start_segno)
        if chain(backup, by_label) is not None and run and run[-1].segno == found[-1].segno:
            usable.append(backup)
    return usable, found


def start_for(usable: Sequence[BaseBackup], target: RecoveryTarget) -> BaseBackup | None:
    """The newest of ``usable`` a restore to ``target`` can start from (one that ended before it: the least
    WAL to replay), or None when ``target`` is before the oldest restorable point."""
    if target.lsn is not None:
        lsn = parse_lsn(target.lsn)
        candidates = [b for b in usable if b.end_lsn <= lsn]
    else:
        assert target.time is not None
        moment = target.time
        candidates = [b for b in usable if b.finished < moment]
    return candidates[-1] if candidates else None
