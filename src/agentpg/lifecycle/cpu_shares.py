"""Fair CPU between users on the embedded server (issue 18): a user who takes more than its share of the
machine has its backends' scheduling priority lowered, so the light users' statements run at once.

PostgreSQL has no CPU scheduler of its own: every backend is an OS process, and the kernel shares the cores
among them whoever they belong to. One user running four sorts on a 2-core machine gets four fifths of it
against another user's single backend, and every hop of the other user's call (its backend, then ``serve``)
waits behind them. The kernel can do better if told whom to prefer, and on the server agentpg started itself
(same host, its pids visible) ``serve`` tells it:

- every ``interval_s`` it reads the tenant backends from ``pg_stat_activity`` (client backends and their
  parallel workers, by database) and each one's CPU time from ``/proc/<pid>/stat``;
- it sums the CPU used per *user* (the catalog says whose database is whose; agentpg's own databases are
  nobody's and never touched), as a decaying average over about :data:`HALF_LIFE_S`;
- a user over its share, ``cores / max(2, users using CPU)``, is *demoted*: its backends get ``nice``
  :attr:`~agentpg.settings.Settings.cpu_demoted_nice` (10: the kernel's weight 110 against 1,024, so a light
  user's backend is ~9x more likely to run when both want a core), and are restored to 0 once under
  :data:`RESTORE_FRACTION` of it. The ``2`` keeps a second user's share free before it arrives: a lone heavy
  user is demoted too, which costs it nothing while the machine has no one else to run.
- where the host lets ``serve`` make CPU control groups (:mod:`agentpg.lifecycle.cpu_groups`), each user's
  backends are moved into the user's own group, so the kernel weighs a user as one process however many
  backends it runs, and demoting a user makes its group as light as one process at the demoted nice;
- elsewhere the nice is set on each backend *and on its autogroup* (:func:`set_nice`): each backend is a
  session of its own, and with autogroups on the group's nice is the one the scheduler compares (measured
  here: four backends reniced without their groups kept 4 x 1.0 core-seconds in 5 s against the fifth one's
  1.65; with their groups, 4 x 1.0 against 4.76). Weaker: 30 demoted backends still outweigh one light one.

A priority is not a cap: a demoted user still gets every core nobody else wants (the limits on time, memory
and temp space are elsewhere). Demoted backends still run when they hold a lock a light one waits for (nice
10, not 19: about a tenth of a core under full contention), so a priority inversion slows, never stops.
Lowering a priority needs no privilege. Raising it back needs ``CAP_SYS_NICE`` (root, as ``serve`` runs by
default), except for an autogroup's nice, the one that counts where autogroups are on; where neither can be
raised back, a demoted backend stays demoted until its connection closes, and the job says so once.

Only the embedded server: a server elsewhere (``AGENTPG_POSTGRES_URL``, the fleet, Neon) is not this host's
to schedule.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg.rows import tuple_row
from sqlalchemy import select, union_all

from agentpg.catalog.models import RestoredCopy, UserGlobalDatabase, WorkspaceAgentDatabase
from agentpg.lifecycle.cpu_groups import FULL_SHARES, CpuGroups, shares_of_nice
from agentpg.lifecycle.deps import LifecycleDeps
from agentpg.periodic import PeriodicJob

log = logging.getLogger(__name__)

HALF_LIFE_S = 2.0
"""A user's CPU is averaged over about this long: a bursty heavy user stays demoted between its bursts."""
RESTORE_FRACTION = 0.7
"""A demoted user is restored once its average falls under this fraction of its share (no flapping)."""
IDLE_CORES = 0.05
"""A user using less than this (in cores) is not counted among the users sharing the machine."""
_OWNER_TTL_S = 30.0
"""How long a database found to be nobody's (agentpg's own, or one just made) is not looked up again."""
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Owners = Callable[[list[str]], dict[str, str]]
"""Database names -> the user each belongs to (names of nobody's databases left out)."""


def catalog_owners(deps: LifecycleDeps) -> Owners:
    """The catalog's answer to "whose database is this": global, agent and restored-copy databases."""

    def owners(names: list[str]) -> dict[str, str]:
        found = union_all(
            select(UserGlobalDatabase.database_name, UserGlobalDatabase.user_id)
            .where(UserGlobalDatabase.database_name.in_(names)),
            select(WorkspaceAgentDatabase.database_name, WorkspaceAgentDatabase.user_id)
            .where(WorkspaceAgentDatabase.database_name.in_(names)),
            select(RestoredCopy.database_name, RestoredCopy.user_id).where(RestoredCopy.database_name.in_(names)))
        with deps.sessions() as s:
            return {str(name): str(user) for name, user in s.execute(found)}

    return owners


def share_of(cores: float, active_users: int) -> float:
    """The CPU (in cores) one user may use before it is demoted, with ``active_users`` using some."""
    return cores / max(2, active_users)


def process_cpu_s(pid: int) -> tuple[float, int] | None:
    """(user + system CPU seconds, start time in ticks) of a process of this host; None when it is gone.
    The start time tells a reused pid from the process seen before."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS, int(fields[19])


def set_nice(pid: int, nice: int) -> None:
    """Give the process ``nice``, where the scheduler will see it. Every PostgreSQL backend calls ``setsid()``
    at its start, so with the kernel's autogroups on (``/proc/sys/kernel/sched_autogroup_enabled``, the default
    of most distributions) each backend is alone in its own group, the groups share the CPU equally, and a
    task's own nice only ranks it inside its group: nothing. The group's nice (``/proc/<pid>/autogroup``) is
    what ranks it against the others, so both are set, the group's first: a process of the same user may set
    its group's nice back to 0 without ``CAP_SYS_NICE`` (checked as ``nobody``), its own nice not. Raises
    ProcessLookupError (gone); PermissionError when the nice that counts could not be set; BlockingIOError when
    the kernel refused a group change for now (without ``CAP_SYS_ADMIN``, one per 100 ms system-wide)."""
    group_set = False
    try:
        with open(f"/proc/{pid}/autogroup", "w") as handle:
            handle.write(str(nice))
        group_set = _autogroups_on()
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessLookupError(pid) from None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessLookupError(pid) from exc
        if exc.errno not in (errno.EPERM, errno.EACCES, errno.EINVAL):
            raise
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except PermissionError:
        if not group_set:  # alone in its group, the task's own nice does not matter once the group's is set
            raise


def _autogroups_on() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


def niceness(pid: int) -> int | None:
    """The process's nice value, None when it is gone."""
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


@dataclass
class _Backend:
    user: str
    started: int
    cpu_s: float
    nice: int = 0
    placed: bool = False
    """In its user's control group (with :class:`CpuGroups`)."""


@dataclass
class CpuShares:
    """One pass per :meth:`tick`; the state between passes (CPU seen, averages, who is demoted) is here."""

    admin_dsn: str
    owners: Owners
    demoted_nice: int = 10
    cores: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    share_override: float | None = None
    """Tests only: a fixed share in cores instead of :func:`share_of`."""
    groups: CpuGroups | None = None
    """Per-user control groups where the host has them: a demoted user's *group* is made lighter (one weight
    for all of its backends, however many); None: each backend is reniced."""
    demoted_idle: bool = False
    """With groups: a demoted user's group goes into the kernel's idle class instead (``cpu.idle``)."""
    usage: dict[str, float] = field(default_factory=dict)
    demoted: set[str] = field(default_factory=set)
    demotions: int = 0
    renice_failures: int = 0
    _backends: dict[int, _Backend] = field(default_factory=dict)
    _owner_of: dict[str, str] = field(default_factory=dict)
    _nobodys: dict[str, float] = field(default_factory=dict)
    _last: float | None = None
    _conn: psycopg.Connection[tuple[int, str]] | None = None
    _warned: bool = False
    _grouped: set[str] = field(default_factory=set)

    def tick(self) -> None:
        """Measure, average, demote and restore. Raises psycopg.Error when the server cannot be read (the
        periodic job logs it and tries again)."""
        now = time.monotonic()
        elapsed = None if self._last is None else max(now - self._last, 1e-3)
        self._last = now
        rows = self._activity()
        owner = self._resolve(sorted({datname for _, datname in rows}))
        used: dict[str, float] = {}
        seen: dict[int, _Backend] = {}
        for pid, datname in rows:
            user = owner.get(datname)
            cpu = process_cpu_s(pid) if user is not None else None
            if user is None or cpu is None:
                continue
            before = self._backends.get(pid)
            same = before is not None and before.started == cpu[1]
            backend = _Backend(user, cpu[1], cpu[0], before.nice, before.placed) if before and same else \
                _Backend(user, cpu[1], cpu[0])
            if self.groups is not None and not backend.placed:
                self._place(pid, backend)
            if before is not None and same and elapsed is not None:
                used[user] = used.get(user, 0.0) + max(0.0, backend.cpu_s - before.cpu_s) / elapsed
            seen[pid] = backend
        self._backends = seen
        if elapsed is None:
            return
        keep = 0.5 ** (elapsed / HALF_LIFE_S)
        for user in set(self.usage) | set(used):
            self.usage[user] = self.usage.get(user, 0.0) * keep + used.get(user, 0.0) * (1 - keep)
            if self.usage[user] < 0.001 and user not in used:
                del self.usage[user]
        active = sum(1 for cores in self.usage.values() if cores >= IDLE_CORES)
        share = self.share_override if self.share_override is not None else share_of(self.cores, active)
        for user, cores in self.usage.items():
            if user not in self.demoted and cores > share:
                self.demoted.add(user)
                self.demotions += 1
                log.info("CPU: a user over its share (%.2f of %.2f cores) is demoted to nice %d", cores, share,
                         self.demoted_nice)
            elif user in self.demoted and cores < share * RESTORE_FRACTION:
                self.demoted.discard(user)
        self.demoted &= set(self.usage)
        if self.groups is not None:
            self._weigh_groups(self.groups)
            return
        for pid, backend in self._backends.items():
            wanted = self.demoted_nice if backend.user in self.demoted else 0
            if backend.nice != wanted:
                self._renice(pid, backend, wanted)

    def _place(self, pid: int, backend: _Backend) -> None:
        assert self.groups is not None
        try:
            self.groups.place(pid, backend.user)
        except ProcessLookupError:
            return  # ended since it was read
        except OSError as exc:
            self.renice_failures += 1
            if not self._warned:
                self._warned = True
                log.warning("CPU: cannot move a backend into its user's control group: %s",
                            exc.strerror or type(exc).__name__)
        backend.placed = True  # (or given up on: not retried every pass)

    def _weigh_groups(self, groups: CpuGroups) -> None:
        with_backends = {backend.user for backend in self._backends.values()}
        for user in with_backends:
            demoted = user in self.demoted
            try:
                groups.weigh(user, shares_of_nice(self.demoted_nice) if demoted else FULL_SHARES,
                             idle=demoted and self.demoted_idle)
            except OSError:
                self.renice_failures += 1
        for user in self._grouped - with_backends:
            groups.forget(user)
        self._grouped = with_backends

    def _renice(self, pid: int, backend: _Backend, wanted: int) -> None:
        try:
            set_nice(pid, wanted)
            backend.nice = wanted
        except ProcessLookupError:
            pass  # ended since it was read
        except BlockingIOError:
            pass  # without CAP_SYS_ADMIN the kernel takes one autogroup change per 100 ms: the next pass
        except PermissionError:
            self.renice_failures += 1
            backend.nice = wanted  # not retried every pass: it stays as it is until its connection closes
            if not self._warned:
                self._warned = True
                log.warning("CPU: cannot restore a backend's priority (no CAP_SYS_NICE): demoted backends stay "
                            "demoted until their connection closes")

    def _activity(self) -> list[tuple[int, str]]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=5,
                                         application_name="agentpg cpu shares", row_factory=tuple_row)
        try:
            rows = self._conn.execute(
                # agentpg's own connections (superusers) are nobody's: its work is never counted or slowed
                "SELECT a.pid, a.datname FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid "
                "WHERE a.datname IS NOT NULL AND NOT r.rolsuper "
                "AND a.backend_type IN ('client backend', 'parallel worker')").fetchall()
        except psycopg.Error:
            self._disconnect()
            raise
        return rows

    def _resolve(self, names: Iterable[str]) -> dict[str, str]:
        now = time.monotonic()
        unknown = [n for n in names if n not in self._owner_of and self._nobodys.get(n, 0.0) <= now]
        if unknown:
            found = self.owners(unknown)
            self._owner_of.update(found)
            for name in unknown:
                if name not in found:
                    self._nobodys[name] = now + _OWNER_TTL_S
        return self._owner_of

    def close(self) -> None:
        """Nobody left demoted (the groups back at full weight), the connection closed."""
        if self.groups is not None:
            self.groups.close()
        self._disconnect()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def raise_own_priority(nice: int) -> bool:
    """Give every thread of this process ``nice`` (threads started later inherit it), and its autogroup too
    where autogroups are on (the session ``serve`` was started in: its shell, say, shares it). A negative nice
    needs ``CAP_SYS_NICE``: False (nothing changed, never raised) without it."""
    try:
        for tid in sorted(int(t) for t in os.listdir("/proc/self/task")):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended since
                os.setpriority(os.PRIO_PROCESS, tid, nice)
    except PermissionError:
        return False
    if _autogroups_on():
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as handle:
            handle.write(str(nice))
    return True


class CpuSharesJob(PeriodicJob):
    """Runs :meth:`CpuShares.tick` every ``interval_s`` in ``serve`` (0: off); on start, gives ``serve`` itself
    ``serve_nice`` (0: left as it is)."""

    def __init__(self, shares: CpuShares, interval_s: float, serve_nice: int = 0) -> None:
        self.shares, self.serve_nice = shares, serve_nice
        # The server may be restarting: a failure is one line, and the next pass tries again.
        super().__init__("cpu-shares", shares.tick, interval_s, first_run_now=True, log_traceback=False)

    def start(self) -> None:
        # serve answers every user; a tenant's statements (its backends, on the same cores) must not make
        # everyone's requests wait for a core (measured: bench/README.md, "Fair sharing")
        if self.serve_nice and not raise_own_priority(self.serve_nice):
            log.info("CPU: serve keeps its priority (setting nice %d needs CAP_SYS_NICE)", self.serve_nice)
        super().start()

    def stop(self) -> None:
        super().stop()
        self.shares.close()


class CpuSharesCollector(Collector):
    """The demotions, read at scrape time (no user id in a label)."""

    def __init__(self, shares: CpuShares) -> None:
        self._shares = shares

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("agentpg_cpu_demoted_users", "Users whose backends run at a lower priority for "
                                "using more than their share of the embedded server's CPU.",
                                value=len(self._shares.demoted))
        yield CounterMetricFamily("agentpg_cpu_demotions", "Times a user was demoted for its CPU use.",
                                  value=self._shares.demotions)
        yield CounterMetricFamily("agentpg_cpu_renice_failures", "Backends whose priority could not be "
                                  "restored (serve lacks CAP_SYS_NICE).", value=self._shares.renice_failures)
