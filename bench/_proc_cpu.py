"""Where the CPU went during a window: CPU seconds per group of processes, read from ``/proc`` (Linux only).

A benchmark that asks "why was the victim slow" needs to know who had the cores: serve, each client process,
the PostgreSQL backends of each tenant, PostgreSQL's own processes. :class:`CpuAccount` samples every process's
``utime + stime`` a few times a second and sums, per group, what each process used between its first and last
sample inside the window (a process that lives shorter than one interval is missed; its share is small).
Likewise the time each group's threads spent *runnable but waiting for a core* (``run_delay`` of
``/proc/<pid>/task/*/schedstat``): the scheduler's share of a latency, which CPU time alone does not show.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")

Classifier = Callable[[int, list[str]], str | None]
"""(pid, argv) -> the group a process belongs to, or None to leave it out."""


def _cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _wait_s(pid: int) -> float | None:
    """Seconds the process's threads spent runnable on a run queue, waiting for a core (threads that exited
    are not counted: their time leaves the sum)."""
    total, seen = 0, False
    try:
        tasks = list(os.scandir(f"/proc/{pid}/task"))
    except OSError:
        return None
    for task in tasks:
        try:
            total += int(Path(task.path, "schedstat").read_text().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9 if seen else None


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def postgres_database(argv: list[str]) -> str | None:
    """The database of a PostgreSQL backend from its process title (``postgres: role db host state``)."""
    if len(argv) != 1 or not argv[0].startswith("postgres: "):
        return None
    words = argv[0].split()
    return words[2] if len(words) >= 4 else None


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (children of children, too)."""
    found, todo = {pid}, [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


class CpuAccount(threading.Thread):
    """Samples every ``interval_s`` until :meth:`stop`; then CPU seconds per group (and the machine's total)."""

    def __init__(self, classify: Classifier, interval_s: float = 0.2, start_at: float | None = None) -> None:
        """``start_at``: the wall-clock time (``time.time()``) the window opens; now if None."""
        super().__init__(daemon=True)
        self.classify, self.interval_s, self.start_at = classify, interval_s, start_at
        self._stop_event = threading.Event()
        self._group: dict[int, str | None] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._first_wait: dict[int, float] = {}
        self._last_wait: dict[int, float] = {}
        self._machine: list[float] = []
        self.waits: dict[str, float] = {}
        """After :meth:`stop`: seconds each group's threads waited for a core, runnable, over the window."""

    @staticmethod
    def _machine_busy_s() -> float:
        first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(x) for x in first]
        return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS  # all but idle and iowait

    def _sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._group:
                self._group[pid] = self.classify(pid, _argv(pid))
            if self._group[pid] is None:
                continue
            cpu = _cpu_s(pid)
            if cpu is None:
                continue
            self._first.setdefault(pid, cpu)
            self._last[pid] = cpu
            wait = _wait_s(pid)
            if wait is not None:
                self._first_wait.setdefault(pid, wait)
                self._last_wait[pid] = max(wait, self._first_wait[pid])
        self._machine.append(self._machine_busy_s())

    def run(self) -> None:
        if self.start_at is not None and self._stop_event.wait(max(0.0, self.start_at - time.time())):
            return
        self._sample()
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def stop(self) -> dict[str, float]:
        """CPU seconds per group over the window, plus ``machine (all processes)``."""
        self._stop_event.set()
        self.join(10)
        if not self._machine:
            return {}
        self._sample()
        out: dict[str, float] = {}
        for pid, last in self._last.items():
            group = self._group[pid]
            assert group is not None
            out[group] = out.get(group, 0.0) + last - self._first[pid]
        out["machine (all processes)"] = self._machine[-1] - self._machine[0]
        waits: dict[str, float] = {}
        for pid, last in self._last_wait.items():
            group = self._group[pid]
            assert group is not None
            waits[group] = waits.get(group, 0.0) + last - self._first_wait[pid]
        self.waits = {k: round(v, 2) for k, v in sorted(waits.items(), key=lambda kv: -kv[1])}
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
