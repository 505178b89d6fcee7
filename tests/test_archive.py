"""Undo's engine on a real server: continuous archiving, restore points, one-database point-in-time restore,
the in-place swap, retention. A private embedded server (fsync off, full_page_writes on) in a temp home."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from agentpg.embedded import EmbeddedPostgres, client_bin
from agentpg.errors import ProviderError
from agentpg.providers.archive import APPLICATION_NAME, Archiver
from agentpg.providers.archiving import ArchiveJob, attach_archivers
from agentpg.providers.base import AgentPermissions, DatabasePlan, NotRestorable, RecoveryTarget
from agentpg.providers.local import LocalProvider
from agentpg.providers.pitr import REPLACED_SUFFIX
from agentpg.providers.recover import recover_embedded
from agentpg.providers.tool_run import ToolInterrupted
from agentpg.providers.walfiles import parse_lsn, segments
from agentpg.settings import Settings

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass
class Env:
    home: Path
    server: EmbeddedPostgres
    dsn: str
    archiver: Archiver
    provider: LocalProvider

    def connect(self, dbname: str = "postgres") -> Conn:
        return psycopg.connect(make_conninfo(self.dsn, dbname=dbname), autocommit=True)

    def new_database(self) -> DatabasePlan:
        plan = DatabasePlan.fresh(self.provider.server_name)
        self.provider.create_database(plan, "pw-" + plan.database)
        return plan


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="agentpg-archive-", dir="/tmp"))
    home.chmod(0o711)
    server = EmbeddedPostgres(home, fsync=False)
    dsn = server.ensure_running().dsn("postgres")
    archiver = Archiver(server="local", admin_dsn=dsn, directory=home / "backup" / "local", work_dir=home / "restore",
                        bin_dir=client_bin(), server_bin_dir=server.server_bin(), sync_files=False,
                        home_files=[server.password_file])
    provider = LocalProvider(dsn, extensions=["pg_trgm"])
    provider.archiver = archiver
    try:
        assert archiver.tick()  # slot, receiver, first (full) base backup
        yield Env(home, server, dsn, archiver, provider)
    finally:
        archiver.stop()
        provider.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def rows(env: Env, database: str, query: str) -> list[tuple[Any, ...]]:
    with env.connect(database) as conn:
        return conn.execute(query).fetchall()


def no_leftovers(env: Env) -> None:
    assert not list(env.archiver.work_dir.glob("side-*")), "a side instance directory was left behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(env.archiver.work_dir) not in ps, "a side instance process was left running"


def test_archiving_runs(env: Env) -> None:
    with env.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    env.archiver.wait_archived(parse_lsn(str(row[0])))
    status = env.provider.archive_status()[0]
    assert status.protected, status.reason
    assert status.base_backups == 1 and status.bytes > 0
    assert status.earliest is not None and status.latest is not None and status.earliest <= status.latest
    with env.connect() as conn:
        assert conn.execute("SELECT state FROM pg_stat_replication WHERE application_name = %s",
                            (APPLICATION_NAME,)).fetchone() == ("streaming",)
        assert conn.execute("SHOW full_page_writes").fetchone() == ("on",)
        assert conn.execute("SHOW summarize_wal").fetchone() == ("on",)
    assert segments(env.archiver.wal_dir, 16 * 1024 * 1024)
    for path in (env.archiver.directory.parent, env.archiver.directory, env.archiver.wal_dir):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    copy = env.archiver.directory / "home" / "admin-password"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert copy.read_text() == env.server.password_file.read_text()
    assert env.archiver.tick()  # a second round: nothing due, the receiver is still ours
    assert env.archiver.backups()[-1:] == env.archiver.backups()[-1:] and len(env.archiver.backups()) == 1


def test_mark_point_copies_nothing(env: Env) -> None:
    """A checkpoint is a WAL record, not a copy: twenty of them on a database of several MB add a few
    hundred bytes of WAL each, whatever the size (bench/undo.py has the timing)."""
    plan = env.new_database()
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE big AS SELECT g, md5(g::text) AS m FROM generate_series(1, 100000) g")
    lsns = []
    for n in range(20):
        lsn, at = env.provider.mark_point(plan, f"checkpoint {n} " + "x" * 80)  # long labels are cut
        assert "/" in lsn and at.tzinfo is not None
        lsns.append(parse_lsn(lsn))
    assert lsns == sorted(lsns)
    assert lsns[-1] - lsns[0] < 20 * 4096, "twenty restore points wrote more WAL than twenty small records"


def _fill(env: Env, plan: DatabasePlan) -> None:
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE keep (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO keep SELECT g, md5(g::text) FROM generate_series(1, 2000) g")
        conn.execute("CREATE TABLE doomed AS SELECT g AS id FROM generate_series(1, 300) g")
        conn.execute("CREATE VIEW v AS SELECT id FROM keep WHERE id < 10")
        conn.execute("CREATE MATERIALIZED VIEW mv AS SELECT count(*) AS n FROM keep")
        conn.execute("CREATE TYPE mood AS ENUM ('ok', 'bad')")


def _mistake(env: Env, plan: DatabasePlan) -> None:
    with env.connect(plan.database) as conn:
        conn.execute("DROP TABLE doomed")
        conn.execute("DELETE FROM keep WHERE id % 3 = 0")
        conn.execute("CREATE TABLE wrong (x int)")


def _check_restored(env: Env, plan: DatabasePlan, restored: DatabasePlan, expected: list[tuple[Any, ...]]) -> None:
    db = restored.database
    assert rows(env, db, "SELECT id, note FROM keep ORDER BY id") == expected
    assert rows(env, db, "SELECT count(*) FROM doomed") == [(300,)]
    assert rows(env, db, "SELECT to_regclass('public.wrong')") == [(None,)]
    owners = rows(env, db, "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
                           "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r','v','m')")
    assert owners == [(plan.owner_role,)]
    assert rows(env, db, "SELECT pg_get_userbyid(typowner) FROM pg_type WHERE typname = 'mood'") == [(plan.owner_role,)]
    assert rows(env, db, "SELECT relispopulated FROM pg_class WHERE relname = 'mv'") == [(False,)]
    assert rows(env, db, "SELECT value FROM agentpg_internal.config WHERE key = 'owner_role'") == [(plan.owner_role,)]
    acl = rows(env, "postgres", f"SELECT datacl::text FROM pg_database WHERE datname = '{db}'")[0][0]
    assert f"{plan.login_role}=c/" in acl and "=Tc/" not in acl and not acl.startswith("{=")
    # The tenant's own login role works on it, as its owner role's member.
    uri = env.provider.uri(db, plan.login_role, "pw-" + plan.database)
    with psycopg.connect(uri, autocommit=True) as tenant:
        assert tenant.execute("SELECT count(*) FROM keep").fetchone() == (len(expected),)
        tenant.execute("CREATE TABLE made_after (x int)")


def test_restore_to_checkpoint_and_time(env: Env) -> None:
    plan, other = env.new_database(), env.new_database()
    _fill(env, plan)
    with env.connect(other.database) as conn:
        conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
    expected = rows(env, plan.database, "SELECT id, note FROM keep ORDER BY id")
    lsn, at = env.provider.mark_point(plan, "before the mistake")
    time.sleep(0.05)
    _mistake(env, plan)
    with env.connect(other.database) as conn:
        conn.execute("UPDATE t SET g = -g")

    stop = threading.Event()
    errors: list[BaseException] = []
    writes = [0]

    def keep_writing() -> None:  # another database on the same server stays available during the restore
        try:
            with env.connect(other.database) as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO t VALUES (1)")
                    writes[0] += 1
                    time.sleep(0.01)
        except BaseException as exc:  # reported below
            errors.append(exc)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        by_lsn = DatabasePlan.fresh(env.provider.server_name)
        env.provider.restore_database(plan, RecoveryTarget(lsn=lsn), by_lsn)
    finally:
        stop.set()
        writer.join()
    assert not errors and writes[0] > 10
    _check_restored(env, plan, by_lsn, expected)
    assert rows(env, other.database, "SELECT count(*) FROM t WHERE g < 0") == [(1000,)]  # untouched
    assert rows(env, plan.database, "SELECT to_regclass('public.doomed')") == [(None,)]  # the original too

    by_time = DatabasePlan.fresh(env.provider.server_name)
    env.provider.restore_database(plan, RecoveryTarget(time=at), by_time)
    _check_restored(env, plan, by_time, expected)
    # Idempotent: a rerun (after a crash, say) drops the half-made copy and makes it again.
    with env.connect(by_time.database) as conn:
        conn.execute("DROP TABLE keep CASCADE")
    env.provider.restore_database(plan, RecoveryTarget(time=at), by_time)
    _check_restored(env, plan, by_time, expected)
    no_leftovers(env)


def test_targets_outside_the_backups_are_not_restorable(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = env.new_database()
    first = env.archiver.backups()[0]
    into = DatabasePlan.fresh(env.provider.server_name)
    with pytest.raises(NotRestorable, match="before the oldest"):
        env.provider.restore_database(plan, RecoveryTarget(lsn="0/1000000"), into)
    with pytest.raises(NotRestorable, match="before the oldest"):
        env.provider.restore_database(plan, RecoveryTarget(time=first.started - timedelta(minutes=1)), into)
    with pytest.raises(NotRestorable, match="not been written"):
        env.provider.restore_database(plan, RecoveryTarget(lsn="FFF/0"), into)
    with pytest.raises(NotRestorable, match="future"):
        env.provider.restore_database(plan, RecoveryTarget(time=first.started + timedelta(days=1)), into)
    # WAL the backups do not hold yet (the receiver is behind): refused by recovery, not restored short.
    env.archiver.stop_receiver()
    try:
        with env.connect(plan.database) as conn:
            conn.execute("CREATE TABLE late AS SELECT 1 AS x")
            conn.execute("SELECT pg_switch_wal()")
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        monkeypatch.setattr(env.archiver, "wait_archived", lambda lsn, timeout=60.0: None)
        with pytest.raises(NotRestorable, match="newest WAL"):
            env.provider.restore_database(plan, RecoveryTarget(lsn=str(row[0])), into)
        monkeypatch.undo()
        # With no receiver running (no serve), a restore fetches the WAL it needs itself.
        env.provider.restore_database(plan, RecoveryTarget(lsn=str(row[0])), into)
        assert rows(env, into.database, "SELECT x FROM late") == [(1,)]
        env.provider.drop_orphan(database=into.database)
    finally:
        monkeypatch.undo()
        env.archiver.ensure_receiver()
    with env.connect() as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (into.database,)).fetchone() is None
    no_leftovers(env)


def test_restore_after_an_incremental_backup(env: Env) -> None:
    plan = env.new_database()
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE a AS SELECT g FROM generate_series(1, 500) g")
    backup = env.archiver.backup_now()
    assert backup.incremental_of is not None
    with env.connect(plan.database) as conn:
        conn.execute("INSERT INTO a SELECT g FROM generate_series(501, 700) g")
    lsn, _ = env.provider.mark_point(plan, "after incremental")
    with env.connect(plan.database) as conn:
        conn.execute("TRUNCATE a")
    into = DatabasePlan.fresh(env.provider.server_name)
    env.provider.restore_database(plan, RecoveryTarget(lsn=lsn), into)
    assert rows(env, into.database, "SELECT count(*), max(g) FROM a") == [(700, 700)]
    no_leftovers(env)


def _names(env: Env, *names: str) -> set[str]:
    with env.connect() as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)", (list(names),))}


@pytest.mark.parametrize("done_by_hand", [0, 1, 2, 3])
def test_replace_finishes_after_each_step(env: Env, done_by_hand: int) -> None:
    plan = env.new_database()
    restored = DatabasePlan.fresh(env.provider.server_name)
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE which AS SELECT 'original' AS v")
    with env.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(restored.database), sql.Identifier(plan.database)))
    with env.connect(restored.database) as conn:
        conn.execute("UPDATE which SET v = 'restored'")
    old = plan.database + REPLACED_SUFFIX
    session = env.connect(plan.database)  # an open session on the original is ended by the swap
    with env.connect() as conn:
        if done_by_hand >= 1:
            session.close()
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(plan.database)))
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(plan.database), sql.Identifier(old)))
        if done_by_hand >= 2:
            conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(restored.database), sql.Identifier(plan.database)))
        if done_by_hand >= 3:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(old)))
    env.provider.replace_database(plan, restored)
    env.provider.replace_database(plan, restored)  # and again: nothing left to do
    assert _names(env, plan.database, restored.database, old) == {plan.database}
    assert rows(env, plan.database, "SELECT v FROM which") == [("restored",)]
    session.close()


def test_retention_keeps_the_window_restorable(env: Env) -> None:
    plan = env.new_database()
    with env.connect() as conn:
        conn.execute("SELECT pg_switch_wal()")
    env.archiver.backup_now()
    with env.connect() as conn:
        conn.execute("SELECT pg_switch_wal()")
    anchor = env.archiver.backup_now(full=True)
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE r AS SELECT 1 AS x")
    lsn, _ = env.provider.mark_point(plan, "after the anchor")
    before = env.archiver.backups()
    assert len(before) >= 3
    # Nothing falls out of a window that reaches back before the oldest backup.
    assert env.archiver.apply_retention() == []
    # A window starting after the newest backup: keep that one (it covers the window's start), drop the rest.
    deleted = env.archiver.apply_retention(now=anchor.finished + env.archiver.retention + timedelta(seconds=1))
    assert set(deleted) == {b.label for b in before} - {anchor.label}
    assert [b.label for b in env.archiver.backups()] == [anchor.label]
    assert min(s.segno for s in segments(env.archiver.wal_dir, anchor.seg_size)) == anchor.start_segno
    status = env.archiver.status()
    assert status.protected and status.earliest == anchor.finished and status.base_backups == 1
    into = DatabasePlan.fresh(env.provider.server_name)
    env.provider.restore_database(plan, RecoveryTarget(lsn=lsn), into)
    assert rows(env, into.database, "SELECT x FROM r") == [(1,)]
    no_leftovers(env)


def test_crashed_attempt_leftovers_are_cleaned(env: Env) -> None:
    leftover = env.archiver.work_dir / "side-deadbeef0000"
    (leftover / "data").mkdir(parents=True)
    (leftover / "lock").write_text("")
    plan = env.new_database()
    lsn, _ = env.provider.mark_point(plan, "p")
    env.provider.restore_database(plan, RecoveryTarget(lsn=lsn), DatabasePlan.fresh(env.provider.server_name))
    assert not leftover.exists()
    no_leftovers(env)


def test_serve_job_archives_one_server_once_and_restarts_the_receiver(env: Env) -> None:
    settings = Settings(home=env.home, embedded_fsync=False, backup_enabled=None)
    other = LocalProvider(env.dsn)
    try:
        archivers = attach_archivers(settings, other, env.server)
        assert [a.server for a in archivers] == ["local"] and other.archiver is archivers[0]
        assert archivers[0].directory == env.archiver.directory
        assert attach_archivers(settings.model_copy(update={"backup_enabled": False}), other, env.server) == []
        second = archivers[0]
        assert second.tick() is False  # the fixture's archiver holds this server's archiving lock
        receiver = env.archiver._receiver
        assert receiver is not None
        receiver.kill()
        receiver.wait()
        assert env.archiver.tick()
        assert env.archiver._receiver is not None and env.archiver._receiver.pid != receiver.pid
        env.archiver.stop()  # serve stopping: the other process takes over
        job = ArchiveJob([second], interval_s=3600)
        job.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (second._receiver is None or second._lock_conn is None):
            time.sleep(0.05)
        assert second._wait_streaming(timeout=10)
        job.stop()
        assert second._receiver is None
    finally:
        other.close()
        assert env.archiver.tick()


def test_a_base_backup_is_stopped_when_serve_stops(env: Env) -> None:
    """``serve`` stopping during a base backup (one of several GB after hundreds of registrations) does not
    wait for it: pg_basebackup is terminated, nothing of it is kept, and an incremental one does not fall back to
    a full one. The next round takes the backup."""
    stopping = threading.Event()
    stopping.set()
    before = [b.label for b in env.archiver.backups()]
    for full in (True, None):  # a full one, and (None) an incremental one where the server allows
        with pytest.raises(ToolInterrupted):
            env.archiver.backup_now(full=full, stopping=stopping)
    assert [b.label for b in env.archiver.backups()] == before
    assert not list(env.archiver.base_dir.glob(".tmp-*"))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(env.archiver.base_dir) not in ps  # (other tests may run a pg_basebackup of their own)
    assert env.archiver.backup_now().label not in before  # not stopping: it runs to the end


def test_disaster_recovery_rebuilds_the_server_from_the_backups_alone(env: Env) -> None:
    plan = env.new_database()
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE precious AS SELECT g FROM generate_series(1, 1234) g")
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    env.archiver.wait_archived(parse_lsn(str(row[0])))
    copy = Path(tempfile.mkdtemp(prefix="agentpg-dr-", dir="/tmp"))
    copy.chmod(0o711)
    home = copy / "home"
    rebuilt = EmbeddedPostgres(home, fsync=False)
    try:
        result = recover_embedded(env.archiver.directory.parent, home, fsync=False)
        assert result.last_transaction is not None and result.wal_segments >= 1
        dsn = rebuilt.ensure_running().dsn(plan.database)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM precious").fetchone() == (1234,)
            conn.execute("INSERT INTO precious VALUES (0)")  # a primary again, accepting writes
        assert (home / "postgres" / "admin-password").read_text() == env.server.password_file.read_text()
        with pytest.raises(ProviderError, match="already holds a server"):
            recover_embedded(env.archiver.directory.parent, home)
    finally:
        rebuilt.stop()
        shutil.rmtree(copy, ignore_errors=True)


def test_restored_shared_database_is_locked_down_again(env: Env) -> None:
    plan = env.new_database()
    agent, gone = plan.database + "_a1", plan.database + "_a2"
    env.provider.create_agent_role(plan, agent, "pw-agent", AgentPermissions())
    env.provider.create_agent_role(plan, gone, "pw-gone", AgentPermissions())
    with env.connect(plan.database) as conn:
        conn.execute("CREATE TABLE s AS SELECT 1 AS x")
    lsn, _ = env.provider.mark_point(plan, "shared")
    env.provider.drop_agent_role(plan, gone)
    into = DatabasePlan.fresh(env.provider.server_name)
    env.provider.restore_database(plan, RecoveryTarget(lsn=lsn), into)
    db = into.database
    assert rows(env, db, "SELECT role_name FROM agentpg_internal.agent_grants") == [(agent,)]
    assert rows(env, db, "SELECT value FROM agentpg_internal.config WHERE key = 'shared'") == [("on",)]
    assert rows(env, db, f"SELECT has_function_privilege('{agent}', 'pg_catalog.set_config(text,text,boolean)', "
                         f"'EXECUTE'), has_language_privilege('{agent}', 'plpgsql', 'USAGE'), "
                         f"has_table_privilege('{agent}', 'pg_catalog.pg_stat_activity', 'SELECT')") == [
        (False, False, False)]
    # Agents' grants are the caller's to re-apply (--no-acl): the agent cannot read until then.
    assert rows(env, db, f"SELECT has_table_privilege('{agent}', 'public.s', 'SELECT')") == [(False,)]
    env.provider.set_agent_permissions(into, agent, AgentPermissions())
    assert rows(env, db, f"SELECT has_table_privilege('{agent}', 'public.s', 'SELECT')") == [(True,)]


def test_synchronous_mode_names_the_receiver_while_it_streams(env: Env) -> None:
    env.archiver.stop()
    env.archiver.synchronous = True
    try:
        assert env.archiver.tick()
        with env.connect() as conn:
            deadline = time.monotonic() + 10  # pg_reload_conf() signals; the server applies it a moment later
            while conn.execute("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                               (APPLICATION_NAME,)).fetchone() != ("sync",) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert conn.execute("SHOW synchronous_standby_names").fetchone() == (f'"{APPLICATION_NAME}"',)
            assert conn.execute("SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                                (APPLICATION_NAME,)).fetchone() == ("sync",)
            with conn.transaction():  # a commit that waits for the backup directory, and gets it
                conn.execute("SET LOCAL synchronous_commit = on")
                conn.execute("CREATE TEMP TABLE t (x int)")
        assert env.archiver.status().synchronous
    finally:
        env.archiver.stop()  # a receiver going away takes its name out first: commits never wait for nothing
        env.archiver.synchronous = False
        time.sleep(0.5)
        with env.connect() as conn:
            assert conn.execute("SHOW synchronous_standby_names").fetchone() == ("",)
        assert env.archiver.tick()
