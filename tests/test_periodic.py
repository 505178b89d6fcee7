"""serve's background jobs end together: every job is told to stop before any is waited for."""

from __future__ import annotations

import threading

from agentpg.periodic import PeriodicJob, stop_all


def test_stop_all_tells_every_job_before_waiting_for_one() -> None:
    """The first job's run ends only once the second job has been told to stop (or after 10 s). Stopped one at
    a time, the second is told only after the first has ended, so the first run sees no signal and records it;
    a real first job would be a base backup, and serve's stop would wait for it before telling the others."""
    seen: list[bool] = []
    started = threading.Event()

    def first_work() -> None:
        started.set()
        seen.append(second.stopping.wait(10))

    first = PeriodicJob("first", first_work, 3600, first_run_now=True)
    second = PeriodicJob("second", lambda: None, 3600, first_run_now=False)
    first.start()
    second.start()
    assert started.wait(10)
    stop_all([first, None, second])
    assert seen == [True]
    assert first.stopping.is_set() and second.stopping.is_set()


def test_a_job_told_to_stop_ends_its_wait_and_its_thread() -> None:
    """``request_stop`` returns at once and cuts the job's interval short; ``stop`` then finds it ended."""
    job = PeriodicJob("ticker", lambda: None, 3600, first_run_now=True)
    job.start()
    job.request_stop()
    job.stop()
    assert job.stopping.is_set()
    assert "agentpg-ticker" not in {thread.name for thread in threading.enumerate()}
