"""Live jobs in the registry, on a virtual clock: shown RUNNING with their runs and errors,
paused (skipping due runs, then catching up), cancelled (the others go on)."""

from __future__ import annotations

import asyncio

import pytest
from fake_exchange import SymbolSpec, candle
from live_support import MIN, T0, Harness, TrackedState, key

from tda_collector.jobs.ledger import SqliteState
from tda_collector.jobs.model import CANCELLED, PAUSED, RUNNING
from tda_collector.jobs.registry import JobRegistry
from tda_collector.modes.live import LiveJob
from tda_collector.timeframes import grid_of

BTC, ETH = "binance:BTC-USDT:1m:live", "binance:ETH-USDT:1m:live"


async def run_live(h: Harness, registry: JobRegistry, script) -> None:
    """Run live mode for BTC and ETH while `script(registry)` steers it, then stop."""
    state = SqliteState(str(h.tmp_path / "state.sqlite"))
    await state.open()
    live = h.live(TrackedState(state, h.vt))
    live.registry = registry
    jobs = [LiveJob(key(s), grid_of("1m"), None) for s in ("BTC/USDT", "ETH/USDT")]

    async def scenario():
        task = asyncio.ensure_future(live.run(jobs))
        await script(registry)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await h.vt.run(scenario())
    await state.close()


def calls(h: Harness, symbol: str, after_s: float) -> list:
    return [c for c in h.source.calls if c[1] == symbol and c[0] > after_s]


async def test_a_paused_live_job_skips_its_runs_and_catches_up_on_resume(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")])
    registry = JobRegistry("live", clock_ms=lambda: int(h.vt.now * 1000))
    seen = {}

    async def script(registry):
        await h.vt.sleep(5 * 60)
        btc = registry.jobs[BTC]
        assert btc.status == RUNNING and btc.record.last_run_ms
        assert btc.record.next_run_ms > h.vt.now * 1000
        registry.command(btc, "pause")
        seen["paused_at"] = h.vt.now
        await h.vt.sleep(10 * 60)
        seen["during"] = calls(h, "BTC/USDT", seen["paused_at"])
        seen["paused"] = (btc.status, btc.record.next_run_ms)
        registry.command(btc, "resume")
        await h.vt.sleep(1)
        seen["resumed"] = calls(h, "BTC/USDT", seen["paused_at"])
        seen["resumed_ms"] = int(h.vt.now * 1000)
        await h.vt.sleep(2 * 60)

    await run_live(h, registry, script)
    assert seen["during"] == [] and seen["paused"] == (PAUSED, None)
    assert len(seen["resumed"]) == 1  # at once on resume: one sync catches up ten minutes
    start_boundary = int(T0 * 1000) - 30_000
    resumed_boundary = seen["resumed_ms"] // MIN * MIN
    closed = [r[:6] for r in h.store.series_rows(key("BTC/USDT")) if r[6]]
    expected = [
        candle("BTC/USDT", "1m", t) for t in range(start_boundary - 5 * MIN, resumed_boundary, MIN)
    ]
    assert closed[: len(expected)] == expected  # no hole where it was paused
    cycles = h.recorder.named("live_cycle_complete")
    assert any(c["jobs"] == 1 for c in cycles) and cycles[-1]["jobs"] == 2
    btc = registry.jobs[BTC]
    assert btc.status == RUNNING and btc.record.last_run_ms > seen["resumed_ms"] + MIN
    assert btc.record.rows >= 5 + 15


async def test_a_cancelled_live_job_stops_and_the_others_go_on(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")])
    registry = JobRegistry("live", clock_ms=lambda: int(h.vt.now * 1000))
    seen = {}

    async def script(registry):
        await h.vt.sleep(3 * 60 + 10)  # between due instants: the task is sleeping
        registry.command(registry.jobs[ETH], "cancel")
        seen["at"] = h.vt.now
        await h.vt.sleep(5 * 60)

    await run_live(h, registry, script)
    assert calls(h, "ETH/USDT", seen["at"]) == []
    assert len(calls(h, "BTC/USDT", seen["at"])) >= 5
    assert registry.jobs[ETH].status == CANCELLED and registry.jobs[ETH].record.next_run_ms is None
    assert h.recorder.named("live_cycle_complete")[-1]["jobs"] == 1  # cycles go on without it


async def test_a_live_job_shows_its_last_error_until_a_run_succeeds(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")])
    registry = JobRegistry("live", clock_ms=lambda: int(h.vt.now * 1000))
    seen = {}

    async def script(registry):
        await h.vt.sleep(2 * 60)
        h.source.down = True
        await h.vt.sleep(3 * 60)
        seen["error"] = registry.jobs[BTC].record.last_error
        h.source.down = False
        await h.vt.sleep(2 * 60)

    await run_live(h, registry, script)
    assert "exchange unreachable" in seen["error"]
    assert registry.jobs[BTC].record.last_error is None


async def test_a_paused_live_job_can_be_cancelled_while_others_run_its_cycle(tmp_path):
    # Runs take 20 s, so BTC is still in the 00:01:02 cycle when ETH, which skipped it, goes.
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")], latency_s=20)
    registry = JobRegistry("live", clock_ms=lambda: int(h.vt.now * 1000))

    async def script(registry):
        await h.vt.sleep(25)  # 00:00:55
        registry.command(registry.jobs[ETH], "pause")
        await h.vt.sleep(15)  # 00:01:10: ETH skipped 00:01:02 and waits; BTC is running
        registry.command(registry.jobs[ETH], "cancel")
        await h.vt.sleep(3 * 60)

    await run_live(h, registry, script)
    assert registry.jobs[ETH].status == CANCELLED
    cycles = h.recorder.named("live_cycle_complete")
    assert [c["jobs"] for c in cycles[-3:]] == [1, 1, 1]
