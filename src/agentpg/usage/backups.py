"""Backup storage in a user's usage (issue 19): each server's backup directory, attributed to its databases.

A server's backups (``AGENTPG_BACKUP_DIR/<server>``: its base backups, the WAL streamed since the oldest one
kept, the few files disaster recovery needs) are one directory for every database on it: a physical backup
cannot be cut per database, and vanilla PostgreSQL does not count WAL per database. The rule, simple enough
to explain to a user:

    **a database's backup bytes = its server's backup bytes, times the database's size, divided by the
    total size of the server's tenant databases** (the sizes the same usage sync reads; shares rounded so
    that they add up to the directory's bytes exactly).

Why by size: a base backup is a copy of the data files, so a database's part of it *is* its share of the
data; the WAL kept is what was written in the window, which grows with the data too (a database nobody
writes to still has its files in every base backup). What belongs to no tenant (system catalogs, templates,
the warm pool, agentpg's catalog when it lives on that server) is shared the same way, so every byte the
operator keeps is paid for exactly once and no tenant pays for another's data beyond its proportion.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agentpg.errors import AgentpgError
from agentpg.providers.base import Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sized:
    """One tenant database as the sync sees it: its name, server and size (bytes)."""

    database: str
    server: str | None
    size: int


def server_backup_bytes(provider: Provider) -> dict[str | None, int] | None:
    """The bytes of each archived server's backup directory (``GET /api/backups``' figure); servers without
    backups are left out. None when the status cannot be read now (this sync charges no backup storage)."""
    try:
        statuses = provider.archive_status()
    except AgentpgError as exc:
        log.warning("backup sizes unavailable, no backup storage is charged this sync: %s", exc.message)
        return None
    return {status.server: status.bytes for status in statuses if status.bytes > 0}


def attribute(backup_bytes: Mapping[str | None, int], databases: Iterable[Sized]) -> dict[str, int]:
    """Each database's share of its server's ``backup_bytes``, in proportion to its size (see the module).

    Shares are whole bytes that add up to the server's bytes (largest remainders get the leftover bytes); a
    server whose databases are all empty splits evenly. Databases on a server without backups get nothing.
    """
    by_server: dict[str | None, list[Sized]] = defaultdict(list)
    for db in databases:
        if backup_bytes.get(db.server, 0) > 0:
            by_server[db.server].append(db)
    shares: dict[str, int] = {}
    for server, members in by_server.items():
        total_bytes = backup_bytes[server]
        weights = [max(db.size, 0) for db in members]
        if sum(weights) == 0:
            weights = [1] * len(members)
        whole = sum(weights)
        exact = [(total_bytes * w // whole, total_bytes * w % whole) for w in weights]
        leftover = total_bytes - sum(q for q, _ in exact)
        by_remainder = sorted(range(len(members)), key=lambda i: (-exact[i][1], members[i].database))
        bonus = set(by_remainder[:leftover])
        for i, db in enumerate(members):
            shares[db.database] = exact[i][0] + (1 if i in bonus else 0)
    return shares
