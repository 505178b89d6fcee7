"""One CPU control group per user on the embedded server's host: the kernel then shares the cores between
*users*, not between backends (issue 18).

Why groups, when :mod:`agentpg.lifecycle.cpu_shares` can renice backends: a nice ranks one process, and a
user can have dozens. Measured with the noisy neighbour of ``bench/fair_sharing.py``: ~30 of the attacker's
backends were runnable at nice 10 (weight 110 each, 3,300 together) against the victim's one backend at
1,024, so the attacker still had 21 of the 30 CPU seconds of the window and the victim waited. In a control
group of its own, all of a user's backends together weigh what one process weighs (``cpu.shares`` 1,024), a
demoted user's group weighs what one process at the demoted nice weighs, and this holds however many
connections the user opens.

Where: the cgroup v1 ``cpu`` controller, under the cgroup ``serve`` itself is in, as
``agentpg-<server>/u-<user>`` (both names hashes: a user id is the platform's string, never a path). cgroup v2
hosts and hosts where the hierarchy is not writable (no root, no delegation) get ``None`` from
:func:`find_cpu_groups`, and :class:`~agentpg.lifecycle.cpu_shares.CpuShares` falls back to renicing each
backend. A backend is moved once, when first seen; a new backend is born in the postmaster's group and runs
there until the next pass (≤ ``AGENTPG_CPU_SHARES_INTERVAL_S``). :meth:`CpuGroups.close` moves every process
back to the parent group and removes the groups; a ``serve`` that crashed leaves them, and the next one on the
same server reuses them by name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FULL_SHARES = 1024
"""``cpu.shares`` of a user's group: what one process at nice 0 weighs, so a user counts as one process."""


def shares_of_nice(nice: int) -> int:
    """The kernel's weight of a process at ``nice`` (1,024 at 0, 1.25 times lighter per step: 110 at 10, 15 at 19),
    as the ``cpu.shares`` of a group that should weigh what one such process weighs (at least 2, the
    controller's minimum)."""
    return max(2, round(FULL_SHARES / 1.25 ** nice))


def _proc_lines(path: str) -> list[str]:
    """The lines of a ``/proc`` file; none when it cannot be read (no such process, no procfs)."""
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _cpu_mount() -> Path | None:
    """Where the cgroup v1 hierarchy with the ``cpu`` controller is mounted, None when there is none."""
    for line in _proc_lines("/proc/self/mounts"):
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1])
    return None


def cpu_cgroup_of(pid: int | str = "self") -> str | None:
    """A process's cgroup path in the v1 ``cpu`` hierarchy (``/`` at its root); None when it has none or is
    gone."""
    for line in _proc_lines(f"/proc/{pid}/cgroup"):
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return None


def find_cpu_groups(server_key: str) -> CpuGroups | None:
    """The groups of one PostgreSQL server (``server_key``: e.g. its data directory), made if need be; None when
    this host has no writable cgroup v1 ``cpu`` controller (the caller renices instead). Empty groups that
    earlier servers left are removed on the way."""
    mount, own = _cpu_mount(), cpu_cgroup_of()
    if mount is None or own is None:
        return None
    parent = mount / own.lstrip("/")
    base = parent / ("agentpg-" + hashlib.sha256(server_key.encode()).hexdigest()[:12])
    try:
        base.mkdir(exist_ok=True)
        (base / "cpu.shares").write_text(str(FULL_SHARES))
    except OSError as exc:
        log.info("CPU: no control groups for tenants here (%s); backends are reniced instead",
                 exc.strerror or type(exc).__name__)
        return None
    for stale in parent.glob("agentpg-*"):
        if stale != base:
            _remove_if_empty(stale)
    return CpuGroups(base)


def _remove_if_empty(base: Path) -> None:
    """Remove a server's groups that hold no process (a group with processes is refused: EBUSY, kept)."""
    for group in [*base.glob("u-*"), base]:
        with contextlib.suppress(OSError):
            os.rmdir(group)


class CpuGroups:
    """Per-user groups under ``base``. Several ``serve`` processes of one server share them (same names), so a
    group is never removed while it holds a process, and nobody's processes are moved out. Not thread-safe:
    one :class:`~agentpg.lifecycle.cpu_shares.CpuShares` pass at a time uses it."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._weights: dict[str, tuple[int, bool]] = {}
        """Per user: the ``cpu.shares`` last set and whether the group is ``cpu.idle``."""

    def _group(self, user: str) -> Path:
        return self.base / ("u-" + hashlib.sha256(user.encode()).hexdigest()[:16])

    def place(self, pid: int, user: str) -> None:
        """Move the process into the user's group (made at full weight on first use). Raises
        ProcessLookupError when it is gone, OSError when the kernel refuses."""
        for attempt in (1, 2):
            group = self._group(user)
            if user not in self._weights:
                self.base.mkdir(exist_ok=True)
                group.mkdir(exist_ok=True)
                self.weigh(user, FULL_SHARES)
            try:
                (group / "cgroup.procs").write_text(str(pid))
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._weights.pop(user, None)  # removed by another serve's cleanup while it was empty: remake
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    raise ProcessLookupError(pid) from exc
                raise

    def weigh(self, user: str, shares: int, *, idle: bool = False) -> None:
        """Set the user's group's weight: ``cpu.shares``, or with ``idle`` the kernel's idle class (``cpu.idle``,
        Linux 5.15+: a waking task of any other group preempts this group's running one at once, and the group
        weighs what ``SCHED_IDLE`` does, 3 against one process's 1,024). A no-op when it already has it. Raises
        OSError (FileNotFoundError where the kernel has no ``cpu.idle``)."""
        if self._weights.get(user) == (shares, idle):
            return
        group = self._group(user)
        if idle:
            (group / "cpu.idle").write_text("1")
        else:
            if self._weights.get(user, (0, True))[1]:  # the kernel refuses cpu.shares while the group is idle
                with contextlib.suppress(FileNotFoundError):
                    (group / "cpu.idle").write_text("0")
            (group / "cpu.shares").write_text(str(shares))
        self._weights[user] = (shares, idle)

    def forget(self, user: str) -> None:
        """Drop a user with no backend left: its group is removed if empty (kept, and reused, if not)."""
        if self._weights.pop(user, None) is not None:
            with contextlib.suppress(OSError):  # busy: a backend came since (kept, and reused)
                os.rmdir(self._group(user))

    def close(self) -> None:
        """Every group back at full weight (a stopped ``serve`` leaves nobody demoted); empty ones removed.
        Best effort: never raises."""
        for user in list(self._weights):
            with contextlib.suppress(OSError):
                self.weigh(user, FULL_SHARES)
        self._weights.clear()
        _remove_if_empty(self.base)
