"""How late ``serve``'s event loop runs what is ready: one process answers every tenant's HTTP and MCP calls
on one thread, so anything that holds the loop (a large result being shaped, a synchronous call on the loop)
delays every other tenant's call by as much, and no per-connection or per-CPU measure shows it.

:class:`LoopLag` wakes every ``interval_s`` and records how much later than asked it woke, as the histogram
``agentpg_event_loop_lag_seconds`` on the app's registry (an idle loop: ~0.1 ms). Operators alert on its high
buckets; ``bench/fair_sharing.py`` reads it to split a victim's latency under attack.

What it found: Python's full (generation 2) garbage collections. Each one walks every tracked object, and
most of serve's are the modules, schemas and routes made at start-up, which live as long as the process. In
a diagnostic run under a noisy neighbour's calls (asyncio debug on), 12 of them in ~30 s held the loop for 107
to 203 ms each, and every tenant's call in flight waited that long. :func:`freeze_startup_heap` takes those
objects out of the collector's walk.
"""

from __future__ import annotations

import asyncio
import gc

from prometheus_client import CollectorRegistry, Histogram

#: Upper bounds (seconds) of the histogram's buckets: sub-millisecond (idle) to a stalled second.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now to the collector's permanent generation
    (:func:`gc.freeze`): start-up's objects are never garbage, and a full collection stops walking them.
    Objects made from now on are collected as before. Call once, at the end of start-up."""
    gc.collect()
    gc.freeze()


class LoopLag:
    """Samples the running loop's lag; :meth:`run` until cancelled."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.histogram = Histogram("agentpg_event_loop_lag_seconds",
                                   "How much later than asked serve's event loop woke a sleeping task (sampled "
                                   "every 50 ms): the wait every call on the loop shares.",
                                   registry=registry, buckets=BUCKETS)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.histogram.observe(max(0.0, loop.time() - asked))
