"""The collector against a faithful Bybit v5, through the real CLI: what Bybit holds in the range
is what gets stored, exactly once, with pages answered from the oldest end of a window."""

from __future__ import annotations

import time

import pytest
from collector_support import (
    FROZEN_NOW_S,
    events_named,
    run_in_process,
    start_subprocess,
    stop,
    wait_for_event,
    write_config,
)
from fake_bybit import FakeBybit, ccxt_options
from fake_exchange import SymbolSpec, candle, expected_candles
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

MINUTE = 60_000
HOUR = 3_600_000
NOW_MS = int(FROZEN_NOW_S * 1000)  # 2024-03-01T00:00:30Z
START_MS = 1_709_078_400_000  # 2024-02-28T00:00:00Z
END_MS = START_MS + 36 * HOUR
BTC = SymbolSpec("BTC/USDT")
NEW = SymbolSpec(  # listed inside the range, then a maintenance gap longer than a page
    "NEW/USDT",
    listed_at_ms=START_MS + 10 * HOUR + 40_000,
    gaps=[(START_MS + 20 * HOUR, START_MS + 25 * HOUR + 30 * MINUTE)],
)
TIMEFRAMES = ["1m", "1h", "1d"]


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def stored(tmp_path, symbol: str, timeframe: str) -> list[dict]:
    return read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("bybit", symbol, timeframe))


def as_tuples(rows: list[dict]) -> list[tuple]:
    names = ("timestamp_ms", "open", "high", "low", "close", "volume")
    return [tuple(r[n] for n in names) for r in rows]


@pytest.fixture
def frozen_bybit():
    with FakeBybit([BTC, NEW], clock=lambda: FROZEN_NOW_S) as fake:
        yield fake


def history(capsys, config, start_ms: int, end_ms: int):
    return run_in_process(capsys, config, "--mode=history", f"--start={iso(start_ms)}",
                          f"--end={iso(end_ms)}")  # fmt: skip


def test_backfill_stores_exactly_what_bybit_holds_and_a_rerun_asks_nothing(
    frozen_bybit, tmp_path, capsys
):
    symbols = [BTC.symbol, NEW.symbol]
    config = write_config(
        tmp_path, frozen_bybit.base_url, symbols, TIMEFRAMES, exchange_id="bybit",
        ccxt=ccxt_options(frozen_bybit.base_url),
    )  # fmt: skip
    code, events = history(capsys, config, START_MS, END_MS)
    assert code == 0, events[-3:]
    for spec in (BTC, NEW):
        for timeframe in TIMEFRAMES:
            rows = stored(tmp_path, spec.symbol, timeframe)
            expected = expected_candles(spec, timeframe, START_MS, END_MS, NOW_MS)
            assert as_tuples(rows) == expected, (spec.symbol, timeframe)
            assert all(r["is_closed"] is not False for r in rows)
    frozen_bybit.reset_log()
    code, events = history(capsys, config, START_MS, END_MS)
    assert code == 0, events[-3:]
    # NEW has no daily candle in the range. The newest day closed 30 s before the first run,
    # when an empty answer could still mean "not published yet": only that day is asked again.
    [again] = frozen_bybit.candle_requests()
    assert (again.params["symbol"], again.params["interval"]) == ("NEWUSDT", "D")


def test_a_2500_minute_backfill_stores_all_2500_candles(frozen_bybit, tmp_path, capsys):
    """Wider than a page of 1,000: each page comes from its window's oldest end."""
    config = write_config(
        tmp_path, frozen_bybit.base_url, [BTC.symbol], ["1m"], exchange_id="bybit",
        ccxt=ccxt_options(frozen_bybit.base_url),
    )  # fmt: skip
    end = START_MS + 2500 * MINUTE
    code, events = history(capsys, config, START_MS, end)
    assert code == 0, events[-3:]
    rows = stored(tmp_path, BTC.symbol, "1m")
    assert as_tuples(rows) == expected_candles(BTC, "1m", START_MS, end, NOW_MS)
    assert len(frozen_bybit.candle_requests()) <= 4


class ShiftedClock:
    """Real time plus a shift the test can move (the world went on while we were down)."""

    def __init__(self, shift_s: float) -> None:
        self.shift_s = shift_s

    def __call__(self) -> float:
        return time.time() + self.shift_s


def test_live_stores_closed_candles_and_repairs_a_hole(tmp_path):
    clock = ShiftedClock(0)
    with FakeBybit([BTC], clock=clock) as fake:
        config = write_config(
            tmp_path, fake.base_url, [BTC.symbol], ["1m"], exchange_id="bybit",
            ccxt=ccxt_options(fake.base_url), live_initial_candles=10,
        )  # fmt: skip
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
        before = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
        assert len(before) >= 10
        clock.shift_s = 30 * 3600  # thirty hours pass while the daemon is down
        proc = start_subprocess(config, "--mode=live")
        try:
            _, seen = wait_for_event(proc, "live_cycle_complete", 60)
        finally:
            stop(proc)
    assert events_named(seen, "gap_repaired") or events_named(seen, "gap_detected")
    rows = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
    stamps = [r["timestamp_ms"] for r in rows]
    assert stamps == list(range(stamps[0], stamps[-1] + MINUTE, MINUTE)), "a hole or a duplicate"
    assert stamps[-1] >= before[-1]["timestamp_ms"] + 1800 * MINUTE
    assert as_tuples(rows) == [candle(BTC.symbol, "1m", t) for t in stamps]
