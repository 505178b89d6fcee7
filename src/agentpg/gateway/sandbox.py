"""How a gateway child is run: never as agentpg's OS user, never with agentpg's files or environment.

Every child gets, in this order (each with a well-kept tool, nothing hand-written):

1. **its own unprivileged OS user** (``setpriv`` from util-linux, when agentpg runs as root): a uid from the
   range ``AGENTPG_GATEWAY_UID_BASE`` … ``+ AGENTPG_GATEWAY_UID_COUNT`` that has no passwd entry, with its
   own gid, no supplementary groups, no capabilities (bounding set emptied) and ``no_new_privs``. A uid is
   held by one child at a time across every agentpg process on the host (a ``flock`` under
   ``/run/agentpg-gateway-uids``), so two children never share one: they cannot signal, trace or read each
   other's ``/proc`` entries, and the process limit is per child. It is never root and never the embedded
   server's OS user (which owns every tenant's data files): that is checked before anything starts;
2. **resource limits** (``prlimit`` from util-linux): CPU seconds, data size (the real memory bound: V8
   reserves gigabytes of address space it never touches), address space, processes, file size, open files,
   and no core files;
3. **namespaces** (``bwrap``, bubblewrap, Debian's package): private PID, IPC, UTS, cgroup and mount
   namespaces, a read-only view of ``/usr`` (and the ``/bin``, ``/lib`` links), a few ``/etc`` files
   (dynamic linker cache, hosts, resolver, TLS certificates), the entry's ``read_only_paths``, a fresh
   ``/proc`` and ``/dev``, a private ``/tmp`` (also ``HOME``), nothing else — no ``$AGENTPG_HOME``, no
   project files, no ``/root``. When bwrap runs as the child's uid it also gets a user namespace in which
   it may not create another (``--disable-userns``). The network namespace is **shared**: the child must
   reach Postgres, which listens on the host's loopback;
4. **an environment built from an allow-list**: ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and the entry's
   own (resolved) ``env``; nothing of agentpg's.

Which of 3 is possible is found out once per process (:meth:`Sandbox.detect`): bwrap as the child's uid
with a user namespace (best), else bwrap as root dropping to the child's uid inside, else none — then the
child still runs with 1, 2 and 4, and a warning says what is missing. ``AGENTPG_GATEWAY_SANDBOX`` forces a
mode (``namespaces`` refuses to start children without bwrap).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from agentpg.errors import AgentpgError

log = logging.getLogger(__name__)

TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
#: /etc files a typical server needs (dynamic linker, name resolution for "localhost", TLS roots, time zone).
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/hosts", "/etc/host.conf",
             "/etc/nsswitch.conf", "/etc/resolv.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols",
             "/etc/ssl", "/etc/ca-certificates", "/etc/localtime", "/etc/alternatives")
#: The sandbox's own /tmp: a fresh tmpfs inside the mount namespace (also the child's HOME).
SANDBOX_TMP = "/tmp"  # noqa: S108
ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

#: Where the per-uid locks live (one lock file per gateway uid, held while a child runs as it).
UID_LOCK_DIR = "/run/agentpg-gateway-uids"
#: The home of a child that no namespace gives a private /tmp: a directory of its own in the host's temp directory.
PRIVATE_DIR_PREFIX = "agentpg-gateway-"
Kind = Literal["bwrap", "bwrap-root", "none"]


class SandboxUnavailable(AgentpgError):
    status = 503
    code = "gateway_sandbox_unavailable"


@dataclass(frozen=True)
class Limits:
    cpu_s: int
    memory_mb: int
    address_space_mb: int
    processes: int
    file_size_mb: int
    open_files: int
    tmp_mb: int = 256
    """The size of the sandbox's own ``/tmp`` (also ``HOME``): a tmpfs, whose pages no rlimit counts (the
    kernel's default would be half of the host's memory, per child)."""

    def prlimit_args(self, own_uid: bool) -> list[str]:
        """RLIMIT_NPROC counts every process and thread of the real uid: only meaningful (and harmless) when
        the child has a uid of its own; as agentpg's own uid it would count agentpg's threads too."""
        mib = 1024 * 1024
        return [f"--cpu={self.cpu_s}", f"--data={self.memory_mb * mib}", f"--as={self.address_space_mb * mib}",
                *([f"--nproc={self.processes}"] if own_uid else []), f"--fsize={self.file_size_mb * mib}",
                f"--nofile={self.open_files}", "--core=0"]


@dataclass(frozen=True)
class SandboxMode:
    kind: Kind
    own_uid: bool
    """Children run as uids of their own (agentpg runs as root); else as agentpg's own user."""
    disable_userns: bool = False
    reason: str = ""
    """Why a better mode was not used (empty for the best)."""

    @property
    def namespaces(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        parts = [{"bwrap": "bubblewrap namespaces (pid, ipc, uts, mount; user namespace without nesting)",
                  "bwrap-root": "bubblewrap namespaces (pid, ipc, uts, mount; no user namespace)",
                  "none": "NO namespaces"}[self.kind],
                 "own unprivileged uid per child" if self.own_uid else "children run as agentpg's OS user",
                 "rlimits", "allow-listed environment", "network shared"]
        text = ", ".join(parts)
        return text + (f" — {self.reason}" if self.reason else "")

    @property
    def degraded(self) -> bool:
        return not self.namespaces or not self.own_uid


@dataclass
class Launch:
    """How to start one child: ``argv`` (the sandbox tools, then the entry's command), env and cwd."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int | None
    private_dir: str | None = None
    _lock: IO[bytes] | None = field(default=None, repr=False)
    released: bool = False

    def release(self, sandbox: Sandbox) -> None:
        """After the child stopped: kill whatever still runs as its uid, drop its files, free the uid."""
        if self.released:
            return
        self.released = True
        if self.uid is not None:
            sandbox.sweep(self.uid)
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None


class Sandbox:
    def __init__(self, *, home: Path, requested: Literal["auto", "namespaces", "none"], uid_base: int,
                 uid_count: int, postgres_os_user: str) -> None:
        self._home = home
        self._requested = requested
        self._uid_base = uid_base
        self._uid_count = uid_count
        self._postgres_os_user = postgres_os_user
        self._is_root = os.geteuid() == 0
        self.bwrap = shutil.which("bwrap", path=TOOL_PATH)
        self.setpriv = shutil.which("setpriv", path=TOOL_PATH)
        self.prlimit = shutil.which("prlimit", path=TOOL_PATH)
        self._mode: SandboxMode | None = None
        self._detecting = threading.Lock()

    # -- detection -------------------------------------------------------------------------------------

    @property
    def mode(self) -> SandboxMode:
        """The mode found once (thread-safe: the first caller probes, the others wait for it)."""
        with self._detecting:
            if self._mode is None:
                self._mode = self.detect()
            return self._mode

    def _check_uid_range(self) -> None:
        low, high = self._uid_base, self._uid_base + self._uid_count
        if low < 1000 or high > 2**31 - 2:
            raise SandboxUnavailable(f"AGENTPG_GATEWAY_UID_BASE/COUNT give uids {low}..{high - 1}; they must lie "
                                     "between 1000 and 2^31-2")
        with contextlib.suppress(KeyError):
            pg_uid = pwd.getpwnam(self._postgres_os_user).pw_uid
            if low <= pg_uid < high:
                raise SandboxUnavailable(f"the gateway's uid range {low}..{high - 1} holds the embedded server's "
                                         f"OS user {self._postgres_os_user} (uid {pg_uid}); move "
                                         "AGENTPG_GATEWAY_UID_BASE")
        taken = [p.pw_name for p in pwd.getpwall() if low <= p.pw_uid < high]
        if taken:
            raise SandboxUnavailable(f"the gateway's uid range {low}..{high - 1} holds existing users "
                                     f"({', '.join(taken[:5])}); move AGENTPG_GATEWAY_UID_BASE")

    def _probe(self, kind: Kind, disable_userns: bool) -> str | None:
        """None when a child can be started in this mode; else the tool's complaint."""
        mode = SandboxMode(kind=kind, own_uid=self._is_root, disable_userns=disable_userns)
        true = shutil.which("true", path=CHILD_PATH) or "/bin/true"
        launch = self._plan(mode, true, [], {}, [], _probe_limits())
        try:
            done = subprocess.run(launch.argv, env=launch.env, cwd=launch.cwd, capture_output=True, text=True,
                                  timeout=20, check=False, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            launch.release(self)
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:300]
        return None

    def detect(self) -> SandboxMode:
        """The best mode this host allows (runs the tools once); raises :class:`SandboxUnavailable` when
        children may not be started at all. Also kills what a killed agentpg left running as gateway uids."""
        if self._is_root:
            self._check_uid_range()
            if self.reap_orphans():
                log.warning("gateway: killed processes left running as gateway uids by an earlier agentpg")
            missing = [n for n, p in (("setpriv", self.setpriv), ("prlimit", self.prlimit)) if p is None]
            if missing:
                raise SandboxUnavailable(f"{' and '.join(missing)} (util-linux) missing: gateway children cannot "
                                         "be run under an unprivileged uid with limits")
        elif self.prlimit is None:
            raise SandboxUnavailable("prlimit (util-linux) missing: gateway children cannot be given limits")
        problems: list[str] = []
        if self._requested != "none":
            if self.bwrap is None:
                problems.append("bwrap is not installed (apt-get install bubblewrap)")
            else:
                for kind, nested in (("bwrap", True), ("bwrap", False), ("bwrap-root", False)):
                    if kind == "bwrap-root" and not self._is_root:
                        continue
                    error = self._probe(kind, nested)  # type: ignore[arg-type]
                    if error is None:
                        reason = "; ".join(problems)
                        if not nested and kind == "bwrap":
                            reason = "bwrap lacks --disable-userns: children may create user namespaces"
                        elif kind == "bwrap-root":
                            reason = ("user namespaces unavailable to bwrap ("
                                      + "; ".join(problems) + "): children may create user namespaces")
                        return SandboxMode(kind=kind, own_uid=self._is_root,  # type: ignore[arg-type]
                                           disable_userns=nested, reason=reason)
                    problems.append(f"{kind}{' --disable-userns' if nested else ''}: {error}")
            if self._requested == "namespaces":
                raise SandboxUnavailable("AGENTPG_GATEWAY_SANDBOX=namespaces but bwrap cannot run here: "
                                         + "; ".join(problems))
        else:
            problems.append("AGENTPG_GATEWAY_SANDBOX=none")
        return SandboxMode(kind="none", own_uid=self._is_root, reason="; ".join(problems))

    # -- uids --------------------------------------------------------------------------------------------

    def _lock_dir(self) -> Path:
        """Host-wide, not per home: every agentpg on this host (another AGENTPG_HOME, a test run, ``agentpg
        mcp --server``) draws from the same uids, so they must also share the locks."""
        for directory in (Path(UID_LOCK_DIR), self._home / "gateway-uids"):
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                return directory
            except OSError:
                continue
        raise SandboxUnavailable(f"cannot create {UID_LOCK_DIR} for the gateway's uid locks")

    def _lock_uid(self) -> tuple[int, IO[bytes]]:
        directory = self._lock_dir()
        for uid in range(self._uid_base, self._uid_base + self._uid_count):
            handle = (directory / f"{uid}.lock").open("ab")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            self.sweep(uid)  # whatever a crashed agentpg left running as this uid
            self.remove_private_dirs_of(uid)
            return uid, handle
        raise SandboxUnavailable(f"all {self._uid_count} gateway uids are in use (AGENTPG_GATEWAY_UID_COUNT)")

    def reap_orphans(self) -> int:
        """Kill what runs as a gateway uid nobody holds, and remove the private directories such uids own
        (children of an agentpg that was killed without the chance to stop them). Returns how many uids were
        swept."""
        if not self._is_root:
            return 0
        low, high = self._uid_base, self._uid_base + self._uid_count
        found = {uid for uid in self._uids_running() | self._private_dir_owners() if low <= uid < high}
        swept = 0
        for uid in sorted(found):
            with contextlib.suppress(OSError), (self._lock_dir() / f"{uid}.lock").open("ab") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live child holds it
                self.sweep(uid)
                self.remove_private_dirs_of(uid)
                swept += 1
        return swept

    @staticmethod
    def _private_dir_owners() -> set[int]:
        owners: set[int] = set()
        with contextlib.suppress(OSError), os.scandir(tempfile.gettempdir()) as entries:
            for entry in entries:
                if entry.name.startswith(PRIVATE_DIR_PREFIX):
                    with contextlib.suppress(OSError):
                        owners.add(entry.stat(follow_symlinks=False).st_uid)
        return owners

    @staticmethod
    def remove_private_dirs_of(uid: int) -> int:
        """Remove the private directories an earlier child of ``uid`` left in the temp directory (its agentpg was
        killed, or stopped before it could clean up). Safe because the caller holds ``uid``'s lock: no live child
        owns them. Returns how many were removed."""
        removed = 0
        if uid == os.getuid():
            return removed  # not a gateway uid: these directories could be anyone's
        with contextlib.suppress(OSError), os.scandir(tempfile.gettempdir()) as entries:
            for entry in entries:
                if not entry.name.startswith(PRIVATE_DIR_PREFIX):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == uid:
                        shutil.rmtree(entry.path)
                        removed += 1
        return removed

    @staticmethod
    def _uids_running() -> set[int]:
        uids: set[int] = set()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry.name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            uids.add(int(line.split()[1]))
                            break
        return uids

    @staticmethod
    def processes_of(uid: int) -> list[int]:
        found: list[int] = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/status") as status:
                    for line in status:
                        if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                            break  # a zombie: holds nothing, cannot be killed, its parent reaps it
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                found.append(int(entry.name))
                            break
            except (OSError, ValueError, IndexError):
                continue
        return found

    def sweep(self, uid: int) -> None:
        """SIGKILL every process whose real uid is ``uid`` (only ever a gateway child's own uid)."""
        if not self._is_root or uid == os.getuid():
            return
        for _round in range(50):
            pids = self.processes_of(uid)
            if not pids:
                return
            log.info("gateway: killing %d leftover process(es) of uid %d: %s", len(pids), uid, pids[:10])
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        log.warning("gateway: processes of uid %d survived 50 rounds of SIGKILL", uid)

    # -- launching ---------------------------------------------------------------------------------------

    def plan(self, command: str, args: list[str], env: dict[str, str], read_only_paths: list[str],
             limits: Limits) -> Launch:
        """The launch of one child (takes a uid; call :meth:`Launch.release` once it stopped)."""
        return self._plan(self.mode, command, args, env, read_only_paths, limits)

    def _plan(self, mode: SandboxMode, command: str, args: list[str], env: dict[str, str],
              read_only_paths: list[str], limits: Limits) -> Launch:
        uid: int | None = None
        lock: IO[bytes] | None = None
        if mode.own_uid:
            uid, lock = self._lock_uid()
        launch = Launch(argv=[], env={}, cwd="/", uid=uid, _lock=lock)
        try:
            home = SANDBOX_TMP
            if mode.kind == "none":
                private = tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIX)
                launch.private_dir = private
                if uid is not None:
                    os.chown(private, uid, uid)
                os.chmod(private, 0o700)
                home = launch.cwd = private
            launch.env = {"PATH": CHILD_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", **env}
            drop = ([str(self.setpriv), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                     "--bounding-set=-all", "--no-new-privs", "--pdeathsig=SIGKILL", "--"] if uid is not None else [])
            rlimits = [str(self.prlimit), *limits.prlimit_args(own_uid=uid is not None), "--"]
            if mode.kind == "none":
                launch.argv = [*drop, *rlimits, command, *args]
            elif mode.kind == "bwrap":
                launch.argv = [*drop, *rlimits, *self._bwrap(mode, command, read_only_paths, limits), command, *args]
            else:  # bwrap-root: bwrap keeps root to build the mounts, the child drops to its uid inside
                launch.argv = [*self._bwrap(mode, command, read_only_paths, limits), *drop, *rlimits, command,
                               *args]
        except BaseException:
            launch.release(self)
            raise
        return launch

    def _bwrap(self, mode: SandboxMode, command: str, read_only_paths: list[str], limits: Limits) -> list[str]:
        argv = [str(self.bwrap), "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--die-with-parent"]
        if mode.kind == "bwrap":
            argv += ["--unshare-user"] + (["--disable-userns"] if mode.disable_userns else [])
        argv += ["--ro-bind", "/usr", "/usr"]
        for link in ROOT_LINKS:
            if os.path.islink(link):
                argv += ["--symlink", os.readlink(link), link]
            elif os.path.isdir(link):
                argv += ["--ro-bind", link, link]
        for path in ETC_FILES:
            argv += ["--ro-bind-try", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.tmp_mb * 1024 * 1024), "--tmpfs", SANDBOX_TMP]
        real = os.path.realpath(command)
        if not real.startswith("/usr/"):
            argv += ["--ro-bind", real, real]
            if real != command:
                argv += ["--ro-bind", command, command]
        for path in read_only_paths:
            argv += ["--ro-bind", path, path]
        return [*argv, "--chdir", SANDBOX_TMP, "--"]


def _probe_limits() -> Limits:
    return Limits(cpu_s=5, memory_mb=64, address_space_mb=1024, processes=16, file_size_mb=1, open_files=64)
