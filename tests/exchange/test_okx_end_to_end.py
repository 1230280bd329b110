"""The collector against a faithful OKX, through the real CLI: what OKX holds in the range is
what gets stored, exactly once, whichever end OKX answers a page from."""

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
from fake_exchange import SymbolSpec, candle, expected_candles
from fake_okx import FakeOkx, ccxt_options
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

MINUTE = 60_000
HOUR = 3_600_000
NOW_MS = int(FROZEN_NOW_S * 1000)  # 2024-03-01T00:00:30Z; ccxt's own clock makes it "old"
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
    return read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("okx", symbol, timeframe))


def as_tuples(rows: list[dict]) -> list[tuple]:
    names = ("timestamp_ms", "open", "high", "low", "close", "volume")
    return [tuple(r[n] for n in names) for r in rows]


@pytest.fixture
def frozen_okx():
    with FakeOkx([BTC, NEW], clock=lambda: FROZEN_NOW_S) as fake:
        yield fake


def history(capsys, config, start_ms: int, end_ms: int):
    return run_in_process(capsys, config, "--mode=history", f"--start={iso(start_ms)}",
                          f"--end={iso(end_ms)}")  # fmt: skip


def test_backfill_stores_exactly_what_okx_holds_and_a_rerun_asks_nothing(
    frozen_okx, tmp_path, capsys
):
    symbols = [BTC.symbol, NEW.symbol]
    config = write_config(
        tmp_path, frozen_okx.base_url, symbols, TIMEFRAMES, exchange_id="okx",
        ccxt=ccxt_options(frozen_okx.base_url),
    )  # fmt: skip
    code, events = history(capsys, config, START_MS, END_MS)
    assert code == 0, events[-3:]
    for spec in (BTC, NEW):
        for timeframe in TIMEFRAMES:
            rows = stored(tmp_path, spec.symbol, timeframe)
            expected = expected_candles(spec, timeframe, START_MS, END_MS, NOW_MS)
            assert as_tuples(rows) == expected, (spec.symbol, timeframe)
            assert all(r["is_closed"] is not False for r in rows)
    frozen_okx.reset_log()
    code, events = history(capsys, config, START_MS, END_MS)
    assert code == 0, events[-3:]
    # NEW has no daily candle in the range. The newest day closed 30 s before the first run,
    # when an empty answer could still mean "not published yet": only that day is asked again.
    [again] = frozen_okx.candle_requests()
    assert (again.params["instId"], again.params["bar"]) == ("NEW-USDT", "1Dutc")


@pytest.mark.parametrize("history_cap", [300, 100])
def test_a_1000_minute_backfill_stores_all_1000_candles(tmp_path, capsys, history_cap):
    """Regression: the job's end passed as ccxt's `until` becomes OKX's `after`, and OKX
    answers the newest page of the window; the oldest 700 must not be marked covered."""
    with FakeOkx([BTC], clock=lambda: FROZEN_NOW_S, history_cap=history_cap) as fake:
        config = write_config(
            tmp_path, fake.base_url, [BTC.symbol], ["1m"], exchange_id="okx",
            ccxt=ccxt_options(fake.base_url),
        )  # fmt: skip
        end = START_MS + 1000 * MINUTE
        code, events = history(capsys, config, START_MS, end)
        assert code == 0, events[-3:]
        paths = {r.path for r in fake.candle_requests()}
    rows = stored(tmp_path, BTC.symbol, "1m")
    assert len(rows) == 1000
    assert as_tuples(rows) == expected_candles(BTC, "1m", START_MS, end, NOW_MS)
    assert paths == {"/api/v5/market/history-candles"}


class ShiftedClock:
    """Real time plus a shift the test can move; ccxt picks OKX's endpoint by its own clock."""

    def __init__(self, shift_s: float) -> None:
        self.shift_s = shift_s

    def __call__(self) -> float:
        return time.time() + self.shift_s


def test_live_stores_closed_candles_and_repairs_a_hole_deeper_than_1440(tmp_path):
    """Down for 26 hours: the hole reaches past the newest 1,440 minutes that /candles serves,
    so its oldest part must come from history-candles."""
    clock = ShiftedClock(-26 * 3600)
    with FakeOkx([BTC], clock=clock) as fake:
        config = write_config(
            tmp_path, fake.base_url, [BTC.symbol], ["1m"], exchange_id="okx",
            ccxt=ccxt_options(fake.base_url), live_initial_candles=10,
        )  # fmt: skip
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
        before = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
        assert len(before) >= 10
        clock.shift_s = 0
        proc = start_subprocess(config, "--mode=live")
        try:
            _, seen = wait_for_event(proc, "live_cycle_complete", 60)
        finally:
            stop(proc)
        paths = {r.path for r in fake.candle_requests()}
    assert events_named(seen, "gap_repaired") or events_named(seen, "gap_detected")
    rows = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
    stamps = [r["timestamp_ms"] for r in rows]
    assert stamps == list(range(stamps[0], stamps[-1] + MINUTE, MINUTE)), "a hole or a duplicate"
    assert stamps[-1] >= before[-1]["timestamp_ms"] + 1500 * MINUTE
    assert as_tuples(rows) == [candle(BTC.symbol, "1m", t) for t in stamps]
    assert "/api/v5/market/history-candles" in paths
