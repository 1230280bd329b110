"""Binance USDⓈ-M futures as users run it: the real CLI and real ccxt against the fake fapi
(perpetuals `BTC/USDT:USDT`, klines oldest first from startTime, ccxt's 1,000 a request)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from collector_support import (
    run_in_process,
    start_subprocess,
    stop,
    wait_for_event,
    write_config,
)
from fake_binanceusdm import FakeBinanceUsdm, ccxt_options
from fake_exchange import SymbolSpec, candle, expected_candles
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

EXCHANGE = "binanceusdm"
MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z
NOW_MS = T0 + 30_500  # the exchange's clock: 30.5 s into a minute
START = T0 - 3 * DAY + 30 * MINUTE  # not on an hour or day boundary
END = T0 + DAY  # past the exchange's now: the candles in progress lie inside the range
BTC = SymbolSpec("BTC/USDT")
# Listed inside the range; a maintenance gap longer than a 1m page (1,800 minutes > 1,000).
NEW = SymbolSpec(
    "NEW/USDT", listed_at_ms=T0 - 2 * DAY + 40_000, gaps=[(T0 - 40 * HOUR, T0 - 10 * HOUR)]
)
TIMEFRAMES = ["1m", "1h", "1d"]
PERP = {BTC: "BTC/USDT:USDT", NEW: "NEW/USDT:USDT"}  # ccxt's symbols of the fake's contracts


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stored(tmp_path, symbol: str, timeframe: str) -> list[dict]:
    return read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey(EXCHANGE, symbol, timeframe))


def values(rows: list[dict]) -> list[tuple]:
    return [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in rows
    ]


@pytest.fixture
def fake():
    with FakeBinanceUsdm([BTC, NEW], clock=lambda: NOW_MS / 1000) as fx:
        yield fx


def config_for(tmp_path, fake, symbols, timeframes, *, page_limit=1000, **settings):
    return write_config(
        tmp_path,
        fake.base_url,
        symbols,
        timeframes,
        exchange_id=EXCHANGE,
        ccxt=ccxt_options(fake.base_url),
        page_limit=page_limit,
        **settings,
    )


def test_history_stores_exactly_the_closed_candles_of_the_range(fake, tmp_path, capsys):
    config = config_for(tmp_path, fake, [PERP[BTC], PERP[NEW]], TIMEFRAMES)
    code, events = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(START)}", f"--end={iso(END)}"
    )
    assert code == 0, events[-3:]
    for spec in (BTC, NEW):
        for timeframe in TIMEFRAMES:
            rows = stored(tmp_path, PERP[spec], timeframe)
            expected = expected_candles(spec, timeframe, START, END, NOW_MS)
            assert values(rows) == expected, (PERP[spec], timeframe)
            assert all(r["is_closed"] is not False for r in rows)


def test_a_rerun_of_a_finished_range_sends_no_candle_request(fake, tmp_path, capsys):
    config = config_for(tmp_path, fake, [PERP[BTC], PERP[NEW]], ["1h"])
    args = ("--mode=history", f"--start={iso(START)}", f"--end={iso(END)}")
    code, events = run_in_process(capsys, config, *args)
    assert code == 0, events[-3:]
    assert fake.candle_requests()
    fake.reset_log()
    code, events = run_in_process(capsys, config, *args)
    assert code == 0, events[-3:]
    assert fake.candle_requests() == []


class ShiftedClock:
    """Real time plus a shift the test can move (the world went on while we were down)."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift_s


def test_live_stores_closed_candles_and_repairs_the_hole_of_a_downtime(tmp_path):
    clock = ShiftedClock()
    with FakeBinanceUsdm([BTC], clock=clock) as fake:
        # Pages of 50: the three hours missed take several pages, which live mode reports.
        config = config_for(
            tmp_path, fake, [PERP[BTC]], ["1m"], live_initial_candles=10, page_limit=50
        )
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
        before = [r for r in stored(tmp_path, PERP[BTC], "1m") if r["is_closed"]]
        assert len(before) >= 10
        clock.shift_s += 3 * 3600  # three hours pass while the collector is down
        proc = start_subprocess(config, "--mode=live")
        _, seen = wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
    assert any(e["event"] == "gap_repaired" for e in seen)
    rows = [r for r in stored(tmp_path, PERP[BTC], "1m") if r["is_closed"]]
    stamps = [r["timestamp_ms"] for r in rows]
    assert stamps == list(range(stamps[0], stamps[-1] + MINUTE, MINUTE)), "a hole or a duplicate"
    assert stamps[-1] >= before[-1]["timestamp_ms"] + 180 * MINUTE
    assert values(rows) == [candle(BTC.symbol, "1m", t) for t in stamps]
