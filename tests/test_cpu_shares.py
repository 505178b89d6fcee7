"""Issue 18, CPU: a user over its share of the embedded server's CPU has its backends demoted (a higher nice),
another user's are not, and the demoted ones get their priority back once the user is quiet.

Real: the session's embedded server, two registered users, a CPU-bound statement in one user's database;
the passes of :class:`CpuShares` are run by hand (``serve`` runs them every 0.5 s). The share is fixed low
(0.3 cores) so the test does not depend on how much of the 2 cores a loaded CI machine gives the loop.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from helpers import global_uri

from agentpg.app.runtime import Runtime
from agentpg.lifecycle.cpu_groups import FULL_SHARES, cpu_cgroup_of, find_cpu_groups, shares_of_nice
from agentpg.lifecycle.cpu_shares import CpuShares, catalog_owners, niceness, process_cpu_s, share_of

WAIT_S = 60.0
"""A bound on waiting for the averages to move (not a timing assertion: a loaded machine only takes longer)."""


@pytest.fixture(scope="module")
def users(runtime: Runtime) -> Iterator[tuple[str, str]]:
    heavy, light = f"cpu-heavy-{secrets.token_hex(3)}", f"cpu-light-{secrets.token_hex(3)}"
    runtime.service.register_user(heavy)
    runtime.service.register_user(light)
    yield heavy, light
    runtime.service.delete_user(heavy)
    runtime.service.delete_user(light)


def _group_nice(pid: int) -> int | None:
    """The nice of the backend's autogroup (each backend is a session of its own); None without autogroups."""
    try:
        with open(f"/proc/{pid}/autogroup") as handle:
            return int(handle.read().split()[-1])
    except FileNotFoundError:
        return None


def _until(shares: CpuShares, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"no change after {WAIT_S} s: usage {shares.usage}"
        time.sleep(0.25)
        shares.tick()


def _spin(conn: psycopg.Connection[tuple[object, ...]], failure: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            conn.execute("SELECT count(*) FROM generate_series(1, 2000000000)")
        except psycopg.errors.QueryCanceled:
            pass
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_share_leaves_room_for_a_second_user() -> None:
    assert share_of(2, 0) == share_of(2, 1) == share_of(2, 2) == 1.0
    assert share_of(2, 4) == 0.5


def test_a_cpu_heavy_user_is_demoted_and_restored_and_others_are_not(runtime: Runtime,
                                                                      users: tuple[str, str]) -> None:
    heavy, light = users
    shares = CpuShares(runtime.admin_dsn, catalog_owners(runtime.service.deps), demoted_nice=10,
                       share_override=0.3)
    with psycopg.connect(global_uri(runtime, heavy), autocommit=True) as busy, \
            psycopg.connect(global_uri(runtime, light), autocommit=True) as idle:
        busy_pid, idle_pid = busy.info.backend_pid, idle.info.backend_pid
        # The tenant names itself after the other user: who a backend belongs to comes from its database.
        busy.execute("SET application_name = 'agentpg cpu shares'")
        idle.execute("SELECT 1")
        failure: list[BaseException] = []
        loop = _spin(busy, failure)
        try:
            shares.tick()
            _until(shares, lambda: heavy in shares.demoted)
            assert niceness(busy_pid) == 10
            assert _group_nice(busy_pid) in (None, 10)  # the one the scheduler compares, with autogroups on
            assert light not in shares.demoted and niceness(idle_pid) == 0
            assert set(shares.usage) <= {heavy, light}  # agentpg's own databases are nobody's
        finally:
            busy.cancel_safe()
            loop.join(30)
        assert not failure
        busy.execute("SELECT 1")  # the same backend, now quiet
        _until(shares, lambda: heavy not in shares.demoted)
        assert niceness(busy_pid) == 0 and _group_nice(busy_pid) in (None, 0)
        assert shares.demotions == 1 and shares.renice_failures == 0
    shares.close()


# -- per-user control groups (lifecycle/cpu_groups.py) --------------------------------------------------------


def _cpu_cgroup(pid: int) -> str:
    path = cpu_cgroup_of(pid)
    assert path is not None, f"process {pid} has no cpu cgroup"
    return path


class _Backends:
    """Connections to the users' global databases, each able to spin a CPU-bound statement; :meth:`close`
    cancels what spins and closes them."""

    def __init__(self, runtime: Runtime, counts: list[tuple[str, int]]) -> None:
        self.conns = [psycopg.connect(global_uri(runtime, user), autocommit=True)
                      for user, n in counts for _ in range(n)]
        self.failure: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        for conn in self.conns:
            conn.execute("SELECT 1")
        self.pids = [conn.info.backend_pid for conn in self.conns]

    def spin(self, conns: list[psycopg.Connection[tuple[object, ...]]]) -> None:
        self.threads += [_spin(conn, self.failure) for conn in conns]

    def stop(self) -> None:
        for conn in self.conns:
            conn.cancel_safe()
        for thread in self.threads:
            thread.join(30)
        self.threads = []

    def close(self) -> None:
        self.stop()
        for conn in self.conns:
            conn.close()

    def cpu_used(self, seconds: float = 3.0) -> list[float]:
        """CPU seconds each backend used over ``seconds`` (after a second for every spinning loop to start)."""
        time.sleep(1.0)
        before = [process_cpu_s(pid) for pid in self.pids]
        time.sleep(seconds)
        after = [process_cpu_s(pid) for pid in self.pids]
        used = [a[0] - b[0] for a, b in zip(after, before, strict=True) if a and b]
        assert len(used) == len(self.pids)
        return used


def test_a_users_backends_share_one_control_group_and_weigh_as_one(runtime: Runtime,
                                                                     users: tuple[str, str]) -> None:
    """Four busy backends of one user against one of another: with a group per user, the lone backend gets
    about as much CPU as the four together (renicing alone would give it a fifth of the machine). Then the
    heavy user is demoted by weighing its group, and restored."""
    heavy, light = users
    assert runtime.embedded is not None
    groups = find_cpu_groups(str(runtime.embedded.data_dir))
    assert groups is not None, "this host (root, cgroup v1 cpu controller) must offer control groups"
    never = CpuShares(runtime.admin_dsn, catalog_owners(runtime.service.deps), demoted_nice=10,
                      share_override=100.0, groups=groups)  # a share nobody reaches: groups at equal weight
    backends = _Backends(runtime, [(heavy, 4), (light, 1)])
    try:
        never.tick()  # places every backend in its user's group
        pids = backends.pids
        heavy_groups = {_cpu_cgroup(pid) for pid in pids[:4]}
        assert len(heavy_groups) == 1 and _cpu_cgroup(pids[4]) not in heavy_groups
        assert heavy_groups.pop().startswith(_cpu_cgroup(os.getpid()).rstrip("/") + "/agentpg-")
        backends.spin(backends.conns)
        used = backends.cpu_used()
        heavy_cpu, light_cpu = sum(used[:4]), used[4]
        # equal weights: the light user's one backend gets about what the heavy user's four get together
        # (the ratio, not a time: any load on the machine slows both groups alike)
        assert light_cpu >= 0.5 * heavy_cpu, (light_cpu, heavy_cpu)

        shares = CpuShares(runtime.admin_dsn, catalog_owners(runtime.service.deps), demoted_nice=10,
                           share_override=0.3, groups=groups)
        shares.tick()
        _until(shares, lambda: heavy in shares.demoted)
        heavy_group = Path(groups.base) / Path(_cpu_cgroup(pids[0])).name
        light_group = Path(groups.base) / Path(_cpu_cgroup(pids[4])).name
        assert (heavy_group / "cpu.shares").read_text().strip() == str(shares_of_nice(10))
        backends.stop()
        assert not backends.failure
        _until(shares, lambda: heavy not in shares.demoted and light not in shares.demoted)
        assert (heavy_group / "cpu.shares").read_text().strip() == str(FULL_SHARES)
        assert (light_group / "cpu.shares").read_text().strip() == str(FULL_SHARES)
        assert shares.renice_failures == 0 and never.renice_failures == 0
        assert niceness(pids[0]) == 0  # groups, not nice, carry the demotion
    finally:
        backends.close()
    never.close()


def test_a_demoted_users_group_can_go_idle(runtime: Runtime, users: tuple[str, str]) -> None:
    """``AGENTPG_CPU_DEMOTED_IDLE``: the demoted user's group goes into the kernel's idle class (a weight of 3
    against 1,024, where nice 10's is 110), and while the light user keeps every core busy it gets little;
    restored, the group leaves the idle class at full weight."""
    heavy, light = users
    assert runtime.embedded is not None
    groups = find_cpu_groups(str(runtime.embedded.data_dir))
    assert groups is not None
    shares = CpuShares(runtime.admin_dsn, catalog_owners(runtime.service.deps), demoted_nice=10,
                       share_override=0.3, groups=groups, demoted_idle=True)
    cores = os.cpu_count() or 1
    backends = _Backends(runtime, [(heavy, cores), (light, cores)])
    try:
        backends.spin(backends.conns[:cores])  # the heavy user alone first
        shares.tick()
        _until(shares, lambda: heavy in shares.demoted)
        heavy_group = Path(groups.base) / Path(_cpu_cgroup(backends.pids[0])).name
        assert (heavy_group / "cpu.idle").read_text().strip() == "1"
        backends.spin(backends.conns[cores:])  # no pass runs now: the demotion stays
        used = backends.cpu_used()
        heavy_cpu, light_cpu = sum(used[:cores]), sum(used[cores:])
        # Demoted, whatever the class: equal weights would give ~1x. How much more the idle class gives than
        # nice 10's weight (~9x on a quiet machine, 16x and more in the idle class) depends on what else runs:
        # the suite's other worker, for one (a fresh-clone run saw 4.5x beside the attack tests).
        # bench/README.md ("Fair sharing") measures it; the class is asserted by its file above.
        assert light_cpu >= 3 * heavy_cpu, (light_cpu, heavy_cpu)
        backends.stop()
        assert not backends.failure
        _until(shares, lambda: heavy not in shares.demoted)
        assert (heavy_group / "cpu.idle").read_text().strip() == "0"
        assert (heavy_group / "cpu.shares").read_text().strip() == str(FULL_SHARES)
        assert shares.renice_failures == 0
    finally:
        backends.close()
    shares.close()


def test_serve_can_put_itself_before_the_tenants() -> None:
    """``serve`` raises its own priority (every thread, and its autogroup) where it may: a process of its
    own session, so this test's group is not touched."""
    code = ("import os, threading\n"
            "from agentpg.lifecycle.cpu_shares import raise_own_priority\n"
            "early = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True); early.start()\n"
            "assert raise_own_priority(-10)\n"
            "print(os.getpriority(os.PRIO_PROCESS, early.native_id), os.getpriority(os.PRIO_PROCESS, 0),\n"
            "      open('/proc/self/autogroup').read().split()[-1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         start_new_session=True, check=True).stdout.split()
    assert out == ["-10", "-10", "-10"]
