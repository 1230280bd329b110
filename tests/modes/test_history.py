"""History mode end to end: real ccxt over HTTP to the fake exchange, into a DuckDB file."""

from __future__ import annotations

import math
import signal
import time
from collections import Counter

import pytest
from collector_support import (
    DAY_MS,
    FROZEN_NOW_S,
    events_named,
    parse_events,
    run_in_process,
    start_subprocess,
)
from fake_exchange import SymbolSpec, expected_candles
from store_support import read_duckdb_rows

from tda_collector.models import JobKey
from tda_collector.store.duckdb_store import DuckDBStore

NOW_MS = int(FROZEN_NOW_S * 1000)
START_MS = NOW_MS - NOW_MS % DAY_MS - 2 * DAY_MS  # 2024-02-28T00:00Z
END_MS = START_MS + 2 * DAY_MS
MIN = 60_000
START, END = "2024-02-28", "2024-03-01"

SPECS = [
    SymbolSpec("BTC/USDT"),
    # Listed half-way through the range: the run must not fetch before it forever or stop early.
    SymbolSpec("LATE/USDT", listed_at_ms=START_MS + DAY_MS + 7 * MIN),
    # Two maintenance holes, one longer than a page.
    SymbolSpec(
        "GAP/USDT",
        gaps=[
            (START_MS + 100 * MIN, START_MS + 130 * MIN),
            (START_MS + 600 * MIN, START_MS + 2100 * MIN),
        ],
    ),
]
SYMBOLS = [s.symbol for s in SPECS]
TIMEFRAMES = ["1m", "1h"]


@pytest.fixture
def rig(exchange_rig):
    return exchange_rig(SPECS)


def expected(spec: SymbolSpec, timeframe: str, start=START_MS, end=END_MS):
    return expected_candles(spec, timeframe, start, end, NOW_MS)


def assert_store_holds_exactly(db_path, start=START_MS, end=END_MS):
    for spec in SPECS:
        for tf in TIMEFRAMES:
            rows = read_duckdb_rows(str(db_path), JobKey("binance", spec.symbol, tf))
            got = [
                (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
                for r in rows
            ]
            assert got == expected(spec, tf, start, end), f"{spec.symbol} {tf}"
            assert all(r["is_closed"] for r in rows)


def test_backfill_stores_exactly_the_exchanges_candles(rig, tmp_path, capsys):
    config = rig.config(SYMBOLS, TIMEFRAMES, page_limit=500)
    code, events = run_in_process(
        capsys, config, "--mode=history", f"--start={START}", f"--end={END}"
    )
    assert code == 0
    assert_store_holds_exactly(tmp_path / "ohlcv.duckdb")
    summary = events_named(events, "history_complete")[-1]
    expected_rows = sum(len(expected(s, tf)) for s in SPECS for tf in TIMEFRAMES)
    assert summary["rows"] == expected_rows
    assert summary["failed"] == 0 and summary["jobs"] == 6
    # 1m BTC: 2,880 candles in pages of 500 -> 6 requests, not one per candle or a loop.
    assert len(rig.fake.klines_requests("BTC/USDT")) == math.ceil(2880 / 500) + 1
    for event in events:
        assert {"ts", "level", "event", "message", "service_name", "environment", "mode"} <= set(
            event
        )


def test_rerun_of_a_completed_range_sends_zero_candle_requests(rig, tmp_path, capsys):
    config = rig.config(SYMBOLS, TIMEFRAMES)
    args = ("--mode=history", f"--start={START}", f"--end={END}")
    assert run_in_process(capsys, config, *args)[0] == 0
    rig.fake.reset_log()
    code, events = run_in_process(capsys, config, *args)
    assert code == 0
    assert rig.fake.klines_requests() == []
    assert events_named(events, "history_complete")[-1]["rows"] == 0
    assert_store_holds_exactly(tmp_path / "ohlcv.duckdb")


def test_a_deleted_store_makes_the_ledger_start_over_and_a_series_with_no_candles_does_not(
    rig, tmp_path, capsys
):
    # EMPTY/USDT lists after the range: its ledger holds only a proven hole, and stays.
    rig.fake.specs["EMPTYUSDT"] = SymbolSpec("EMPTY/USDT", listed_at_ms=END_MS + DAY_MS)
    config = rig.config(["BTC/USDT", "EMPTY/USDT"], ["1h"])
    args = ("--mode=history", f"--start={START}", f"--end={END}")
    assert run_in_process(capsys, config, *args)[0] == 0
    (tmp_path / "ohlcv.duckdb").unlink()
    rig.fake.reset_log()
    code, events = run_in_process(capsys, config, *args)
    assert code == 0
    [reset] = events_named(events, "state_reset")
    assert reset["symbol"] == "BTC/USDT"
    # Only its newest candle, closed 30 s before the first run, is asked again: an empty answer
    # for it then could have meant "not published yet" (see `pipeline.unpublished_from`).
    [again] = rig.fake.klines_requests("EMPTY/USDT")
    assert int(again.params["startTime"]) == END_MS - 60 * MIN
    rows = read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("binance", "BTC/USDT", "1h"))
    fields = ("timestamp_ms", "open", "high", "low", "close", "volume")
    assert [tuple(r[k] for k in fields) for r in rows] == expected(SPECS[0], "1h")


def test_extending_a_range_fetches_only_the_new_part(rig, tmp_path, capsys):
    config = rig.config(["BTC/USDT"], ["1m"])
    first = ("--mode=history", "--start=2024-02-29", "--end=2024-03-01")
    assert run_in_process(capsys, config, *first)[0] == 0
    rig.fake.reset_log()
    code, _ = run_in_process(
        capsys, config, "--mode=history", f"--start={START}", "--end=2024-03-01"
    )
    assert code == 0
    requests = rig.fake.klines_requests("BTC/USDT")
    assert requests, "the new day must be fetched"
    assert all(int(r.params["startTime"]) < START_MS + DAY_MS for r in requests)
    assert all(int(r.params["endTime"]) < START_MS + DAY_MS for r in requests)
    rows = read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("binance", "BTC/USDT", "1m"))
    assert len(rows) == 2 * 1440


def test_end_defaults_to_now_and_only_closed_candles_are_stored(rig, tmp_path, capsys):
    config = rig.config(["BTC/USDT"], ["1h"])
    code, _ = run_in_process(capsys, config, "--mode=history", "--start=2024-02-29T20:00")
    assert code == 0
    rows = read_duckdb_rows(str(tmp_path / "ohlcv.duckdb"), JobKey("binance", "BTC/USDT", "1h"))
    # At 2024-03-01T00:00:30 the 00:00 candle is still open: 20:00..23:00 are the closed ones.
    assert [r["timestamp_ms"] for r in rows] == [
        NOW_MS - 30_000 - h * 3_600_000 for h in (4, 3, 2, 1)
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--symbol=NOPE/USDT",), "symbol NOPE/USDT: not listed on binance"),
        (("--timeframe=7m",), "timeframe 7m: not offered by binance"),
        (("--exchange=kraken",), "--exchange kraken: not configured"),
    ],
)
def test_things_the_exchange_does_not_have_exit_2(rig, tmp_path, args, message):
    config = rig.config(["BTC/USDT"], ["1m"])
    proc = start_subprocess(config, "--mode=history", f"--start={START}", *args)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tda-collector: error: {message}"), stderr


def test_crash_midway_then_rerun_refetches_at_most_one_page_per_job(exchange_rig, tmp_path):
    specs = [SymbolSpec(f"C{i}/USDT") for i in range(4)]
    rig = exchange_rig(specs, latency_s=0.02)
    config = rig.config(page_limit=100, history_concurrency=4)
    args = ("--mode=history", f"--start={START}", f"--end={END}")
    proc = start_subprocess(config, *args)
    done_pages: Counter[str] = Counter()
    lines = []
    deadline = time.monotonic() + 60
    while sum(done_pages.values()) < 20 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        for event in parse_events(line):
            if event["event"] == "history_page_done":
                done_pages[event["symbol"]] += 1
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert sum(done_pages.values()) >= 20, "".join(lines[-5:])
    fetched = {spec.symbol: len(rig.fake.klines_requests(spec.symbol)) for spec in specs}

    rig.fake.reset_log()
    rerun = start_subprocess(config, *args)
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    pages_total = math.ceil(2880 / 100)
    for spec in specs:
        # A page fetched but not yet committed at the kill is fetched again: a DuckDB history
        # job has one page in flight (fetching it, or waiting for its group commit).
        assert DuckDBStore.pipeline_pages == 1
        fetched_in_both = fetched[spec.symbol] + len(rig.fake.klines_requests(spec.symbol))
        assert 0 <= fetched_in_both - pages_total <= 1, spec.symbol
        rows = read_duckdb_rows(
            str(tmp_path / "ohlcv.duckdb"), JobKey("binance", spec.symbol, "1m")
        )
        got = [
            (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"])
            for r in rows
        ]
        assert got == expected_candles(spec, "1m", START_MS, END_MS, NOW_MS)
