"""One budget across instances: slots reserved in Postgres, whichever process asks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from event_support import recording_events
from postgres_support import (
    fresh_database,
    postgres_server_fixture,  # noqa: F401 (registers the fixture)
)

from tda_collector.exchange.shared_budget import SharedBudget
from tda_collector.jobs.postgres_fleet import PostgresFleet
from tda_collector.jobs.postgres_state import PostgresState

SUPPORT = Path(__file__).parents[1] / "support"


def busiest_second(times: list[float]) -> int:
    """The most grants within any 1-second window."""
    times = sorted(times)
    most, first = 0, 0
    for last, t in enumerate(times):
        while times[first] <= t - 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


async def test_processes_sharing_a_group_stay_within_one_budget_and_use_it(postgres_server):
    url, rate, per_process = fresh_database(), 40.0, 40
    env = {**os.environ, "PYTHONPATH": f"{SUPPORT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, str(SUPPORT / "budget_worker.py"), url, "binance", str(rate)]
    started = time.time()
    workers = [
        subprocess.Popen([*argv, str(per_process)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(3)
    ]
    grants = []
    for worker in workers:
        out, _ = worker.communicate(timeout=60)
        assert worker.returncode == 0
        grants += [float(line) for line in out.split()]
    assert len(grants) == 3 * per_process
    # Three processes, one budget of 40/s: 120 slots take ~3 s, never more than 40 (+1 for the
    # wake-up jitter of a sleeping process) in any second.
    assert busiest_second(grants) <= rate + 1
    span = max(grants) - min(grants)
    assert span >= (len(grants) - 1) / rate - 0.05
    assert len(grants) / (max(grants) - started) >= 0.5 * rate  # process start-up included
    assert (len(grants) - 1) / span >= 0.9 * rate


async def test_groups_are_separate_budgets(postgres_server):
    url = fresh_database()
    events, _ = recording_events()
    state = PostgresState(url, events)
    await state.open()
    fleet = PostgresFleet(state)
    a, b = SharedBudget(fleet, "binance-ip1", 20.0), SharedBudget(fleet, "binance-ip2", 20.0)
    started = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for limiter in (a, b) for _ in range(20)))
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.5  # 20 each at 20/s in parallel, not 40 at 20/s
    # One round trip per slot, and one more per slot given up by a task that woke too late.
    assert a.round_trips - a.late_slots == b.round_trips - b.late_slots == 20
    await state.close()


async def test_a_pause_recorded_by_one_instance_holds_every_instance(postgres_server):
    url = fresh_database()
    events, _ = recording_events()
    first, second = PostgresState(url, events), PostgresState(url, events)
    await first.open()
    await second.open()
    one = SharedBudget(PostgresFleet(first), "binance", 100.0)
    other = SharedBudget(PostgresFleet(second), "binance", 100.0)
    await other.acquire()
    one.pause_until(time.monotonic() + 1.0)  # a 429 with Retry-After: 1 seen by `one`
    await asyncio.sleep(0.1)  # recorded in the shared state
    started = time.monotonic()
    await other.acquire()
    assert time.monotonic() - started >= 0.85
    await first.close()
    await second.close()


class _ClockedStore:
    """A one-group GCRA on a fake clock, as Postgres keeps it (`BudgetStore`)."""

    def __init__(self, clock: list[float]) -> None:
        self.clock, self.arrival = clock, 0.0

    async def acquire_budget(self, group, cost, interval_s, tolerance_s) -> float:
        now = self.clock[0]
        slot = max(self.arrival, now)
        self.arrival = slot + cost * interval_s
        return slot - now

    async def pause_budget(self, group, wait_s) -> None:
        raise AssertionError("not paused here")


async def test_a_task_that_wakes_too_late_for_its_slot_takes_another_instead_of_crowding():
    clock = [100.0]
    oversleep = [0.07, 0.0]  # a wake-up comes 0.7 of a slot late (a busy machine)

    async def sleep(seconds: float) -> None:
        clock[0] += seconds + (oversleep.pop(0) if oversleep else 0.0)

    budget = SharedBudget(_ClockedStore(clock), "g", 10.0, clock=lambda: clock[0], sleep=sleep)
    starts = []
    for _ in range(3):
        await budget.acquire()
        starts.append(clock[0])
    # Slots at 100.0, 100.1 (woken at 100.17: given up), 100.2, 100.3.
    assert budget.late_slots == 1 and budget.round_trips == 4
    assert starts == pytest.approx([100.0, 100.2, 100.3])
