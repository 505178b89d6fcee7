"""A rebase of one server's archive: a fresh full base backup, then nothing older (docs/undo.md "Deleting a user").

Base backups and WAL of a shared server hold every tenant's pages: one tenant cannot be cut out of them. The
only real purge of a deleted user's data is to start the archive over after the deletion: a new full base
backup (which no longer holds the dropped databases) replaces every older base backup and WAL segment. Every
tenant of the server loses the history before it: points earlier than the new backup are no longer restorable.

Crash-safe and idempotent. A rebase is asked for by a request file (``<server dir>/rebase-requests/``,
written by :func:`request`: a user deletion with ``AGENTPG_BACKUP_PURGE_ON_USER_DELETE=rebase``, or the
operator's ``agentpg backups rebase``). :func:`run_pending` (the archiver's every round, and the command)
serves the requests present when it starts:

1. before the backup, the shared catalogs (``pg_database``, ``pg_authid``, …) are rewritten by ``VACUUM FULL``
   (a deleted row's bytes otherwise stay in its page, and the names of dropped databases and roles with them)
   and the server switches to a new WAL segment, so the first segment the new backup needs starts after the
   deletion;
2. a full base backup (``pg_basebackup``), its WAL fetched into the archive, then checked by
   ``pg_verifybackup`` against its manifest; ``rebase-state.json`` records it as verified;
3. only then: every older base backup and WAL segment is deleted, then the requests served.

Dying anywhere leaves the requests in place: the next round (or the command again) starts over, or, when the
verified backup already started after every request, goes straight to the deletions. A request written while
a rebase runs is served by the next one (its backup started too early to leave that deletion out).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from agentpg.errors import ProviderError
from agentpg.providers.base import RebaseResult
from agentpg.providers.walfiles import META, BaseBackup, format_lsn, segments, tree_bytes, utcnow, write_private

if TYPE_CHECKING:
    from agentpg.providers.archive import Archiver

log = logging.getLogger(__name__)

REQUESTS = "rebase-requests"
STATE = "rebase-state.json"
_LOCK = ".rebase.lock"
#: Shared catalogs naming databases and roles: rewritten so a dropped one's name is in no page the backup copies.
SHARED_CATALOGS = ("pg_database", "pg_authid", "pg_auth_members", "pg_shdepend", "pg_db_role_setting",
                   "pg_shdescription", "pg_shseclabel")
_VERIFY_TIMEOUT_S = 6 * 3600.0


def request(archiver: Archiver, reason: str) -> Path:
    """Ask for a rebase of this server's archive (served by :func:`run_pending`). Cheap: one small file."""
    directory = archiver.directory / REQUESTS
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = utcnow()
    path = directory / f"{now.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}.json"
    write_private(path, json.dumps({"requested": now.isoformat(), "reason": reason[:200]}).encode())
    return path


def _requests(archiver: Archiver) -> list[tuple[Path, datetime]]:
    found = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted((archiver.directory / REQUESTS).glob("*.json")):
            try:
                found.append((path, datetime.fromisoformat(json.loads(path.read_text())["requested"])))
            except (OSError, ValueError, KeyError, TypeError):
                found.append((path, utcnow()))  # unreadable: serve it as if made now (the safe side)
    return found


def pending(archiver: Archiver) -> bool:
    """Whether a rebase was asked for and is not done yet."""
    return bool(_requests(archiver))


@contextlib.contextmanager
def _locked(archiver: Archiver) -> Iterator[None]:
    """One rebase of a server at a time across processes (``serve``'s round and the operator's command)."""
    fd = os.open(archiver.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def run_pending(archiver: Archiver) -> RebaseResult | None:
    """Serve the rebase requests present now (see the module docstring); None when there were none.
    Raises ProviderError (nothing deleted) when the new base backup cannot be taken, fetched or verified."""
    with archiver._mutex:
        archiver.ensure_dirs()
        with _locked(archiver):
            requests = _requests(archiver)
            if not requests:
                return None
            newest_request = max(at for _, at in requests)
            bytes_before = tree_bytes(archiver.directory)
            base = _verified_base(archiver, newest_request)
            if base is None:
                base = _new_base(archiver)
            deleted_backups, deleted_segments = _delete_before(archiver, base)
            for path, _ in requests:
                path.unlink(missing_ok=True)
            log.info("rebased the archive of server %s on base backup %s: %d base backups and %d WAL segments "
                     "deleted", archiver.server, base.label, deleted_backups, deleted_segments)
            return RebaseResult(server=archiver.server, base_backup=base.label, restorable_from=base.finished,
                                deleted_base_backups=deleted_backups, deleted_wal_segments=deleted_segments,
                                bytes_before=bytes_before, bytes_after=tree_bytes(archiver.directory))


def rebase_now(archiver: Archiver, reason: str = "operator") -> RebaseResult:
    """:func:`request` then :func:`run_pending` (the operator's ``agentpg backups rebase``). When another
    process served the request meanwhile, the result describes the archive as that rebase left it."""
    request(archiver, reason)
    done = run_pending(archiver)
    if done is not None:
        return done
    state = _state(archiver)
    base = next((b for b in archiver.backups() if b.label == state.get("base")), None)
    if base is None:  # pragma: no cover - the other process's rebase left no state: run one of our own
        return rebase_now(archiver, reason)
    size = tree_bytes(archiver.directory)
    return RebaseResult(server=archiver.server, base_backup=base.label, restorable_from=base.finished,
                        deleted_base_backups=0, deleted_wal_segments=0, bytes_before=size, bytes_after=size)


def _state(archiver: Archiver) -> dict[str, object]:
    try:
        data = json.loads((archiver.directory / STATE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _verified_base(archiver: Archiver, after: datetime) -> BaseBackup | None:
    """The full base backup an interrupted rebase took and verified, if it started after ``after``."""
    state = _state(archiver)
    for backup in archiver.backups():
        if (backup.label == state.get("base") and state.get("verified") is True and backup.incremental_of is None
                and backup.started > after):
            return backup
    return None


def _new_base(archiver: Archiver) -> BaseBackup:
    """Scrub the shared catalogs, switch WAL segments, take a full base backup, fetch its WAL, verify it."""
    with archiver.connect() as conn:
        for statement in [f"VACUUM FULL pg_catalog.{name}" for name in SHARED_CATALOGS] + ["SELECT pg_switch_wal()"]:
            try:
                conn.execute(statement)  # constant names, not input
            except psycopg.errors.InsufficientPrivilege:
                # An external server's admin may replicate without owning the catalogs: the dropped
                # databases' files are gone from the new backup all the same, their names may linger.
                log.warning("rebase of server %s: %s is not allowed to agentpg's admin; skipped", archiver.server,
                            statement)
            except psycopg.Error as exc:
                raise ProviderError(f"preparing the rebase of server {archiver.server!r} failed: "
                                    f"{exc.diag.message_primary}") from None
    base = archiver.backup_now(fast=True, full=True)
    archiver.wait_archived(base.end_lsn)
    archiver.run_tool([str(archiver.bin_dir / "pg_verifybackup"), "--no-parse-wal", "--quiet",
                       "--ignore", "agentpg-backup.json", str(base.path)],
                      timeout=_VERIFY_TIMEOUT_S, what="pg_verifybackup of the rebase's base backup")
    usable, _ = archiver.restorable()
    if base.label not in {b.label for b in usable}:
        raise ProviderError(f"the rebase's base backup {base.label} of server {archiver.server!r} is not restorable "
                            "(its WAL is not in the archive); nothing was deleted")
    write_private(archiver.directory / STATE, json.dumps({"base": base.label, "verified": True}).encode())
    return base


def _delete_before(archiver: Archiver, base: BaseBackup) -> tuple[int, int]:
    """Delete every base backup that is not ``base`` or built on it, and every WAL segment before its start."""
    keep = {base.label}
    for backup in archiver.backups():  # oldest first: an incremental after base on a kept parent is kept
        if backup.start_lsn > base.start_lsn and backup.incremental_of in keep:
            keep.add(backup.label)
    # The WAL first: without it an older backup is no start point any more, whatever is left of it.
    removed = 0
    for seg in segments(archiver.wal_dir, base.seg_size):
        if seg.segno < base.start_segno:
            seg.path.unlink(missing_ok=True)
            removed += 1
    deleted = 0
    for backup in archiver.backups():
        if backup.label not in keep and backup.start_lsn < base.start_lsn:
            (backup.path / META).unlink(missing_ok=True)  # no longer a complete backup, even if rmtree dies
            shutil.rmtree(backup.path, ignore_errors=True)
            deleted += 1
    for leftover in archiver.base_dir.iterdir():  # what an interrupted deletion left (in-progress ones are .tmp-*)
        if leftover.is_dir() and not leftover.name.startswith(".") and not (leftover / META).exists():
            shutil.rmtree(leftover, ignore_errors=True)
    return deleted, removed


def window_start(archiver: Archiver) -> tuple[str, datetime] | None:
    """The oldest restorable point (the oldest usable base backup's end: WAL position, time), or None."""
    usable, _ = archiver.restorable()
    return (format_lsn(usable[0].end_lsn), usable[0].finished) if usable else None
