"""Issue 18, CPU: a user over its share of the embedded server's CPU has its backends demoted (a higher nice),
another user's are not, and the demoted ones get their priority back once the user is quiet.

Real: the session's embedded server, two registered users, a CPU-bound statement in one user's database;
the passes of :class:`CpuShares` are run by hand (``serve`` runs them every 0.5 s). The share is fixed low
(0.3 cores) so the test does not depend on how much of the 2 cores a loaded CI machine gives the loop.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from helpers import global_uri

from agentpg.app.runtime import Runtime
from agentpg.lifecycle.cpu_shares import CpuShares, catalog_owners, niceness, share_of

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

        def spin() -> None:
            try:
                busy.execute("SELECT count(*) FROM generate_series(1, 2000000000)")
            except psycopg.errors.QueryCanceled:
                pass
            except BaseException as exc:
                failure.append(exc)

        loop = threading.Thread(target=spin)
        loop.start()
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
