"""Schedules of live jobs on a virtual clock: a cron job runs at its instants, each run
catching up from its cursor; a timeframe job beside it keeps running at each close."""

from __future__ import annotations

import asyncio

import pytest
from fake_exchange import SymbolSpec
from live_support import MIN, T0, Harness, TrackedState, assert_closed_minutes_exact, key

from tda_collector.jobs.ledger import SqliteState
from tda_collector.jobs.schedule import Schedule
from tda_collector.modes.live import LiveJob
from tda_collector.timeframes import grid_of

EVERY_15 = Schedule(mode="cron", cron="*/15 * * * *")


async def test_a_cron_job_runs_at_its_instants_and_catches_up_each_time(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")])
    state = SqliteState(str(tmp_path / "state.sqlite"))
    await state.open()
    live = h.live(TrackedState(state, h.vt))
    jobs = [
        LiveJob(key("BTC/USDT"), grid_of("1m"), None, schedule=EVERY_15),
        LiveJob(key("ETH/USDT"), grid_of("1m"), None),
    ]
    seen = {}

    async def scenario():
        task = asyncio.ensure_future(live.run(jobs))
        await h.vt.sleep(46 * 60)  # 00:00:30 -> 00:46:30
        seen["next_run_ms"] = jobs[0].next_due_ms
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await h.vt.run(scenario())
    await state.close()
    btc_runs = [c[0] for c in h.source.calls if c[1] == "BTC/USDT"]
    start = T0 - 30  # 2024-03-01T00:00:00Z
    # At once on start, then at :15, :30 and :45 exactly (no settle delay: the cron is the time).
    assert btc_runs == [T0, start + 15 * 60, start + 30 * 60, start + 45 * 60]
    assert seen["next_run_ms"] == (start + 60 * 60) * 1000
    # Each run stored everything since the previous one: no hole, and exactly the exchange's.
    first = int(T0 * 1000) - 30_000 - 5 * MIN
    assert_closed_minutes_exact(h.store, "BTC/USDT", first, int(start * 1000) + 44 * MIN)
    eth_runs = [c[0] for c in h.source.calls if c[1] == "ETH/USDT"]
    assert len(eth_runs) >= 46  # the timeframe job: every close (and refresh) meanwhile
    runs = [e for e in h.recorder.named("job_run") if e["symbol"] == "BTC/USDT"]
    # 5 closed and the open one at start, then 15 closed since and the open one at :15.
    assert [r["rows"] for r in runs] == [6, 16, 16, 16]
    assert all(r["level"] == "DEBUG" and r["duration_ms"] >= 0 for r in runs)
