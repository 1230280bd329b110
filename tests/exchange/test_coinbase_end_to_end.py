"""The collector against the fake Coinbase Advanced Trade, through the real CLI: history pages
through 300-candle windows (Coinbase rejects a window of more than 350, ccxt keeps 300 of an
answer) and stores exactly what Coinbase holds, never the open candle it answers first; live
mode repairs a hole."""

from __future__ import annotations

import time
from datetime import UTC, datetime

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
from fake_coinbase import FakeCoinbase, ccxt_options
from fake_exchange import SymbolSpec, candle, expected_candles
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
NOW_MS = int(FROZEN_NOW_S * 1000)  # 2024-03-01T00:00:30Z, 30 s into a minute
T = NOW_MS - NOW_MS % MIN  # the open minute
BTC = SymbolSpec("BTC/USD")
SOL = SymbolSpec(
    "SOL/USD", listed_at_ms=T - 8 * HOUR + 40_000, gaps=[(T - 5 * HOUR - 30_000, T - 4 * HOUR)]
)
SPECS = {spec.symbol: spec for spec in (BTC, SOL)}


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def coinbase():
    with FakeCoinbase(list(SPECS.values()), clock=lambda: FROZEN_NOW_S) as fx:
        yield fx


def config_for(tmp_path, fx, timeframes, **settings):
    return write_config(
        tmp_path,
        fx.base_url,
        list(SPECS),
        timeframes,
        exchange_id="coinbase",
        ccxt=ccxt_options(fx.base_url),
        **settings,
    )


def stored(tmp_path, symbol, timeframe):
    return read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("coinbase", symbol, timeframe))


def as_candles(rows):
    return [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in rows
    ]


def assert_exactly(tmp_path, spec, timeframe, start_ms, end_ms):
    rows = stored(tmp_path, spec.symbol, timeframe)
    assert as_candles(rows) == expected_candles(spec, timeframe, start_ms, end_ms, NOW_MS)
    assert all(r["is_closed"] for r in rows)  # the open candle Coinbase sends is not stored


def test_history_stores_exactly_the_closed_candles_and_a_rerun_asks_nothing(
    coinbase, tmp_path, capsys
):
    start = T - 10 * HOUR  # 600 minutes: two pages and more
    config = config_for(tmp_path, coinbase, ["1m", "1h"])
    code, events = run_in_process(capsys, config, "--mode=history", f"--start={iso(start)}")
    assert code == 0, events[-3:]
    for spec in SPECS.values():
        for timeframe in ("1m", "1h"):
            assert_exactly(tmp_path, spec, timeframe, start, NOW_MS)
    assert not events_named(events, "history_unavailable")

    coinbase.reset_log()
    code, _ = run_in_process(capsys, config, "--mode=history", f"--start={iso(start)}")
    assert code == 0
    assert coinbase.candle_requests() == []


def test_daily_history_from_before_the_listing(coinbase, tmp_path, capsys):
    start, end = T - 600 * DAY, T - DAY  # BTC/USD lists 2023-01-01: 425 days, two pages
    config = config_for(tmp_path, coinbase, ["1d"])
    code, events = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(start)}", f"--end={iso(end)}"
    )
    assert code == 0, events[-3:]
    assert_exactly(tmp_path, BTC, "1d", start, end)
    assert stored(tmp_path, BTC.symbol, "1d")[0]["timestamp_ms"] == BTC.listed_at_ms


def test_history_reaches_back_to_the_listing_with_nothing_unavailable(coinbase, tmp_path, capsys):
    start, end = BTC.listed_at_ms - DAY, BTC.listed_at_ms + 2 * DAY  # 14 months ago
    config = config_for(tmp_path, coinbase, ["1m"])
    code, events = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(start)}", f"--end={iso(end)}"
    )
    assert code == 0, events[-3:]
    assert_exactly(tmp_path, BTC, "1m", start, end)  # 2,880 minutes: ten pages
    assert not events_named(events, "history_unavailable")
    assert all(r.status == 200 for r in coinbase.candle_requests())


class ShiftedClock:
    """Real time plus a shift the test moves (the world went on while the daemon was down)."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift_s


def test_live_stores_closed_candles_and_repairs_the_hole_after_downtime(tmp_path):
    clock = ShiftedClock()
    with FakeCoinbase([BTC], clock=clock) as fx:
        config = write_config(
            tmp_path,
            fx.base_url,
            [BTC.symbol],
            ["1m"],
            exchange_id="coinbase",
            ccxt=ccxt_options(fx.base_url),
            live_initial_candles=10,
        )
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
        before = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
        clock.shift_s += 6 * 3600  # six hours (360 minutes: more than a page) pass while down
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
    rows = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
    assert len(before) >= 10
    assert rows[-1]["timestamp_ms"] >= before[-1]["timestamp_ms"] + 360 * MIN
    stamps = [r["timestamp_ms"] for r in rows]
    assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), "a hole or a duplicate"
    assert as_candles(rows) == [candle(BTC.symbol, "1m", t) for t in stamps]
    assert all(r.status == 200 for r in fx.candle_requests())  # no window over 350
