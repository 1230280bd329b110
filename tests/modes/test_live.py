"""Live mode on a virtual clock: boundaries, no overlap, closed superseding open, catch-up."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fake_exchange import SymbolSpec, candle, provisional_candle
from live_support import MIN, T0, Harness, assert_closed_minutes_exact, key

from tda_collector.modes.live import next_due_ms
from tda_collector.timeframes import EPOCH_WEEK_ORIGIN_MS, MONDAY_WEEK_ORIGIN_MS, grid_of


def test_next_due_is_the_next_close_or_refresh_plus_settle():
    at = 1_709_251_200_000  # 00:00:00
    m1, h1 = grid_of("1m"), grid_of("1h")
    assert next_due_ms(at + 30_000, m1, 60_000, 2_000) == at + 62_000
    assert next_due_ms(at + 61_999, m1, 60_000, 2_000) == at + 62_000
    assert next_due_ms(at + 62_000, m1, 60_000, 2_000) == at + 122_000  # strictly after now
    assert next_due_ms(at + 30_000, h1, 60_000, 2_000) == at + 62_000  # refresh tick
    assert next_due_ms(at + 30_000, m1, 15_000, 2_000) == at + 32_000
    assert next_due_ms(at + 3_599_000, h1, 600_000, 2_000) == at + 3_602_000  # the close


def at(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)


NEVER = 10**15  # a refresh interval that never comes first: only closes are due


@pytest.mark.parametrize(
    ("timeframe", "origin", "now", "close"),
    [
        # 1M: February 2024 (leap) closes on March 1st; December closes on New Year
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 2, 10), at(2024, 3, 1)),
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 3, 2), at(2024, 4, 1)),
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2023, 12, 31, 23, 59), at(2024, 1, 1)),
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2023, 2, 28, 12), at(2023, 3, 1)),
        # 1w on Monday and on the epoch's Thursday (Kraken); 2024-01-03 was a Wednesday
        ("1w", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 3), at(2024, 1, 8)),
        ("1w", EPOCH_WEEK_ORIGIN_MS, at(2024, 1, 3), at(2024, 1, 4)),
        ("3d", MONDAY_WEEK_ORIGIN_MS, at(2024, 3, 1), at(2024, 3, 3)),
    ],
)
def test_next_due_is_the_close_on_the_exchanges_calendar(timeframe, origin, now, close):
    grid = grid_of(timeframe, origin)
    assert next_due_ms(now, grid, NEVER, 2_000) == close + 2_000
    # within the settle delay after a close, that close is still the one due
    assert next_due_ms(close + 1_000, grid, NEVER, 2_000) == close + 2_000
    assert next_due_ms(close + 2_000, grid, NEVER, 2_000) == grid.next_open(close) + 2_000


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
    runs = live.registry.jobs["binance:BTC-USDT:1m:live"].record.runs
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
