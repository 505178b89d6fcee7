"""One background job on a timer: what ``serve``'s warm-pool refill, usage sync and autovacuum pacing share."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger(__name__)


class PeriodicJob:
    """Runs ``work`` in a daemon thread every ``interval_s`` until :meth:`stop`.

    Contract: ``first_run_now`` runs it at start rather than after one interval; :meth:`kick` runs it early
    (the wait is cut short); an exception is logged (with its traceback only if ``log_traceback``) and the
    job runs again next interval, so it outlives a catalog or server outage; :meth:`request_stop` tells a run
    in progress to end (through :attr:`stopping`) and returns at once; :meth:`stop` also waits up to 30 s for
    that run. ``start`` on a job whose ``interval_s`` is 0 does nothing.
    """

    def __init__(self, name: str, work: Callable[[], object], interval_s: float, *, first_run_now: bool,
                 log_traceback: bool = True) -> None:
        self._name = name
        self._work = work
        self._interval_s = interval_s
        self._first_run_now = first_run_now
        self._log_traceback = log_traceback
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agentpg-{name}", daemon=True)

    @property
    def stopping(self) -> threading.Event:
        """Set once :meth:`stop` is called: long work can check it and end early."""
        return self._stop

    def start(self) -> None:
        if self._interval_s > 0:
            self._thread.start()

    def kick(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def stop(self) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        if not self._first_run_now:
            self._pause()
        while not self._stop.is_set():
            try:
                self._work()
            except Exception as exc:
                log.warning("%s failed (%s); retrying in %.0f s", self._name, type(exc).__name__,
                            self._interval_s, exc_info=self._log_traceback)
            self._pause()

    def _pause(self) -> None:
        self._wake.wait(self._interval_s)
        self._wake.clear()


class Stoppable(Protocol):
    """A background job as :func:`stop_all` sees it."""

    def request_stop(self) -> None: ...

    def stop(self) -> None: ...


def stop_all(jobs: Iterable[Stoppable | None]) -> None:
    """Stop every job: all are told first, then each is waited for.

    Telling them one at a time would add their ends up: a job busy for seconds (a base backup, a usage sync
    against a slow server) would hold up the next one's signal until it ended, and serve's stop would take the
    sum of their waits instead of the longest one."""
    present = [job for job in jobs if job is not None]
    for job in present:
        job.request_stop()
    for job in present:
        job.stop()
