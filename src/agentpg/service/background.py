"""Work that outlives the request that started it (a restore answered 202), owned by the app's lifespan.

One :class:`Background` per app, made in the lifespan and drained there before the runtime closes, so a
restore running when ``serve`` stops finishes (its saga is crash-safe anyway: ``reconcile`` settles one
whose process died). Holding the tasks here is what keeps them alive: the event loop keeps only weak
references to tasks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Background:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, _T], name: str) -> asyncio.Task[_T]:
        """Run ``work`` on this loop until it ends, whoever awaits it (or nobody). Its failure is retrieved
        here (so asyncio never warns about it): what it did is recorded elsewhere (a restore's operation row)."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The type only: the work logs what matters itself, and a message might name more than it should.
            log.debug("background task %s ended with %s", task.get_name(), type(task.exception()).__name__)

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self) -> None:
        """Wait for every task still running (at shutdown)."""
        if self._tasks:
            log.info("waiting for %d background task(s) (restores) to finish", len(self._tasks))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
