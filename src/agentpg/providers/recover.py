"""Disaster recovery: rebuild the whole embedded server (catalog and every tenant) from the backup directory.

``recover_embedded(backup_dir, home)`` needs nothing but what archiving keeps in ``<backup_dir>/<server>/``:
the newest restorable base backup (combined when incremental), every WAL segment from its start, and the
copies of the admin password, ``secret.key`` and ``admin-token`` in ``home/``. It replays the WAL to its
end, so the recovery point is the last WAL pg_receivewal wrote: in synchronous mode every acknowledged
commit; otherwise what the receiver had not yet received or written when the server was lost (typically
well under a second of commits; up to ``max_slot_wal_keep_size`` if it had been down).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg

from agentpg.embedded import EmbeddedPostgres, EmbeddedPostgresError, client_bin
from agentpg.errors import ProviderError
from agentpg.providers.archive import Archiver
from agentpg.providers.walfiles import chain, contiguous_from, segments, write_private

_RECOVERY_TIMEOUT_S = 6 * 3600.0


@dataclass(frozen=True)
class Recovered:
    base_backup: str
    wal_segments: int
    last_transaction: str | None
    """The commit time of the last transaction replayed (the recovery point), as the server logged it."""
    port: int


def recover_embedded(backup_dir: Path, home: Path, *, server: str = "local", os_user: str | None = None,
                     fsync: bool = True) -> Recovered:
    """Rebuild ``home``'s embedded server from ``backup_dir``; ``home`` must not hold a server yet."""
    source = backup_dir / server
    embedded = EmbeddedPostgres(home, os_user=os_user, fsync=fsync)
    if (embedded.data_dir / "PG_VERSION").exists() or embedded.password_file.exists():
        raise ProviderError(f"{embedded.root} already holds a server; recover into a new AGENTPG_HOME")
    copies = source / "home"
    if not (copies / "admin-password").is_file():
        raise ProviderError(f"{copies} has no copy of the admin password: not an agentpg backup directory")
    archiver = Archiver(server=server, admin_dsn="postgresql://x@127.0.0.1/postgres", directory=source,
                        work_dir=home / "restore", bin_dir=client_bin(), retention=timedelta(days=36500))
    usable, _ = archiver.restorable()
    if not usable:
        raise ProviderError(f"{source} holds no restorable base backup (with unbroken WAL after it)")
    backup = usable[-1]
    links = chain(backup, {b.label: b for b in archiver.backups()})
    assert links is not None
    home.mkdir(parents=True, exist_ok=True)
    for name in ("secret.key", "admin-token"):
        if (copies / name).is_file():
            write_private(home / name, (copies / name).read_bytes())
    embedded.root.mkdir(parents=True, exist_ok=True)
    data = embedded.data_dir
    if data.exists():
        shutil.rmtree(data)
    if len(links) == 1:
        shutil.copytree(backup.path, data)
    else:
        archiver.run_tool([str(client_bin() / "pg_combinebackup"), "-o", str(data), *(str(b.path) for b in links)],
                          timeout=_RECOVERY_TIMEOUT_S, what="pg_combinebackup")
    for name in ("agentpg-backup.json", "backup_manifest", "postmaster.pid", "standby.signal"):
        (data / name).unlink(missing_ok=True)
    wal = contiguous_from(segments(source / "wal", backup.seg_size), backup.start_segno)
    (data / "pg_wal").mkdir(exist_ok=True)
    for seg in wal:
        shutil.copyfile(seg.path, data / "pg_wal" / seg.name)
    for history in (source / "wal").glob("*.history"):
        shutil.copyfile(history, data / "pg_wal" / history.name)
    auto = data / "postgresql.auto.conf"  # synchronous mode's setting would make every commit wait
    if auto.exists():
        auto.write_text(re.sub(r"(?m)^synchronous_standby_names.*$", "", auto.read_text()))
    with open(data / "postgresql.auto.conf", "a") as conf:
        conf.write("\nrestore_command = '/bin/false'\nrecovery_target_action = 'promote'\n")
    (data / "recovery.signal").write_text("")
    data.chmod(0o700)
    if os.geteuid() == 0:
        uid, gid = embedded._server_ids()
        embedded.root.chmod(0o711)
        for dirpath, _, files in os.walk(data):
            os.chown(dirpath, uid, gid)
            for name in files:
                os.chown(os.path.join(dirpath, name), uid, gid)
    # The password file appears last: its presence means "initialised" (embedded.py).
    write_private(embedded.password_file, (copies / "admin-password").read_bytes())
    try:
        info = embedded.ensure_running()
    except EmbeddedPostgresError as exc:
        raise ProviderError(f"the recovered server did not start: {exc}") from None
    deadline = time.monotonic() + _RECOVERY_TIMEOUT_S
    with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                break
            if time.monotonic() > deadline:
                raise ProviderError("the recovered server is still replaying WAL; see its log")
            time.sleep(0.1)
    _strip_recovery_settings(auto)
    logged = embedded.log_file.read_text(errors="replace")
    found = re.findall(r"last completed transaction was at log time (.+)", logged)
    return Recovered(base_backup=backup.label, wal_segments=len(wal), last_transaction=found[-1] if found else None,
                     port=info.port)


def _strip_recovery_settings(auto: Path) -> None:
    """Drop the recovery-only lines again (they would be ignored, but confuse a reader)."""
    text = auto.read_text()
    text = text.replace("\nrestore_command = '/bin/false'\nrecovery_target_action = 'promote'\n", "\n")
    tmp = auto.with_name(auto.name + ".tmp")
    tmp.write_text(text)
    st = auto.stat()
    if os.geteuid() == 0:
        os.chown(tmp, st.st_uid, st.st_gid)
    tmp.chmod(0o600)
    tmp.replace(auto)
