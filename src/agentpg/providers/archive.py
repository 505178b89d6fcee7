"""Continuous archiving of one PostgreSQL server: streamed WAL plus periodic base backups.

An :class:`Archiver` keeps, in ``<backup_dir>/<server>/`` (layout: :mod:`.walfiles`):

* the server's WAL, streamed by ``pg_receivewal`` through the physical replication slot :data:`SLOT` (the
  server keeps WAL the receiver has not fetched, up to ``max_slot_wal_keep_size``); the receiver is a child
  of the process driving the archiver (``serve``), restarted when it exits and stopped with it. With
  ``synchronous``, the receiver flushes every write and is named in ``synchronous_standby_names`` while it
  streams, so a commit returns only once its WAL is on the backup disk;
* base backups by ``pg_basebackup`` (``-X none``: their WAL comes through the slot), incremental against the
  previous one's manifest where the server summarizes its WAL: when one is due, which kind, and what the
  retention window keeps are :mod:`.retention`'s rules (a restore's replay is bounded by ``wal_trigger``);
* nothing older than the retention window needs: the newest base backup that ended before the window's start
  (and what it builds on) stays, so every instant of the window remains restorable, and WAL from its start;
* what a rebase (:mod:`.rebase`: a fresh full base backup, then nothing older) was asked for, at the next round.

:meth:`Archiver.tick` does one round of that (``serve`` calls it periodically, one process at a time per
server: a session advisory lock on that server). Errors never hold the admin password.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agentpg.errors import ProviderError, ProviderUnavailable
from agentpg.providers import rebase, retention
from agentpg.providers.base import ArchiveStatus, RecoveryTarget
from agentpg.providers.retention import MIN_SPACING
from agentpg.providers.tool_run import ToolInterrupted, run_tool
from agentpg.providers.walfiles import (
    META,
    BaseBackup,
    base_backups,
    chain,
    parse_lsn,
    segments,
    tree_bytes,
    utcnow,
    wal_range,
    write_private,
)

log = logging.getLogger(__name__)

SLOT = "agentpg_backup"
APPLICATION_NAME = "agentpg_backup"
_LOCK_KEY = 0x61677470_61726368  # pg_try_advisory_lock key: one archiver per server across processes
_BACKUP_TIMEOUT_S = 6 * 3600.0
Conn = psycopg.Connection[tuple[Any, ...]]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Archiver:
    """Archiving of one server reached by ``admin_dsn`` into ``directory``."""

    def __init__(self, *, server: str, admin_dsn: str, directory: Path, work_dir: Path, bin_dir: Path,
                 server_bin_dir: Path | None = None, os_user: str | None = None, synchronous: bool = False,
                 retention: timedelta = timedelta(days=7), interval: timedelta = timedelta(hours=24),
                 wal_trigger_mb: int = 0, sync_files: bool = True, home_files: Sequence[Path] = ()) -> None:
        self.server = server
        self.admin_dsn = admin_dsn
        self.directory = directory
        self.wal_dir = directory / "wal"
        self.base_dir = directory / "base"
        self.work_dir = work_dir
        """Where restores build their side instances (reachable by ``os_user``; not the backup directory)."""
        self.bin_dir = bin_dir
        self.server_bin_dir = server_bin_dir or bin_dir
        self.os_user = os_user
        self.synchronous = synchronous
        self.retention = retention
        self.interval = interval
        self.wal_trigger = wal_trigger_mb * 2**20
        """Bytes of WAL since the newest base backup's start that make the next one due (0: time only)."""
        self.min_spacing = MIN_SPACING
        self.sync_files = sync_files
        self.home_files = tuple(home_files)
        params = conninfo_to_dict(admin_dsn)
        self.host = str(params.get("host") or "127.0.0.1")
        self.port = int(params.get("port") or 5432)
        self.user = str(params.get("user") or "postgres")
        self._password = str(params.get("password") or "")
        self._receiver: subprocess.Popen[bytes] | None = None
        self._lock_conn: Conn | None = None
        self._mutex = threading.RLock()
        self._seg_size: int | None = None
        self.last_error: str | None = None

    # -- plumbing --------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGPASSWORD=self._password, LC_ALL="C", LANG="C", PGCONNECT_TIMEOUT="10")
        return env

    def conninfo(self, **extra: str) -> str:
        """The admin's conninfo without the password (tools get it from ``PGPASSWORD``)."""
        return make_conninfo("", host=self.host, port=str(self.port), user=self.user, **extra)

    def connect(self, dbname: str = "postgres") -> Conn:
        try:
            return psycopg.connect(self.admin_dsn, dbname=dbname, autocommit=True, connect_timeout=10,
                                   application_name="agentpg archiver")
        except psycopg.OperationalError:
            raise ProviderUnavailable(f"the PostgreSQL server {self.server!r} cannot be reached") from None

    def run_tool(self, args: Sequence[str], *, timeout: float, what: str,
                 stopping: threading.Event | None = None) -> str:
        """Run a client tool as agentpg's user (:func:`agentpg.providers.tool_run.run_tool`: ProviderError with
        its output, never the password, on failure; ToolInterrupted once ``stopping`` is set)."""
        return run_tool(args, env=self.env(), timeout_s=timeout, what=what, server=self.server,
                        secret=self._password, stopping=stopping)

    def ensure_dirs(self) -> None:
        for path in (self.directory.parent, self.directory, self.wal_dir, self.base_dir, self.directory / "home"):
            path.mkdir(mode=0o700, exist_ok=True)
            path.chmod(0o700)
            st = path.stat()
            if st.st_uid != os.geteuid():
                raise ProviderError(f"backup directory {path} is owned by uid {st.st_uid}, not by the user agentpg "
                                    f"runs as (uid {os.geteuid()}); fix its ownership")

    def seg_size(self, conn: Conn | None = None) -> int:
        if self._seg_size is None:
            if conn is None:
                with self.connect() as fresh:
                    return self.seg_size(fresh)
            row = conn.execute("SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'").fetchone()
            assert row is not None
            self._seg_size = int(row[0])
        return self._seg_size

    def unsupported(self, conn: Conn) -> str | None:
        """Why this server cannot be archived (in words an operator acts on), or None."""
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int, current_setting('wal_level'), "
            "r.rolreplication OR r.rolsuper FROM pg_roles r WHERE r.rolname = current_user").fetchone()
        assert row is not None
        version, wal_level, may_replicate = int(row[0]), str(row[1]), bool(row[2])
        if version // 10000 != 18:
            return (f"the server runs PostgreSQL {version // 10000}; agentpg restores with the bundled "
                    "PostgreSQL 18 and can only archive servers of that major version")
        if wal_level not in ("replica", "logical"):
            return f"the server's wal_level is {wal_level}; set it to replica and restart the server"
        if not may_replicate:
            return (f"agentpg's admin role {self.user!r} may not replicate; ALTER ROLE … REPLICATION and allow "
                    "replication connections for it in pg_hba.conf")
        return None

    # -- the periodic round ----------------------------------------------------------------------------

    def tick(self, *, stopping: threading.Event | None = None) -> bool:
        """One round: hold the server's archiving lock, keep the slot and the receiver up, take a base backup
        when one is due, apply retention. Returns False when another process archives this server."""
        with self._mutex:
            if not self._hold_lock():
                self.stop_receiver()
                return False
            self.ensure_dirs()
            self.copy_home_files()
            with self.connect() as conn:
                reason = self.unsupported(conn)
                if reason is not None:
                    self.last_error = reason
                    return True
                self.ensure_slot(conn)
                if self.synchronous is False or self._receiver is None or self._receiver.poll() is not None:
                    self._set_synchronous(conn, False)
                current = parse_lsn(str(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]))  # type: ignore[index]
            self.ensure_receiver()
            streaming = self._wait_streaming(timeout=10.0)
            if self.synchronous:
                with self.connect() as conn:
                    self._set_synchronous(conn, streaming and self._streaming(conn))
            if stopping is not None and stopping.is_set():
                return True
            existing = self.backups()
            if rebase.pending(self):
                rebase.run_pending(self)
            elif why := retention.due(existing, utcnow(), current, interval=self.interval,
                                      wal_trigger=self.wal_trigger, min_spacing=self.min_spacing):
                # The first one at once (nothing is restorable before it), a WAL-triggered one too (see
                # retention.due); periodic ones with a spread checkpoint (gentle on I/O).
                self.backup_now(fast=why != "interval", stopping=stopping)
            self.apply_retention()
            self.last_error = None if streaming else f"pg_receivewal is not streaming: {self._receiver_log()}"
            return True

    def _receiver_log(self) -> str:
        try:
            lines = (self.directory / "pg_receivewal.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def _hold_lock(self) -> bool:
        if self._lock_conn is not None:
            try:
                self._lock_conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                with contextlib.suppress(psycopg.Error):
                    self._lock_conn.close()
                self._lock_conn = None
        conn = self.connect()
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()
        if row and row[0]:
            self._lock_conn = conn
            return True
        conn.close()
        return False

    def ensure_slot(self, conn: Conn) -> None:
        row = conn.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()
        if row is not None and row[0] == "lost":
            # The receiver was away longer than max_slot_wal_keep_size allowed: the WAL has a gap. Start over
            # with a new slot and a full base backup (older backups stay restorable up to the gap's start).
            log.warning("the backup slot on server %s lost WAL; taking a new full base backup", self.server)
            self.stop_receiver()
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
            row = None
            self._force_full = True
        if row is None:
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (SLOT,))

    _force_full = False

    def ensure_receiver(self) -> None:
        """Start ``pg_receivewal`` unless ours runs (a child that exited is started again)."""
        if self._receiver is not None and self._receiver.poll() is None:
            return
        if self._receiver is not None:
            log.warning("pg_receivewal of server %s exited (code %s); starting it again", self.server,
                        self._receiver.returncode)
        args = [str(self.bin_dir / "pg_receivewal"), "-d", self.conninfo(application_name=APPLICATION_NAME),
                "-D", str(self.wal_dir), "--slot", SLOT, "-n", "--status-interval", "1", "-w"]
        if self.synchronous:
            args.append("--synchronous")
        elif not self.sync_files:
            args.append("--no-sync")
        log_path = self.directory / "pg_receivewal.log"
        with open(log_path, "ab") as log_file:
            os.chmod(log_path, 0o600)
            self._receiver = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file,
                                              stderr=subprocess.STDOUT, env=self.env(),
                                              preexec_fn=_die_with_parent)

    def stop_receiver(self) -> None:
        proc, self._receiver = self._receiver, None
        if proc is None or proc.poll() is not None:
            return
        if self.synchronous:  # commits must not wait for a receiver that is going away
            with contextlib.suppress(ProviderError, psycopg.Error), self.connect() as conn:
                self._set_synchronous(conn, False)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)

    def stop(self) -> None:
        """Stop the receiver and release the lock (``serve`` stopping)."""
        with self._mutex:
            self.stop_receiver()
            if self._lock_conn is not None:
                # Unlock before closing: a closed session's backend drops its locks only once it has exited, a
                # moment later (longer on a busy host), and the process taking over would find the lock held.
                with contextlib.suppress(psycopg.Error):
                    self._lock_conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
                with contextlib.suppress(psycopg.Error):
                    self._lock_conn.close()
                self._lock_conn = None

    def _streaming(self, conn: Conn) -> bool:
        row = conn.execute("SELECT 1 FROM pg_stat_replication WHERE application_name = %s AND state = 'streaming'",
                           (APPLICATION_NAME,)).fetchone()
        return row is not None

    def _wait_streaming(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while time.monotonic() < deadline:
                if self._streaming(conn):
                    return True
                if self._receiver is None or self._receiver.poll() is not None:
                    return False
                time.sleep(0.05)
        return False

    def _set_synchronous(self, conn: Conn, on: bool) -> None:
        ours = f'"{APPLICATION_NAME}"'
        wanted = ours if on else ""
        row = conn.execute("SELECT current_setting('synchronous_standby_names')").fetchone()
        current = str(row[0]) if row is not None else ""
        if current == wanted:
            return
        if current not in ("", ours):  # the operator's own standbys: never touched
            if on:
                log.warning("server %s already has synchronous_standby_names; the backups stay asynchronous",
                            self.server)
            return
        if on:
            conn.execute(sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(wanted)))
        else:
            conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        conn.execute("SELECT pg_reload_conf()")

    def write_position(self, conn: Conn) -> int | None:
        """How far the streaming receiver has written WAL into the backup directory (None: not streaming)."""
        row = conn.execute("SELECT write_lsn::text FROM pg_stat_replication WHERE application_name = %s "
                           "AND write_lsn IS NOT NULL ORDER BY write_lsn DESC LIMIT 1", (APPLICATION_NAME,)).fetchone()
        return parse_lsn(str(row[0])) if row else None

    def wait_archived(self, lsn: int, timeout: float = 60.0) -> None:
        """Return once the WAL up to ``lsn`` is in the backup directory. With no receiver streaming (no
        ``serve`` running), fetch it with a one-shot ``pg_receivewal --endpos``."""
        deadline = time.monotonic() + timeout
        with self.connect() as conn:
            while True:
                position = self.write_position(conn)
                if position is not None and position >= lsn:
                    return
                active = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                                      (SLOT,)).fetchone()
                if active is None:
                    raise ProviderError(f"server {self.server!r} has no backup slot: archiving never ran")
                if not active[0]:
                    with contextlib.suppress(ProviderError):
                        self.run_tool([str(self.bin_dir / "pg_receivewal"), "-d", self.conninfo(
                            application_name=APPLICATION_NAME + "_catchup"), "-D", str(self.wal_dir), "--slot",
                            SLOT, "-n", "--endpos", f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", "--no-loop"]
                            + ([] if self.sync_files else ["--no-sync"]),
                            timeout=max(5.0, deadline - time.monotonic()), what="fetching WAL")
                        return
                if time.monotonic() > deadline:
                    raise ProviderError(f"the WAL of server {self.server!r} did not reach the backup directory "
                                        f"within {timeout:.0f}s")
                time.sleep(0.05)

    # -- base backups ----------------------------------------------------------------------------------

    def backups(self) -> list[BaseBackup]:
        return base_backups(self.base_dir)

    def backup_now(self, *, fast: bool = True, full: bool | None = None,
                   stopping: threading.Event | None = None) -> BaseBackup:
        """Take a base backup now (incremental against the newest one unless ``full`` or none is usable).
        Raises ToolInterrupted (nothing kept) once ``stopping`` is set: ``serve`` stopping does not wait for a
        backup of several GB."""
        with self._mutex:
            self.ensure_dirs()
            for leftover in self.base_dir.glob(".tmp-*"):  # an interrupted earlier run
                shutil.rmtree(leftover, ignore_errors=True)
            with self.connect() as conn:
                reason = self.unsupported(conn)
                if reason is not None:
                    raise ProviderError(f"server {self.server!r} cannot be archived: {reason}")
                self.ensure_slot(conn)
                seg_size = self.seg_size(conn)
                summarize = conn.execute("SELECT current_setting('summarize_wal')").fetchone()
                databases = {str(r[0]): int(r[1]) for r in conn.execute("SELECT datname, oid FROM pg_database")}
            existing = self.backups()
            by_label = {b.label: b for b in existing}
            parent = retention.parent_of(existing[-1], by_label) if existing else None
            links = chain(parent, by_label) if parent is not None else None
            incremental = (full is not True and parent is not None and not self._force_full
                           and not retention.full_needed(links, utcnow(), self.interval)
                           and summarize is not None and summarize[0] == "on")
            started = utcnow()
            label = started.strftime("%Y%m%dT%H%M%S%fZ") + ("-incr" if incremental else "-full")
            tmp = self.base_dir / f".tmp-{label}"
            args = [str(self.bin_dir / "pg_basebackup"), "-d", self.conninfo(application_name="agentpg_basebackup"),
                    "-D", str(tmp), "-X", "none", "-c", "fast" if fast else "spread", "-l", f"agentpg {label}"]
            if not self.sync_files:
                args.append("--no-sync")
            if incremental and parent is not None:
                args.append(f"--incremental={parent.path / 'backup_manifest'}")
            try:
                try:
                    self.run_tool(args, timeout=_BACKUP_TIMEOUT_S, what="pg_basebackup", stopping=stopping)
                except ToolInterrupted:
                    raise
                except ProviderError:
                    if not incremental:
                        raise
                    log.warning("incremental base backup of server %s failed; taking a full one", self.server)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self.backup_now(fast=fast, full=True, stopping=stopping)
                timeline, start_lsn, end_lsn = wal_range(tmp / "backup_manifest")
                backup = BaseBackup(path=self.base_dir / label, label=label,
                                    incremental_of=parent.label if incremental and parent is not None else None,
                                    start_lsn=start_lsn, end_lsn=end_lsn, timeline=timeline, started=started,
                                    finished=utcnow(), databases=databases, seg_size=seg_size)
                write_private(tmp / META, json.dumps(backup.to_json()).encode())
                tmp.rename(backup.path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            self._force_full = False
            log.info("base backup %s of server %s taken", label, self.server)
            return backup

    def copy_home_files(self) -> None:
        """Keep copies (0600) of what disaster recovery needs besides the data: admin password, key, token."""
        for path in self.home_files:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            copy = self.directory / "home" / path.name
            with contextlib.suppress(OSError):
                if copy.read_bytes() == data:
                    continue
            write_private(copy, data)

    # -- retention and status --------------------------------------------------------------------------

    def apply_retention(self, now: datetime | None = None) -> list[str]:
        """Delete base backups and WAL the retention window does not need (:func:`.retention.retained`);
        return the labels deleted."""
        with self._mutex:
            existing = self.backups()
            kept = retention.retained(existing, (now or utcnow()) - self.retention) if existing else None
            if kept is None:
                return []
            keep, first_segno = kept
            deleted = [b for b in existing if b.label not in keep]
            for backup in deleted:
                shutil.rmtree(backup.path, ignore_errors=True)
            for seg in segments(self.wal_dir, existing[0].seg_size):
                if seg.segno < first_segno:
                    seg.path.unlink(missing_ok=True)
            return [b.label for b in deleted]

    def start_for(self, target: RecoveryTarget) -> BaseBackup | None:
        """The newest restorable base backup a restore to ``target`` can start from (one that ended before
        it), or None when ``target`` is before the oldest restorable point."""
        return retention.start_for(self.restorable()[0], target)

    def restorable(self) -> tuple[list[BaseBackup], int | None]:
        """The base backups a restore can start from (complete chain, unbroken WAL from their start to the
        newest segment), oldest first, and the newest WAL segment number held."""
        usable, found = retention.restorable(self.backups(), self.wal_dir)
        return usable, found[-1].segno if found else None

    def status(self) -> ArchiveStatus:
        usable, _ = self.restorable()
        count = len(self.backups())
        total = tree_bytes(self.directory) if self.directory.exists() else 0
        latest: datetime | None = None
        reason = self.last_error
        try:
            with self.connect() as conn:
                reason = self.unsupported(conn) or reason
                # Caught up: now. Behind: what it had written when it last reported (less the lag then).
                row = conn.execute(
                    "SELECT CASE WHEN r.write_lsn >= pg_current_wal_flush_lsn() THEN now() "
                    "ELSE r.reply_time - coalesce(r.write_lag, '0') END FROM pg_stat_replication r "
                    "WHERE r.application_name = %s AND r.write_lsn IS NOT NULL ORDER BY r.write_lsn DESC LIMIT 1",
                    (APPLICATION_NAME,)).fetchone()
                latest = row[0] if row is not None else None
        except ProviderUnavailable:
            reason = reason or f"the server {self.server!r} cannot be reached"
        if latest is None:
            files = segments(self.wal_dir, usable[0].seg_size) if usable else []
            if files:
                latest = datetime.fromtimestamp(files[-1].path.stat().st_mtime, tz=utcnow().tzinfo)
        if not usable and reason is None:
            reason = "no base backup yet (serve takes the first one when it starts)"
        protected = bool(usable) and reason is None
        return ArchiveStatus(server=self.server, protected=protected, reason=None if protected else reason,
                             earliest=usable[0].finished if usable else None, latest=latest if usable else None,
                             base_backups=count, bytes=total, synchronous=self.synchronous,
                             rebase_pending=rebase.pending(self))
