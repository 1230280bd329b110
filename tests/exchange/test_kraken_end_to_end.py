"""The collector against the fake Kraken, through the real CLI: history stores exactly what
Kraken holds within its depth (the newest 720 intervals), never the open candle, and live
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
from fake_exchange import SymbolSpec, candle, expected_candles
from fake_kraken import FakeKraken, ccxt_options
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
def kraken():
    with FakeKraken(list(SPECS.values()), clock=lambda: FROZEN_NOW_S) as fx:
        yield fx


def config_for(tmp_path, fx, timeframes, **settings):
    return write_config(
        tmp_path,
        fx.base_url,
        list(SPECS),
        timeframes,
        exchange_id="kraken",
        ccxt=ccxt_options(fx.base_url),
        **settings,
    )


def stored(tmp_path, symbol, timeframe):
    return read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("kraken", symbol, timeframe))


def as_candles(rows):
    return [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in rows
    ]


def assert_exactly(tmp_path, spec, timeframe, start_ms, end_ms):
    rows = stored(tmp_path, spec.symbol, timeframe)
    assert as_candles(rows) == expected_candles(spec, timeframe, start_ms, end_ms, NOW_MS)
    assert all(r["is_closed"] for r in rows)  # the open candle Kraken sends is not stored


def test_history_stores_exactly_the_closed_candles_and_a_rerun_asks_nothing(
    kraken, tmp_path, capsys
):
    start = T - 10 * HOUR  # within 720 minutes: Kraken still serves every one of them
    config = config_for(tmp_path, kraken, ["1m", "1h"])
    code, events = run_in_process(capsys, config, "--mode=history", f"--start={iso(start)}")
    assert code == 0, events[-3:]
    for spec in SPECS.values():
        for timeframe in ("1m", "1h"):
            assert_exactly(tmp_path, spec, timeframe, start, NOW_MS)
    assert not events_named(events, "history_unavailable")

    kraken.reset_log()
    code, _ = run_in_process(capsys, config, "--mode=history", f"--start={iso(start)}")
    assert code == 0
    assert kraken.candle_requests() == []


def test_daily_history_from_before_the_listing(kraken, tmp_path, capsys):
    start, end = T - 600 * DAY, T - DAY  # BTC/USD lists 2023-01-01, within 720 days
    config = config_for(tmp_path, kraken, ["1d"])
    code, events = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(start)}", f"--end={iso(end)}"
    )
    assert code == 0, events[-3:]
    assert_exactly(tmp_path, BTC, "1d", start, end)
    assert stored(tmp_path, BTC.symbol, "1d")[0]["timestamp_ms"] == BTC.listed_at_ms


def test_history_beyond_720_candles_stores_what_kraken_serves_and_says_the_rest_is_unavailable(
    kraken, tmp_path, capsys
):
    start, end = T - 14 * HOUR, T - HOUR
    earliest = T - 719 * MIN  # the newest 720 minutes, the open one included
    config = config_for(tmp_path, kraken, ["1m"])
    _, events = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(start)}", f"--end={iso(end)}"
    )
    assert_exactly(tmp_path, BTC, "1m", earliest, end)
    unavailable = events_named(events, "history_unavailable")
    assert {e["symbol"] for e in unavailable} == set(SPECS), events[-3:]
    assert all(e["earliest_ms"] == earliest for e in unavailable)
    # Nothing pretends the unreachable part is covered: a rerun says so again, stores nothing new.
    _, events = run_in_process(
        capsys, config, "--mode=history", f"--start={iso(start)}", f"--end={iso(end)}"
    )
    assert {e["symbol"] for e in events_named(events, "history_unavailable")} == set(SPECS)
    assert_exactly(tmp_path, BTC, "1m", earliest, end)


class ShiftedClock:
    """Real time plus a shift the test moves (the world went on while the daemon was down)."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift_s


def test_live_stores_closed_candles_and_repairs_the_hole_after_downtime(tmp_path):
    clock = ShiftedClock()
    with FakeKraken([BTC], clock=clock) as fx:
        config = write_config(
            tmp_path,
            fx.base_url,
            [BTC.symbol],
            ["1m"],
            exchange_id="kraken",
            ccxt=ccxt_options(fx.base_url),
            live_initial_candles=10,
        )
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
        before = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
        clock.shift_s += 3 * 3600  # three hours pass while the daemon is down
        proc = start_subprocess(config, "--mode=live")
        wait_for_event(proc, "live_cycle_complete", 60)
        stop(proc)
    rows = [r for r in stored(tmp_path, BTC.symbol, "1m") if r["is_closed"]]
    assert len(before) >= 10
    assert rows[-1]["timestamp_ms"] >= before[-1]["timestamp_ms"] + 180 * MIN
    stamps = [r["timestamp_ms"] for r in rows]
    assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), "a hole or a duplicate"
    assert as_candles(rows) == [candle(BTC.symbol, "1m", t) for t in stamps]
