"""Live mode as users run it: a process, real ccxt over HTTP, SIGTERM, restarts, real time."""

from __future__ import annotations

import time
from datetime import UTC

import pytest
from collector_support import free_port, start_subprocess, stop, wait_for_event
from fake_exchange import SymbolSpec, candle
from store_support import read_duckdb_rows

from tda_collector.models import JobKey

MIN = 60_000
SYMBOLS = ["BTC/USDT", "ETH/USDT", "SOL/USDT"]


class ShiftedClock:
    """Real time plus a shift the test can move (the world went on while we were down)."""

    def __init__(self) -> None:
        self.shift_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.shift_s


def stored_closed(tmp_path, symbol):
    rows = read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("binance", symbol, "1m"))
    return [r for r in rows if r["is_closed"]]


def assert_no_hole_and_exact(rows, symbol):
    stamps = [r["timestamp_ms"] for r in rows]
    assert stamps == list(range(stamps[0], stamps[-1] + MIN, MIN)), "a hole or a duplicate"
    for r in rows:
        expected = candle(symbol, "1m", r["timestamp_ms"])
        assert (
            r["timestamp_ms"],
            r["open"],
            r["high"],
            r["low"],
            r["close"],
            r["volume"],
        ) == expected


def test_sigterm_stops_within_a_second_with_state_saved(exchange_rig, tmp_path):
    rig = exchange_rig([SymbolSpec(s) for s in SYMBOLS], clock=time.time)
    config = rig.config(live_initial_candles=30)
    proc = start_subprocess(config, "--mode=live")
    wait_for_event(proc, "live_cycle_complete", 60)
    elapsed, events = stop(proc)
    assert proc.returncode == 0
    assert elapsed < 1.0 + 0.3  # the 1 s budget, plus process teardown measured from outside
    assert events[-1]["event"] == "shutdown"
    for symbol in SYMBOLS:
        assert len(stored_closed(tmp_path, symbol)) >= 30


def test_restart_after_downtime_fills_the_hole_without_duplicates(exchange_rig, tmp_path):
    clock = ShiftedClock()
    rig = exchange_rig([SymbolSpec(s) for s in SYMBOLS], clock=clock)
    config = rig.config(live_initial_candles=10, page_limit=50)
    proc = start_subprocess(config, "--mode=live")
    wait_for_event(proc, "live_cycle_complete", 60)
    stop(proc)
    before = {s: stored_closed(tmp_path, s)[-1]["timestamp_ms"] for s in SYMBOLS}
    clock.shift_s += 3 * 3600  # three hours pass while the daemon is down
    proc = start_subprocess(config, "--mode=live")
    _, seen = wait_for_event(proc, "live_cycle_complete", 60)
    stop(proc)
    assert any(e["event"] == "gap_repaired" for e in seen)
    for symbol in SYMBOLS:
        rows = stored_closed(tmp_path, symbol)
        assert rows[-1]["timestamp_ms"] >= before[symbol] + 180 * MIN
        assert_no_hole_and_exact(rows, symbol)


@pytest.mark.slow
def test_every_closed_minute_is_stored_within_seconds_of_its_close_in_real_time(
    exchange_rig, tmp_path
):
    rig = exchange_rig([SymbolSpec(s) for s in SYMBOLS], clock=time.time)
    config = rig.config(live_initial_candles=3)
    proc = start_subprocess(config, "--mode=live")
    started_ms = int(time.time() * 1000)
    first_close = (started_ms // MIN + 1) * MIN
    # Wait until two closes have passed, plus the settle delay and a margin.
    time.sleep(max(0.0, (first_close + MIN + 6_000 - time.time() * 1000) / 1000))
    _, events = stop(proc)
    for symbol in SYMBOLS:
        rows = stored_closed(tmp_path, symbol)
        assert_no_hole_and_exact(rows, symbol)
        for closed_open in (first_close - MIN, first_close):  # the minutes that closed meanwhile
            row = next(r for r in rows if r["timestamp_ms"] == closed_open)
            ingested_ms = row["ingested_at"].replace(tzinfo=UTC).timestamp() * 1000
            stored_after_close_s = (ingested_ms - (closed_open + MIN)) / 1000
            assert 0 <= stored_after_close_s < 5, (symbol, stored_after_close_s)
    assert any(e["event"] == "live_cycle_complete" for e in events)


def test_an_exchange_down_at_boot_is_waited_for_not_fatal(exchange_rig):
    port = free_port()
    rig = exchange_rig([SymbolSpec(s) for s in SYMBOLS], started=False, clock=time.time, port=port)
    config = rig.config()
    proc = start_subprocess(config, "--mode=live")
    try:
        retry, _ = wait_for_event(proc, "backoff_retry", 30)
        assert retry["exchange"] == "binance" and retry["attempt"] >= 1
        rig.fake.start()
        wait_for_event(proc, "live_cycle_complete", 60)
    finally:
        _, events = stop(proc)
    assert proc.returncode == 0 and events[-1]["event"] == "shutdown"
