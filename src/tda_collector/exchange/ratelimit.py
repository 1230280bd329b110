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

Two priorities share the one budget: `acquire` (live requests) reserves the next slot in call
order; `acquire_background` (a backfill inside the live daemon) takes a slot only when it is
free now and no `acquire` is waiting, one background request at a time, and never reserves
ahead. So a live request waits at most one slot behind background work, however much of it
is queued.
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

    async def acquire_background(self, cost: float = 1.0) -> None:
        """Wait for a slot of `cost` that no `acquire` wants (a backfill's, behind live)."""

    def usage(self) -> tuple[int, float, int, float]:
        """(limit, period_s, usage, period_start): requests that may start in any window of
        `period_s`, how many started in the current one, and when it began (monotonic)."""

    def pause_until(self, until: float) -> None:
        """No request may start before `until` (monotonic seconds)."""

    @property
    def paused_until(self) -> float: ...


def burst_for(budget_per_s: float, safety: float) -> int:
    """A burst that keeps any 1-second window within the exchange's budget with room to spare:
    half the headroom the safety factor leaves, since requests that start evenly spaced can
    still arrive bunched (measured: the whole headroom drew 429s at 50 requests/s)."""
    return max(1, math.floor(budget_per_s * (1.0 - safety) / 2 + 1e-9))


class StartWindow:
    """The starts of the last second, for `Limiter.usage` in the brief's terms (limit, period,
    usage, period start) and to hold starts to `cap` in any 1-second window."""

    def __init__(self, cap: int, clock: Callable[[], float]) -> None:
        self.cap = cap
        self._clock = clock
        self._starts: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - 1.0:
            self._starts.popleft()

    def room_at(self, now: float, cost: float) -> float | None:
        """None when a request of `cost` may start at `now`; else when the window allows it."""
        self._expire(now)
        if len(self._starts) + cost <= self.cap or not self._starts:
            return None
        return self._starts[0] + 1.0

    def record(self, now: float, cost: float) -> None:
        self._expire(now)
        self._starts.extend([now] * max(1, math.ceil(cost)))

    def usage(self) -> tuple[int, float, int, float]:
        now = self._clock()
        starts = [t for t in self._starts if t > now - 1.0]
        return self.cap, 1.0, len(starts), starts[0] if starts else now


def window_cap(rate_per_s: float, burst: int) -> int:
    """Requests that may start in any 1-second window: the rate plus the burst's extra."""
    return math.floor(rate_per_s + 1e-9) + max(1, burst) - 1 or 1


class ForegroundFirst:
    """`acquire` counted while it waits, so that `acquire_background` can keep behind it."""

    _foreground_waiting = 0

    async def _reserve(self, cost: float) -> None:
        raise NotImplementedError

    async def acquire(self, cost: float = 1.0) -> None:
        """Wait for a slot of `cost` requests' weight."""
        self._foreground_waiting += 1
        try:
            await self._reserve(cost)
        finally:
            self._foreground_waiting -= 1


class RateLimiter(ForegroundFirst):
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
        self._window = StartWindow(window_cap(rate_per_s, burst), clock)
        self._background_turn = asyncio.Lock()  # one background request polls at a time

    def pause_until(self, until: float) -> None:
        """No request may start before `until` (monotonic seconds)."""
        self._paused_until = max(self._paused_until, until)
        self._tat = max(self._tat, self._paused_until)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def usage(self) -> tuple[int, float, int, float]:
        """(limit, period_s, usage, period_start): requests that may start in any 1-second
        window, that window's length, how many started in the current one, and when it began
        (monotonic seconds: the oldest start in it, or now when none)."""
        return self._window.usage()

    async def acquire_background(self, cost: float = 1.0) -> None:
        """Wait for a slot of `cost` that no `acquire` wants: a free one, taken at once."""
        async with self._background_turn:
            while True:
                now = self._clock()
                free_at = max(self._paused_until, self._tat - self._tolerance)
                if self._foreground_waiting == 0 and free_at <= now:
                    await self._reserve(cost)
                    return
                await self._sleep(max(free_at - now, self._interval))

    async def _reserve(self, cost: float) -> None:
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
            allowed_at = self._window.room_at(now, cost)
            if allowed_at is None:
                self._window.record(now, cost)
                return
            await self._wait(allowed_at - now)

    async def _wait(self, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(seconds)
        await self._sleep(seconds)
