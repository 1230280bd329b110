"""Live mode on a virtual clock: boundaries, no overlap, closed superseding open, catch-up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fake_exchange import SymbolSpec, candle, provisional_candle
from memory_source import MemorySource
from memory_store import MemoryStore
from tda_collector.events import EventLog, record_fields
from tda_collector.fetcher import Fetcher
from tda_collector.live import LiveExchange, LiveJob, LiveSettings, next_due_ms
from tda_collector.metrics import Metrics
from tda_collector.models import JobKey
from tda_collector.persist import DurableWriter
from tda_collector.ratelimit import RateLimiter
from tda_collector.retry import RetryPolicy
from tda_collector.state import StateStore
from virtual_time import VirtualTime

MIN = 60_000
T0 = 1_709_251_200.0 + 30  # 2024-03-01T00:00:30Z


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record_fields(record))

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e["event"] == name]


class TrackedState:
    """The SQLite state store, with its thread work kept inside virtual time."""

    def __init__(self, inner: StateStore, vt: VirtualTime) -> None:
        self._inner, self._vt = inner, vt

    async def add_coverage(self, *args):
        return await self._vt.track(self._inner.add_coverage(*args))

    async def coverage(self, *args):
        return await self._vt.track(self._inner.coverage(*args))


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
        self.recorder = Recorder()
        logger = logging.getLogger(f"test.live.{id(self)}")
        logger.addHandler(self.recorder)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
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
        policy = RetryPolicy(base_s=1, cap_s=4, attempts=3)
        limiter = RateLimiter(self.rate, 1, clock=self.vt.clock, sleep=self.vt.sleep)
        fetcher = Fetcher(
            self.source, limiter, policy, self.events, clock=self.vt.clock, sleep=self.vt.sleep
        )
        writer = DurableWriter(
            self.store, policy, self.events, sleep=self.vt.sleep, indicators=indicators
        )
        return LiveExchange(
            fetcher, writer, state, self.events, self.settings, self.metrics, sleep=self.vt.sleep
        )

    async def run_for(self, seconds: float, keys: list[JobKey], indicators=None) -> LiveExchange:
        """Start live mode with cursors read back from the store, run, then stop it."""
        state = StateStore(str(self.tmp_path / "state.sqlite"))
        await state.open()
        if indicators is not None:
            await self.vt.track(indicators.load(keys, await self.store.newest(keys)))
        live = self.live(TrackedState(state, self.vt), indicators)
        cursors = await self.store.newest(keys)
        jobs = [
            LiveJob(k, 60_000 if k.timeframe == "1m" else 3_600_000, cursors.get(k)) for k in keys
        ]

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


def test_next_due_is_the_next_close_or_refresh_plus_settle():
    at = 1_709_251_200_000  # 00:00:00
    assert next_due_ms(at + 30_000, MIN, 60_000, 2_000) == at + 62_000
    assert next_due_ms(at + 61_999, MIN, 60_000, 2_000) == at + 62_000
    assert next_due_ms(at + 62_000, MIN, 60_000, 2_000) == at + 122_000  # strictly after now
    assert next_due_ms(at + 30_000, 3_600_000, 60_000, 2_000) == at + 62_000  # refresh tick
    assert next_due_ms(at + 30_000, MIN, 15_000, 2_000) == at + 32_000
    assert next_due_ms(at + 3_599_000, 3_600_000, 600_000, 2_000) == at + 3_602_000  # the close


async def test_every_closed_minute_is_stored_and_the_open_candle_superseded(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")])
    keys = [key("BTC/USDT"), key("ETH/USDT")]
    await h.run_for(10 * 60 + 1, keys)  # until 00:10:31
    start_boundary = int(T0 * 1000) - 30_000
    for symbol in ("BTC/USDT", "ETH/USDT"):
        # 5 initial candles before 00:00, then 00:00 .. 00:09 closed as they closed.
        assert_closed_minutes_exact(
            h.store, symbol, start_boundary - 5 * MIN, start_boundary + 9 * MIN
        )
        open_rows = [r for r in h.store.series_rows(key(symbol)) if not r[6]]
        assert len(open_rows) == 1 and open_rows[0][0] == start_boundary + 10 * MIN
        assert open_rows[0][:6] != candle(symbol, "1m", start_boundary + 10 * MIN)
    cycles = h.recorder.named("live_cycle_complete")
    assert len(cycles) >= 10 and all(c["jobs"] == 2 for c in cycles)
    assert max(c["lag_s"] for c in cycles[1:]) < 5  # each close stored within seconds


async def test_refresh_updates_the_open_candle_between_closes(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT")], refresh_s=15)
    await h.run_for(20, [key("BTC/USDT")])  # runs at :30 (start), :32, :47
    open_ms = int(T0 * 1000) - 30_000
    row = h.store.rows[(key("BTC/USDT"), open_ms)]
    assert not row[6]
    assert row[:6] == provisional_candle("BTC/USDT", "1m", open_ms, int((T0 + 17) * 1000))


async def test_runs_of_a_job_never_overlap_or_pile_up(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT")], latency_s=150)  # slower than the interval
    live = await h.run_for(20 * 60, [key("BTC/USDT")])
    assert h.source.max_in_flight_per_job == 1
    runs = live.jobs[key("BTC/USDT")].runs
    assert 6 <= runs <= 20 * 60 / 150 + 1


async def test_catch_up_after_three_hours_of_exchange_downtime(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT")], page_size=50)
    k = key("BTC/USDT")
    await h.run_for(5 * 60, [k])
    h.source.down = True
    await h.run_for(3 * 3600, [k])
    h.source.down = False
    await h.run_for(3 * 60, [k])
    start_boundary = int(T0 * 1000) - 30_000
    now_boundary = int(h.vt.now * 1000) // MIN * MIN
    assert_closed_minutes_exact(h.store, "BTC/USDT", start_boundary - 5 * MIN, now_boundary - MIN)
    assert h.recorder.named("gap_repaired")
    assert h.recorder.named("job_error")


async def test_restart_after_three_hours_leaves_no_hole(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT"), SymbolSpec("ETH/USDT")], page_size=100)
    keys = [key("BTC/USDT"), key("ETH/USDT")]
    await h.run_for(3 * 60, keys)
    h.vt.now += 3 * 3600  # the daemon was down
    await h.run_for(60, keys)
    start_boundary = int(T0 * 1000) - 30_000
    now_boundary = int(h.vt.now * 1000) // MIN * MIN
    for symbol in ("BTC/USDT", "ETH/USDT"):
        assert_closed_minutes_exact(h.store, symbol, start_boundary - 5 * MIN, now_boundary - MIN)


async def test_exchange_holes_are_recorded_once_and_not_refetched(tmp_path):
    hole = (int(T0 * 1000) + 90_000, int(T0 * 1000) + 210_000)  # 00:02 and 00:03 missing
    h = Harness(tmp_path, [SymbolSpec("GAP/USDT", gaps=[hole])])
    await h.run_for(10 * 60, [key("GAP/USDT")])
    gaps = h.recorder.named("gap_detected")
    assert len(gaps) == 1 and gaps[0]["rows"] == 2
    after_hole = [c for c in h.source.calls if c[0] * 1000 > hole[1] + 2 * MIN]
    assert after_hole and all(since >= hole[1] for _, _, _, since, _ in after_hole)


async def test_a_cycle_bigger_than_the_budget_is_spread_not_rejected(tmp_path):
    specs = [SymbolSpec(f"S{i:03d}/USDT") for i in range(120)]
    h = Harness(tmp_path, specs, rate=10 * 0.9, concurrency=32)  # budget 10/s, safety 0.9
    await h.run_for(3 * 60, [key(s.symbol) for s in specs])
    starts = sorted(c[0] for c in h.source.calls)
    worst = max(sum(1 for s in starts if a <= s < a + 1.0) for a in starts)
    assert worst <= 10
    cycles = h.recorder.named("live_cycle_complete")
    assert all(c["jobs"] == 120 for c in cycles)
    assert max(c["duration_ms"] for c in cycles) >= 13_000  # 120 requests at 9/s, reported


async def test_store_faults_are_retried_and_lose_nothing(tmp_path):
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT")])
    h.store.fail_next_writes = 2
    await h.run_for(3 * 60, [key("BTC/USDT")])
    start_boundary = int(T0 * 1000) - 30_000
    assert_closed_minutes_exact(
        h.store, "BTC/USDT", start_boundary - 5 * MIN, start_boundary + 2 * MIN
    )
    assert len(h.recorder.named("store_write_error")) == 2
