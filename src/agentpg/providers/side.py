"""A short-lived side instance: one database of a server recovered to a point in time, from the backups.

Built in ``<work_dir>/side-<id>/`` (never inside the backup directory: the server's OS user must reach it):
``data/`` is the base backup (combined first when incremental) *without* the ``base/<oid>`` directories of
every database but the templates, ``postgres`` and the one asked for, plus the WAL segments from the backup's
start; the server recreates what redo needs from full-page images, and WAL touching the omitted databases
does no harm. It listens on a free loopback port only, admits only the admin (scram-sha-256), archives
nothing, and is stopped and deleted whatever happens. A crashed attempt's directory is found and removed by
the next one (each live attempt holds an ``flock`` on its ``lock`` file).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from agentpg.errors import ProviderError
from agentpg.providers.archive import Archiver
from agentpg.providers.base import NotRestorable, RecoveryTarget
from agentpg.providers.walfiles import BaseBackup, Segment

log = logging.getLogger(__name__)

#: Settings whose value on a hot standby must be at least the primary's.
STANDBY_MINIMUMS = ("max_connections", "max_worker_processes", "max_wal_senders", "max_prepared_transactions",
                    "max_locks_per_transaction")
_STALE_NEW_S = 3600.0
_START_TIMEOUT_S = 3600.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class SideInstance:
    """One recovery attempt; use as a context manager (the exit always stops and deletes it)."""

    def __init__(self, archiver: Archiver) -> None:
        self.archiver = archiver
        self.root: Path | None = None
        self.data: Path | None = None
        self.port = 0
        self._lock_fd: int | None = None
        self._ids = self._server_ids(archiver.os_user)

    @staticmethod
    def _server_ids(os_user: str | None) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        entry = pwd.getpwnam(os_user or "nobody")
        if entry.pw_uid == 0:
            raise ProviderError("PostgreSQL refuses to run as root; choose an unprivileged server OS user")
        return entry.pw_uid, entry.pw_gid

    # -- lifetime --------------------------------------------------------------------------------------

    def __enter__(self) -> SideInstance:
        work = self.archiver.work_dir
        work.mkdir(parents=True, exist_ok=True)
        work.chmod(0o711 if self._ids else 0o700)
        clean_leftovers(work, self._ids)
        new = work / f".new-{secrets.token_hex(6)}"
        new.mkdir(mode=0o711 if self._ids else 0o700)
        self._lock_fd = os.open(new / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.root = work / new.name.replace(".new-", "side-", 1)
        new.rename(self.root)
        self.data = self.root / "data"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.root is not None:
                _stop_and_remove(self.root, self._ids)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- building --------------------------------------------------------------------------------------

    def build(self, links: Sequence[BaseBackup], keep_oids: Iterable[int], wal: Sequence[Segment],
              conf: Mapping[str, str], target: RecoveryTarget) -> None:
        """Lay out the data directory: the backup (combined when incremental) minus the omitted databases,
        the WAL, and a configuration that recovers to ``target`` and then promotes."""
        assert self.data is not None and self.root is not None
        keep = {str(oid) for oid in keep_oids}
        newest = links[-1]
        if len(links) == 1:
            shutil.copytree(newest.path, self.data, ignore=_omitting(newest.path, keep, manifest=False))
        else:
            self._combine(links, keep)
        pg_wal = self.data / "pg_wal"
        pg_wal.mkdir(exist_ok=True)
        for seg in wal:
            try:
                shutil.copyfile(seg.path, pg_wal / seg.name)
            except FileNotFoundError:
                # pg_receivewal renames a .partial segment once it is complete, between our listing of the
                # directory and the copy: the completed segment is the same one, only longer.
                if not seg.partial:
                    raise
                shutil.copyfile(seg.path.with_name(seg.name), pg_wal / seg.name)
        for history in self.archiver.wal_dir.glob("*.history"):
            shutil.copyfile(history, pg_wal / history.name)
        for name in ("postmaster.pid", "postmaster.opts", "standby.signal", "recovery.signal"):
            (self.data / name).unlink(missing_ok=True)
        self.port = _free_port()
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": "",
            "shared_buffers": "64MB", "fsync": "off", "synchronous_commit": "off", "full_page_writes": "on",
            "archive_mode": "off", "summarize_wal": "off", "synchronous_standby_names": "", "hot_standby": "on",
            "wal_level": "replica", "password_encryption": "scram-sha-256", "logging_collector": "off",
            "autovacuum": "off", "restore_command": "/bin/false", "recovery_target_inclusive": "off",
            "recovery_target_action": "promote", "recovery_target_timeline": "current",
            "max_slot_wal_keep_size": "-1",
        }
        settings.update(conf)
        if target.lsn is not None:
            settings["recovery_target_lsn"] = target.lsn
        else:
            assert target.time is not None
            settings["recovery_target_time"] = target.time.isoformat(sep=" ")
        lines = [f"{key} = {value if value.lstrip('-').isdigit() else _quote(value)}"
                 for key, value in settings.items()]
        (self.data / "postgresql.conf").write_text("# agentpg side instance (restore)\n" + "\n".join(lines) + "\n")
        (self.data / "postgresql.auto.conf").write_text("")
        (self.data / "pg_hba.conf").write_text(f"host all {_hba_word(self.archiver.user)} 127.0.0.1/32 scram-sha-256\n")
        (self.data / "pg_ident.conf").write_text("")
        (self.data / "recovery.signal").write_text("")
        self.data.chmod(0o700)
        if self._ids is not None:
            uid, gid = self._ids
            for dirpath, _, filenames in os.walk(self.data):
                os.chown(dirpath, uid, gid)
                for name in filenames:
                    os.chown(os.path.join(dirpath, name), uid, gid)

    def _combine(self, links: Sequence[BaseBackup], keep: set[str]) -> None:
        """``pg_combinebackup`` of views of the chain holding only the kept databases (hard links, made in
        no time), so the cost follows the database; the whole chain where links cannot be made."""
        assert self.data is not None and self.root is not None
        views = self.root / "views"
        tool = [str(self.archiver.bin_dir / "pg_combinebackup"), "--no-sync", "-o", str(self.data)]
        try:
            inputs = []
            for backup in links:
                view = views / backup.label
                shutil.copytree(backup.path, view, ignore=_omitting(backup.path, keep, manifest=True),
                                copy_function=os.link)
                inputs.append(str(view))
            self.archiver.run_tool([*tool, *inputs], timeout=_START_TIMEOUT_S, what="pg_combinebackup")
        except (OSError, ProviderError) as exc:
            log.warning("combining views of the backups failed (%s); combining them whole", exc)
            shutil.rmtree(self.data, ignore_errors=True)
            self.archiver.run_tool([*tool, *(str(b.path) for b in links)], timeout=_START_TIMEOUT_S,
                                   what="pg_combinebackup")
        finally:
            shutil.rmtree(views, ignore_errors=True)
        for child in (self.data / "base").iterdir():
            if child.name not in keep:
                shutil.rmtree(child)
        for name in ("agentpg-backup.json", "backup_manifest"):
            (self.data / name).unlink(missing_ok=True)

    # -- running ---------------------------------------------------------------------------------------

    def _as_server(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        kwargs: dict[str, object] = {}
        if self._ids is not None:
            kwargs.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        done: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
            list(args), stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout, check=False,
            start_new_session=True, **kwargs)
        return done

    def log_tail(self, lines: int = 25) -> str:
        assert self.root is not None
        try:
            return "\n".join((self.root / "log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def recover(self, target: RecoveryTarget) -> None:
        """Start it and wait until recovery reached ``target`` and the instance promoted itself."""
        assert self.root is not None and self.data is not None
        log_path = self.root / "log"
        log_path.touch(mode=0o600)
        if self._ids is not None:
            os.chown(log_path, *self._ids)
        pg_ctl = str(self.archiver.server_bin_dir / "pg_ctl")
        started = self._as_server([pg_ctl, "start", "-D", str(self.data), "-l", str(log_path), "-w", "-t",
                                   str(int(_START_TIMEOUT_S)), "-s"], timeout=_START_TIMEOUT_S + 30)
        deadline = time.monotonic() + _START_TIMEOUT_S
        dsn = make_conninfo(self.archiver.admin_dsn, host="127.0.0.1", port=str(self.port), dbname="postgres")
        promoted = False
        while started.returncode == 0:
            with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
                    dsn, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    promoted = True
                    break
            if _postmaster_pid(self.data) is None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        text = self.log_tail(200)
        if "recovery ended before configured recovery target was reached" in text:
            raise NotRestorable("that point is after the newest WAL in the backups: "
                                f"{target.lsn or target.time} cannot be restored yet")
        if "before consistent recovery point" in text:
            raise NotRestorable(f"{target.lsn or target.time} is before the oldest restorable point")
        # Promoted (out of recovery) and stopped at the target. (Not "ready to accept connections": the log
        # may not say so yet when pg_is_in_recovery() already answers false.)
        if not promoted or "recovery stopping" not in text:
            # The side instance's log is for the operator (agentpg's log), not for an API answer.
            log.warning("a restore's recovery did not reach its target; the side instance's log ends:\n%s",
                        self.log_tail())
            raise ProviderError("the restore's recovery did not reach its target (agentpg's log has the details); "
                                "nothing was changed, retry or restore to another point")

    def dump(self, database: str, into: Path) -> None:
        """``pg_dump -Fc -Z0`` one database of the recovered instance. Uncompressed: the file lives only until
        it is loaded, and compression was the dump's main cost (one CPU: 5.8 s vs 2.2 s for a 337 MB table,
        the file 4x larger)."""
        dsn = make_conninfo(self.archiver.conninfo(), port=str(self.port), dbname=database)
        try:
            self.archiver.run_tool([str(self.archiver.bin_dir / "pg_dump"), "-Fc", "-Z0", "-d", dsn, "-f", str(into)],
                                   timeout=_START_TIMEOUT_S, what="pg_dump of the restored database")
        except ProviderError as exc:
            if "does not exist" in exc.message:
                raise NotRestorable(f"database {database} did not exist at that point") from None
            raise


def _omitting(root: Path, keep: set[str], *, manifest: bool) -> Callable[[str, list[str]], list[str]]:
    """A copytree filter leaving out ``base/<oid>`` of every database not kept (and agentpg's metadata)."""
    def skip(directory: str, names: list[str]) -> list[str]:
        if Path(directory) == root / "base":
            return [n for n in names if n not in keep]
        if Path(directory) == root:
            return [n for n in names if n == "agentpg-backup.json" or (n == "backup_manifest" and not manifest)]
        return []

    return skip


def _hba_word(user: str) -> str:
    return '"' + user.replace('"', '""') + '"'


def _postmaster_pid(data: Path) -> int | None:
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _stop_and_remove(root: Path, ids: tuple[int, int] | None) -> None:
    """Kill a side instance's postmaster (if any) and delete its directory."""
    pid = _postmaster_pid(root / "data")
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown: nothing in it is worth keeping
        deadline = time.monotonic() + 30
        while _postmaster_pid(root / "data") == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if _postmaster_pid(root / "data") == pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
    shutil.rmtree(root, ignore_errors=True)


def clean_leftovers(work: Path, ids: tuple[int, int] | None) -> list[str]:
    """Remove side instances no live attempt holds (a crashed restore's), stopping their servers."""
    removed = []
    for path in sorted(work.glob("side-*")) + sorted(work.glob(".new-*")):
        if path.name.startswith(".new-"):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > _STALE_NEW_S:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
            _stop_and_remove(path, ids)
            removed.append(path.name)
        finally:
            if fd is not None:
                os.close(fd)
    return removed

