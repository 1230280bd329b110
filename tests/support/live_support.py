"""The live-mode harness on a virtual clock: memory source and store, SQLite state, recorder."""

from __future__ import annotations

import asyncio

import pytest
from event_support import recording_logger
from fake_exchange import candle
from memory_source import MemorySource
from memory_store import MemoryStore
from pipeline_support import wire
from virtual_time import VirtualTime

from tda_collector.jobs.ledger import SqliteState
from tda_collector.models import JobKey
from tda_collector.modes.live import LiveExchange, LiveJob, LiveSettings
from tda_collector.observability.events import EventLog
from tda_collector.observability.metrics import Metrics
from tda_collector.retry import RetryPolicy
from tda_collector.timeframes import grid_of

MIN = 60_000
T0 = 1_709_251_200.0 + 30  # 2024-03-01T00:00:30Z


class TrackedState:
    """The SQLite state store, with its thread work kept inside virtual time (the calls
    that live mode and the indicator stage make)."""

    def __init__(self, inner: SqliteState, vt: VirtualTime) -> None:
        self._inner, self._vt = inner, vt

    async def add_coverage(self, *args):
        return await self._vt.track(self._inner.add_coverage(*args))

    async def coverage(self, *args):
        return await self._vt.track(self._inner.coverage(*args))

    async def load_indicator_series(self, key=None):
        return await self._vt.track(self._inner.load_indicator_series(key))

    async def save_indicator_series(self, *args):
        return await self._vt.track(self._inner.save_indicator_series(*args))


class Harness:
    def __init__(
        self,
        tmp_path,
        specs,
        *,
        latency_s=0.0,
        rate=1000.0,
        page_size=1000,
        refresh_s=60,
        initial_candles=5,
        concurrency=16,
    ):
        self.vt = VirtualTime(T0)
        self.source = MemorySource(specs, self.vt.clock, self.vt.sleep, latency_s, page_size)
        self.store = MemoryStore()
        logger, self.recorder = recording_logger("test.live")
        self.events = EventLog(logger, {"exchange": "binance"})
        self.tmp_path = tmp_path
        self.metrics = Metrics(clock=self.vt.clock)
        self.rate = rate
        self.settings = LiveSettings(
            refresh_ms=refresh_s * 1000,
            settle_ms=2000,
            page_limit=page_size,
            initial_candles=initial_candles,
            concurrency=concurrency,
        )

    def live(self, state, indicators=None) -> LiveExchange:
        pipeline = wire(
            self.source,
            self.store,
            self.events,
            policy=RetryPolicy(base_s=1, cap_s=4, attempts=3),
            rate_per_s=self.rate,
            burst=1,
            clock=self.vt.clock,
            sleep=self.vt.sleep,
            indicators=indicators,
        )
        return LiveExchange(
            pipeline.fetcher,
            pipeline.writer,
            state,
            self.events,
            self.settings,
            self.metrics,
            sleep=self.vt.sleep,
        )

    async def run_for(self, seconds: float, keys: list[JobKey], indicators=None) -> LiveExchange:
        """Start live mode with cursors read back from the store, run, then stop it."""
        state = SqliteState(str(self.tmp_path / "state.sqlite"))
        await state.open()
        if indicators is not None:
            await self.vt.track(indicators.load(keys, await self.store.newest(keys)))
        live = self.live(TrackedState(state, self.vt), indicators)
        cursors = await self.store.newest(keys)
        jobs = [LiveJob(k, grid_of(k.timeframe), cursors.get(k)) for k in keys]

        async def scenario():
            task = asyncio.ensure_future(live.run(jobs))
            await self.vt.sleep(seconds)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        await self.vt.run(scenario())
        await state.close()
        return live


def key(symbol, tf="1m"):
    return JobKey("binance", symbol, tf)


def assert_closed_minutes_exact(store, symbol, first_ms, last_ms):
    rows = [r for r in store.series_rows(key(symbol)) if r[6]]
    expected = [candle(symbol, "1m", t) for t in range(first_ms, last_ms + 1, MIN)]
    assert [r[:6] for r in rows] == expected
