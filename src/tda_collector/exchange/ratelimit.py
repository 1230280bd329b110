"""One request budget per exchange, shared by every task that talks to it.

A GCRA token bucket: each request reserves the next free slot synchronously (no lock is needed
on one event loop), so N concurrent tasks are spaced exactly `cost / rate` apart after an
initial burst. The burst is sized so that burst + one second of steady rate never exceeds the
exchange's own per-second budget. `pause_until` is the server-feedback hook: after a 429/418
every task of the exchange waits until the exchange allows requests again.

Slots are computed ahead, but a task only wakes when the event loop gets to it: after a busy
stretch several late tasks would start together and reach the exchange as a burst. So a
second check at the moment of starting keeps the starts of any 1-second window within
rate + burst, whatever the loop was doing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol


class Limiter(Protocol):
    """What talks to an exchange asks before each request: `RateLimiter` here (one process),
    `shared_budget.SharedBudget` when instances share a budget."""

    rate_per_s: float

    async def acquire(self, cost: float = 1.0) -> None:
        """Wait for a slot of `cost` requests' weight."""

    def pause_until(self, until: float) -> None:
        """No request may start before `until` (monotonic seconds)."""

    @property
    def paused_until(self) -> float: ...


def burst_for(budget_per_s: float, safety: float) -> int:
    """A burst that keeps any 1-second window within the exchange's budget with room to spare:
    half the headroom the safety factor leaves, since requests that start evenly spaced can
    still arrive bunched (measured: the whole headroom drew 429s at 50 requests/s)."""
    return max(1, math.floor(budget_per_s * (1.0 - safety) / 2 + 1e-9))


class RateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self.rate_per_s = rate_per_s
        self._interval = 1.0 / rate_per_s
        self._tolerance = (max(1, burst) - 1) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._on_wait = on_wait
        self._tat = clock()  # theoretical arrival time of the next request
        self._paused_until = 0.0
        self._window_cap = math.floor(rate_per_s + 1e-9) + max(1, burst) - 1 or 1
        self._recent: deque[float] = deque()  # start times within the last second

    def pause_until(self, until: float) -> None:
        """No request may start before `until` (monotonic seconds)."""
        self._paused_until = max(self._paused_until, until)
        self._tat = max(self._tat, self._paused_until)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    async def acquire(self, cost: float = 1.0) -> None:
        """Wait for a slot of `cost` requests' weight."""
        while True:
            now = self._clock()
            if now < self._paused_until:
                await self._wait(self._paused_until - now)
                continue
            start = max(now, self._tat - self._tolerance)
            self._tat = max(self._tat, now) + cost * self._interval
            if start > now:
                await self._wait(start - now)
                if self._clock() < self._paused_until:
                    continue  # a ban arrived while waiting: queue again behind it
            await self._within_window(cost)
            return

    async def _within_window(self, cost: float) -> None:
        while True:
            now = self._clock()
            while self._recent and self._recent[0] <= now - 1.0:
                self._recent.popleft()
            if len(self._recent) + cost <= self._window_cap or not self._recent:
                self._recent.extend([now] * max(1, math.ceil(cost)))
                return
            await self._wait(self._recent[0] + 1.0 - now)

    async def _wait(self, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(seconds)
        await self._sleep(seconds)
