import asyncio
import itertools

import pytest
from virtual_time import VirtualTime

from tda_collector.exchange.ratelimit import RateLimiter, burst_for


class FakeTime(VirtualTime):
    def __init__(self) -> None:
        super().__init__(start=1000.0)
        self.starts: list[float] = []


async def test_concurrent_tasks_are_spaced_at_the_rate_after_the_burst():
    t = FakeTime()
    limiter = RateLimiter(10, burst=2, clock=t.clock, sleep=t.sleep)

    async def request():
        await limiter.acquire()
        t.starts.append(t.now)

    await t.run(asyncio.gather(*(request() for _ in range(12))))
    starts = sorted(t.starts)
    assert starts[:2] == [1000.0, 1000.0]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts[1:])]
    assert all(g >= 0.1 - 1e-9 for g in gaps)
    assert starts[-1] - starts[0] == pytest.approx(1.0, abs=1e-6)


async def test_any_one_second_window_stays_within_the_exchange_budget():
    budget, safety = 20, 0.9
    t = FakeTime()
    limiter = RateLimiter(budget * safety, burst_for(budget, safety), clock=t.clock, sleep=t.sleep)

    async def request():
        await limiter.acquire()
        t.starts.append(t.now)

    await t.run(asyncio.gather(*(request() for _ in range(200))))
    starts = sorted(t.starts)
    worst = max(sum(1 for s in starts if a <= s < a + 1.0) for a in starts)
    assert worst <= budget


async def test_pause_holds_every_task_until_the_given_time():
    t = FakeTime()
    limiter = RateLimiter(100, burst=5, clock=t.clock, sleep=t.sleep)
    limiter.pause_until(t.now + 3.0)

    async def request():
        await limiter.acquire()
        t.starts.append(t.now)

    await t.run(asyncio.gather(*(request() for _ in range(3))))
    assert min(t.starts) >= 1003.0


def test_burst_keeps_one_second_within_budget():
    assert burst_for(20, 0.9) == 1
    assert burst_for(50, 0.9) == 2
    assert burst_for(10, 0.95) == 1
    assert burst_for(50, 0.5) == 12


async def test_a_live_request_goes_before_any_amount_of_queued_background_work():
    """Backfill requests inside the live daemon yield: a live request arriving while 50 of
    them wait is sent within one slot, where in call order it would wait for all 50."""
    t = FakeTime()
    limiter = RateLimiter(10, burst=1, clock=t.clock, sleep=t.sleep)
    background: list[float] = []
    live: list[float] = []

    async def backfill_request():
        await limiter.acquire_background()
        background.append(t.now)

    async def live_request():
        await t.sleep(1.05)  # arrives once the backfill has the budget to itself
        await limiter.acquire()
        live.append(t.now)

    await t.run(asyncio.gather(live_request(), *(backfill_request() for _ in range(50))))
    assert live[0] - 1001.05 <= 0.1 + 1e-9  # one slot at 10/s
    starts = sorted([*background, *live])
    assert all(b - a >= 0.1 - 1e-9 for a, b in itertools.pairwise(starts))  # one budget
    assert len(background) == 50 and max(background) == pytest.approx(1005.0, abs=0.11)


async def test_background_requests_use_the_whole_budget_when_nothing_else_asks():
    t = FakeTime()
    limiter = RateLimiter(10, burst=1, clock=t.clock, sleep=t.sleep)

    async def backfill_request():
        await limiter.acquire_background()
        t.starts.append(t.now)

    await t.run(asyncio.gather(*(backfill_request() for _ in range(21))))
    assert max(t.starts) - min(t.starts) == pytest.approx(2.0, abs=1e-6)
