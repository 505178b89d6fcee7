"""Issue 19: a deleted user's backups (a rebase purges them) and the rules that bound a restore's replay.

A private home: its own embedded server (fsync off) with the default ``AGENTPG_BACKUP_PURGE_ON_USER_DELETE``
(``rebase``: a deletion purges the backups), in
process through the service (as the CLI reaches it); its archiver's rounds (``serve``'s ``Archiver.tick``)
are run by hand so the test knows when the background work happens.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from agentpg.app.runtime import Runtime, open_runtime
from agentpg.errors import AgentpgError
from agentpg.lifecycle import undo
from agentpg.providers import rebase, retention
from agentpg.providers.archive import Archiver
from agentpg.providers.walfiles import BaseBackup, parse_lsn
from agentpg.service import TargetSpec
from agentpg.settings import Settings


@pytest.fixture(scope="module")
def rt() -> Iterator[Runtime]:
    home = Path(tempfile.mkdtemp(prefix="agentpg-rebase-", dir="/tmp"))
    home.chmod(0o711)
    settings = Settings(home=home, embedded_fsync=False, warm_pool_size=0, usage_sync_interval_s=0,
                        backup_enabled=True)  # the purge on deletion is the default, not set here
    try:
        with open_runtime(settings) as runtime:
            try:
                assert runtime.archive_job is not None
                assert archiver_of(runtime).tick()  # slot, receiver, the first full base backup
                yield runtime
            finally:
                archiver_of(runtime).stop()
                if runtime.embedded is not None:
                    runtime.embedded.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def archiver_of(runtime: Runtime) -> Archiver:
    assert runtime.archive_job is not None and runtime.archive_job.archivers
    return runtime.archive_job.archivers[0]


def write(runtime: Runtime, user: str, *statements: str) -> None:
    with psycopg.connect(runtime.service.uris.platform(user), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(os.path.relpath(path, root))
            except OSError:
                continue
    return found


def archived_now(runtime: Runtime) -> None:
    archiver = archiver_of(runtime)
    with archiver.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    archiver.wait_archived(parse_lsn(str(row[0])))


def test_a_rebase_purges_a_deleted_user_and_leaves_the_others_restorable(rt: Runtime) -> None:
    svc, archiver = rt.service, archiver_of(rt)
    gone, stays = f"gone-{secrets.token_hex(3)}", f"stays-{secrets.token_hex(3)}"
    svc.register_user(gone)
    svc.register_user(stays)
    marker = f"deleted-user-secret-{secrets.token_hex(12)}"
    write(rt, gone, f"CREATE TABLE secret AS SELECT '{marker}'::text AS v FROM generate_series(1, 50)")
    write(rt, stays, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
    gone_db = svc.get_user(gone).global_database
    assert gone_db is not None
    before = svc.undo.create_checkpoint(stays, None, "before the rebase", "test")
    archiver.backup_now()  # the marker in a base backup's data files too, not only in the WAL
    archived_now(rt)
    assert files_holding(archiver.directory, marker.encode()), "the marker should be in the backups first"

    assert svc.delete_user(gone) is True  # scheduled, not done in the call
    assert svc.undo.archive_status()[0].rebase_pending
    assert files_holding(archiver.directory, marker.encode())
    old_labels = {b.label for b in archiver.backups()}

    assert archiver.tick()  # serve's next round does it
    status = svc.undo.archive_status()[0]
    assert status.protected and not status.rebase_pending and status.base_backups == 1
    (new,) = archiver.backups()
    assert new.incremental_of is None and new.label not in old_labels
    assert files_holding(archiver.directory, marker.encode()) == []
    with archiver.connect() as conn:  # the shared catalog was rewritten: the dropped name is in none of its pages
        row = conn.execute("SELECT pg_relation_filepath('pg_database')").fetchone()
    assert row is not None
    assert gone_db.name.encode() not in (new.path / str(row[0])).read_bytes()
    assert svc.status().backups_restorable_from == new.finished

    write(rt, stays, "INSERT INTO t SELECT g FROM generate_series(101, 150) g")
    after = svc.undo.create_checkpoint(stays, None, "after the rebase", "test")
    write(rt, stays, "DELETE FROM t")
    listed = {c.id: c.expired for c in svc.undo.list_checkpoints(stays, None)}
    assert listed[before.id] is True and listed[after.id] is False
    with pytest.raises(AgentpgError) as refused:
        svc.undo.restore(stays, None, TargetSpec(checkpoint_id=before.id), "new")
    assert refused.value.status == 409 and "before the oldest restorable point" in refused.value.message
    done = svc.undo.restore(stays, None, TargetSpec(checkpoint_id=after.id), "in_place")
    assert done.status == "restored"
    with psycopg.connect(svc.uris.platform(stays)) as conn:
        assert conn.execute("SELECT count(*), max(id) FROM t").fetchone() == (150, 150)
    assert undo.list_copies(svc.deps, stays) == []


def test_a_rebase_that_died_before_its_deletions_is_finished_without_a_new_backup(
        rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    archiver = archiver_of(rt)
    archiver.backup_now()  # something older to delete
    rebase.request(archiver, "test")

    def dies(*_: object) -> tuple[int, int]:
        raise RuntimeError("killed between the new backup and the deletions")

    with monkeypatch.context() as patch:
        patch.setattr(rebase, "_delete_before", dies)
        with pytest.raises(RuntimeError):
            rebase.run_pending(archiver)
    assert rebase.pending(archiver) and len(archiver.backups()) >= 2
    verified = archiver.backups()[-1]
    assert archiver.tick()  # serve's next round finishes it with the verified backup: no new one
    assert [b.label for b in archiver.backups()] == [verified.label] and not rebase.pending(archiver)
    assert rebase.run_pending(archiver) is None  # nothing asked, nothing done
    # The operator's command always starts from a backup taken after it was given (a user deleted just
    # before must not be in it), and says what it did.
    (done,) = rt.service.undo.rebase_backups()
    assert [b.label for b in archiver.backups()] == [done.base_backup] != [verified.label]
    assert done.deleted_base_backups == 1 and done.restorable_from == archiver.backups()[0].finished


def _backup(n: int, *, start_mb: int, minutes: float, parent: str | None = None, took_s: float = 1.0) -> BaseBackup:
    finished = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(minutes=minutes)
    return BaseBackup(path=Path(f"/nonexistent/{n}"), label=f"b{n}", incremental_of=parent,
                      start_lsn=start_mb * 2**20, end_lsn=start_mb * 2**20 + 1, timeline=1,
                      started=finished - timedelta(seconds=took_s), finished=finished, databases={},
                      seg_size=16 * 2**20)


def test_backups_are_due_by_wal_volume_and_chains_are_kept_whole() -> None:
    hour, mb = timedelta(hours=1), 2**20
    newest = _backup(1, start_mb=100, minutes=0)
    now = newest.finished + timedelta(minutes=2)
    assert retention.due([], now, 0, interval=hour, wal_trigger=0) == "first"
    assert retention.due([newest], now, 300 * mb, interval=hour, wal_trigger=256 * mb) is None  # 200 MB since
    assert retention.due([newest], now, 400 * mb, interval=hour, wal_trigger=256 * mb) == "wal"
    assert retention.due([newest], now, 400 * mb, interval=hour, wal_trigger=0) is None  # off: time only
    assert retention.due([newest], now + hour, 101 * mb, interval=hour, wal_trigger=256 * mb) == "interval"
    slow = _backup(1, start_mb=100, minutes=0, took_s=60, parent="b0")  # took a minute: the next waits 4
    assert retention.due([_backup(1, start_mb=100, minutes=0, took_s=600)], now, 400 * mb, interval=hour,
                         wal_trigger=256 * mb) == "wal"  # a slow full one says nothing of an incremental's cost
    assert retention.due([slow], now, 400 * mb, interval=hour, wal_trigger=256 * mb) is None
    assert retention.due([slow], slow.finished + timedelta(minutes=4), 400 * mb, interval=hour,
                         wal_trigger=256 * mb) == "wal"

    full = _backup(0, start_mb=0, minutes=0)
    incs = [_backup(i, start_mb=i * 300, minutes=i * 10, parent=f"b{i - 1}") for i in range(1, 4)]
    assert not retention.full_needed([full, *incs], incs[-1].finished, hour)
    assert retention.full_needed([full, *incs], full.finished + 7 * hour, hour)
    assert retention.full_needed(None, incs[-1].finished, hour)
    by_label = {b.label: b for b in [full, *incs]}
    assert retention.parent_of(incs[-1], by_label) is incs[-1]
    long = [full] + [_backup(i, start_mb=i, minutes=i, parent=f"b{i - 1}") for i in range(1, retention.MAX_LINKS)]
    assert retention.parent_of(long[-1], {b.label: b for b in long}) is full  # a long chain: back to the full one
    # The window starts after b2 ended: b2 is the start point that covers it (b3 is inside); b0 and b1 stay as
    # links of b2's chain, but the WAL before b2's start goes.
    keep, first_segno = retention.retained([full, *incs], incs[1].finished + timedelta(seconds=1)) or (set(), 0)
    assert keep == {"b0", "b1", "b2", "b3"} and first_segno == incs[1].start_segno
