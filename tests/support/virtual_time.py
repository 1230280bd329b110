"""A virtual clock for asyncio tests: time moves only when every task is waiting on it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Coroutine
from typing import Any


class VirtualTime:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self.busy = 0  # work outside the loop (threads) that time must not jump over
        self._finished = 0  # how many tracked pieces of work have come back

    async def track(self, awaitable: Any) -> Any:
        """Await work done in a thread without letting the clock jump meanwhile."""
        self.busy += 1
        try:
            return await awaitable
        finally:
            self.busy -= 1
            self._finished += 1

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._order), future))
        await future

    async def run(self, coro: Coroutine[Any, Any, Any], settle_rounds: int = 20) -> Any:
        """Run `coro` to completion, jumping the clock to the next sleeper whenever all is idle.

        Idle means `settle_rounds` loop turns in a row with no thread work outstanding and none
        coming back: a thread finishes when the OS lets it, so work that resumes late in a
        settle must get full rounds of its own before the clock may jump past it (else a
        loaded machine shifts that task's timeline, and the test's outcome with it)."""
        task = asyncio.ensure_future(coro)
        while not task.done():
            finished = self._finished
            for _ in range(settle_rounds):
                await asyncio.sleep(0)
                if task.done():
                    break
            if self.busy:
                await asyncio.sleep(0.0005)
                continue
            if task.done() or not self._sleepers or self._finished != finished:
                continue
            wake_at, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake_at)
            if not future.done():
                future.set_result(None)
        return task.result()
