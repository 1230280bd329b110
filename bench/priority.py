"""Live requests while a backfill saturates the same budget: how long a live request waits for
its slot when the backfill takes the limiter's background slots (as inside the daemon) against
the baseline of the backfill taking ordinary slots (call order).

Real time, the real `RateLimiter` at the exchange's budget x safety: `workers` backfill tasks
ask for slots back to back (a daemon backfill's pages, and many of them at once: the worst
case), while one live request arrives every `live_every_s` (a close of many series would send
several). Each live request's wait is measured from asking to getting its slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tda_collector.exchange.ratelimit import RateLimiter, burst_for


async def _measure(
    priority: bool, budget: float, safety: float, workers: int, seconds: float, live_every_s: float
) -> tuple[list[float], int]:
    limiter = RateLimiter(budget * safety, burst_for(budget, safety))
    take: Callable[[], Awaitable[None]] = (
        limiter.acquire_background if priority else limiter.acquire
    )
    background = 0
    waits: list[float] = []

    async def backfill() -> None:
        nonlocal background
        while True:
            await take()
            background += 1

    async def live() -> None:
        while True:
            await asyncio.sleep(live_every_s)
            asked = time.monotonic()
            await limiter.acquire()
            waits.append(time.monotonic() - asked)

    tasks = [asyncio.create_task(backfill()) for _ in range(workers)]
    tasks.append(asyncio.create_task(live()))
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return waits, background


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(budget: float, safety: float, workers: int, seconds: float, live_every_s: float) -> None:
    print(
        f"budget {budget:g}/s x safety {safety:g}, {workers} backfill tasks asking back to back, "
        f"a live request every {live_every_s:g} s, {seconds:g} s each"
    )
    print(f"{'backfill slots':<16} {'live p50 ms':>12} {'p99 ms':>9} {'max ms':>9} "
          f"{'backfill req/s':>15}")  # fmt: skip
    results, rates = {}, {}
    for priority in (False, True):
        waits, background = asyncio.run(
            _measure(priority, budget, safety, workers, seconds, live_every_s)
        )
        name = "background" if priority else "call order"
        results[name], rates[name] = waits, background / seconds
        print(
            f"{name:<16} {_p(waits, 0.5) * 1000:>12.1f} {_p(waits, 0.99) * 1000:>9.1f} "
            f"{max(waits) * 1000:>9.1f} {background / seconds:>15.1f}"
        )
    base, prio = results["call order"], results["background"]
    print(
        f"live wait p99, call order ÷ background: {_p(base, 0.99) / _p(prio, 0.99):.0f}x; "
        f"backfill requests/s, background ÷ call order: "
        f"{rates['background'] / rates['call order']:.3f}"
    )
