"""One request budget shared by every instance that uses it: the limiter behind `state_url`.

Same interface and same model as the in-process `RateLimiter` (a GCRA token bucket: a rate and
a burst), but the bucket's one number, the theoretical arrival time, lives in the shared state
(`BudgetStore`, Postgres), with the pause a 429/418 asks for. Each request reserves its slot
there at its weight in one round trip and sleeps until the slot; whichever instance asks, the
slots of a budget group never come closer than `cost / rate` after the burst.

Why GCRA rather than "limit per period, usage, period start": a fixed window lets a whole
period's budget through at the window's turn (twice the rate across the boundary, which is
what draws 429s from exchanges counting sliding windows), and makes the instances that lose the
race poll until the reset. GCRA spaces the requests evenly, answers each caller with its exact
wait, and its state is one number per group, updated by one statement.

The clock is the state server's, so the instances' clocks never matter. While the state cannot
be reached, `acquire` waits (the store retries): no instance requests without a slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from .ratelimit import ForegroundFirst, StartWindow, window_cap

# A request may start this fraction of the slots' spacing after its slot, no later: then any
# 1-second window holds at most rate + 1 starts (slots from up to half a spacing before it).
# Less would give up slots to ordinary scheduling jitter, and the budget's use with them.
LATE_FRACTION = 0.5


class BudgetStore(Protocol):
    async def acquire_budget(
        self, group: str, cost: float, interval_s: float, tolerance_s: float
    ) -> float:
        """Reserve the next slot of `cost` (GCRA: `interval_s` per unit, `tolerance_s` of
        burst); seconds to wait until it."""

    async def pause_budget(self, group: str, wait_s: float) -> None:
        """No slot of `group` starts within `wait_s` seconds from now."""


class SharedBudget(ForegroundFirst):
    """`Limiter` of one budget group in a `BudgetStore`, shared with other instances."""

    def __init__(
        self,
        store: BudgetStore,
        group: str,
        rate_per_s: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate_per_s = rate_per_s
        self.group = group
        self._store = store
        self._interval = 1.0 / rate_per_s
        self._tolerance = (max(1, burst) - 1) * self._interval
        self._clock, self._sleep, self._on_wait = clock, sleep, on_wait
        self._paused_until = 0.0
        self._pausing: set[asyncio.Task[None]] = set()
        self._window = StartWindow(window_cap(rate_per_s, burst), clock)  # this instance's
        self.round_trips = 0
        self.late_slots = 0  # slots let go because the task woke too late for them

    def pause_until(self, until: float) -> None:
        """No request of the group, in this instance or any other, starts before `until`
        (monotonic seconds here): held here at once, and recorded in the shared state."""
        self._paused_until = max(self._paused_until, until)
        task = asyncio.ensure_future(self._store.pause_budget(self.group, until - self._clock()))
        self._pausing.add(task)
        task.add_done_callback(self._pausing.discard)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def usage(self) -> tuple[int, float, int, float]:
        """(limit, period_s, usage, period_start) as `RateLimiter.usage`, of the group's limit
        and this instance's own starts (the other instances' are not counted here)."""
        return self._window.usage()

    async def acquire_background(self, cost: float = 1.0) -> None:
        """A slot of `cost` once no `acquire` of this instance waits: foreground requests go
        first within the instance; across instances the group's slots go in call order."""
        while self._foreground_waiting:
            await self._sleep(self._interval)
        await self._reserve(cost)

    async def _reserve(self, cost: float) -> None:
        now = self._clock()
        if now < self._paused_until:
            await self._wait(self._paused_until - now)
        if self._pausing:  # a pause being recorded: reserve behind it, not before
            await asyncio.gather(*self._pausing, return_exceptions=True)
        while True:
            wait_s = await self._store.acquire_budget(
                self.group, cost, self._interval, self._tolerance
            )
            self.round_trips += 1
            slot = self._clock() + max(0.0, wait_s)  # as the answer arrived: never too early
            if wait_s > 0:
                await self._wait(wait_s)
            started = self._clock()
            # A task woken late (a busy event loop or CPU) would start next to the following
            # slot's owner, two requests in one spacing: give the slot up and take another.
            if started - slot <= LATE_FRACTION * self._interval * max(1.0, cost):
                break
            self.late_slots += 1
        self._window.record(started, cost)

    async def _wait(self, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(seconds)
        await self._sleep(seconds)
