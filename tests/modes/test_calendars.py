"""Calendars end to end: every PRD timeframe plus 3d and 1M through the CLI, real ccxt over HTTP
to the fake Binance, into DuckDB; and a series on another calendar fails its job loudly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from collector_support import FROZEN_NOW_S, events_named, run_in_process
from fake_exchange import EPOCH_WEEK_ORIGIN_MS, SymbolSpec, candle, expected_candles
from live_support import Harness
from live_support import key as live_key
from memory_source import MemorySource
from pipeline_support import backfill_one
from store_support import read_duckdb_rows

from tda_collector.exchange.source import Capabilities
from tda_collector.jobs.model import COMPLETED
from tda_collector.models import JobKey
from tda_collector.modes.pipeline import proven_span
from tda_collector.normalize import Window, normalize_page
from tda_collector.timeframes import grid_of

KEY_1M = JobKey("binance", "BTC/USDT", "1M")
NOW_MS = int(FROZEN_NOW_S * 1000)  # 2024-03-01T00:00:30Z: February (29 days) has just closed


def utc_ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)


SPECS = [
    SymbolSpec("BTC/USDT"),  # listed 2023-01-01T00:00Z
    # Listed mid-month and mid-week: its first month, week and 3 days are never whole candles.
    SymbolSpec("LATE/USDT", listed_at_ms=utc_ms(2023, 6, 17, 7)),
    # A maintenance hole over all of August 2023, and one of three hours in February 2024.
    SymbolSpec(
        "GAP/USDT",
        gaps=[
            (utc_ms(2023, 8, 1), utc_ms(2023, 9, 1)),
            (utc_ms(2024, 2, 29, 1), utc_ms(2024, 2, 29, 4)),
        ],
    ),
]
SYMBOLS = [s.symbol for s in SPECS]
SHORT = ["1m", "5m", "15m", "1h", "4h"]  # two days of them
LONG = ["1d", "3d", "1w", "1M"]  # fourteen months of them


def stored(db_path, symbol: str, timeframe: str) -> list[tuple]:
    rows = read_duckdb_rows(str(db_path), JobKey("binance", symbol, timeframe))
    assert all(r["is_closed"] for r in rows), f"{symbol} {timeframe}: an open candle was stored"
    return [
        (r["timestamp_ms"], r["open"], r["high"], r["low"], r["close"], r["volume"]) for r in rows
    ]


def test_every_prd_timeframe_plus_3d_and_1M_stores_exactly_the_exchanges_candles(
    exchange_rig, tmp_path, capsys
):
    rig = exchange_rig(SPECS)
    runs = [
        (SHORT, "2024-02-28", utc_ms(2024, 2, 28)),
        (LONG, "2023-01-01", utc_ms(2023, 1, 1)),
    ]
    for timeframes, start, start_ms in runs:
        config = rig.config(SYMBOLS, timeframes, page_limit=500)
        code, events = run_in_process(capsys, config, "--mode=history", f"--start={start}")
        assert code == 0, events_named(events, "job_failed")
        summary = events_named(events, "history_complete")[-1]
        assert summary["failed"] == 0 and summary["jobs"] == len(SYMBOLS) * len(timeframes)
        assert summary.get("rejected", 0) == 0
        for spec in SPECS:
            for tf in timeframes:
                want = expected_candles(spec, tf, start_ms, NOW_MS, NOW_MS)
                assert want, f"{spec.symbol} {tf}: the range must hold candles"
                assert stored(tmp_path / "ohlcv.duckdb", spec.symbol, tf) == want, (
                    f"{spec.symbol} {tf}"
                )
        # A rerun of the same range asks for nothing: the ledger covers it on each calendar.
        rig.fake.reset_log()
        code, _ = run_in_process(capsys, config, "--mode=history", f"--start={start}")
        assert code == 0 and rig.fake.klines_requests() == []

    months = [r[0] for r in stored(tmp_path / "ohlcv.duckdb", "BTC/USDT", "1M")]
    assert months[0] == utc_ms(2023, 1, 1) and months[-1] == utc_ms(2024, 2, 1)
    assert len(months) == 14  # March 2024 is still open
    gap_months = [r[0] for r in stored(tmp_path / "ohlcv.duckdb", "GAP/USDT", "1M")]
    assert utc_ms(2023, 8, 1) not in gap_months and len(gap_months) == 13
    weeks = [r[0] for r in stored(tmp_path / "ohlcv.duckdb", "BTC/USDT", "1w")]
    assert all(datetime.fromtimestamp(t / 1000, UTC).weekday() == 0 for t in weeks)  # Mondays
    late_3d = stored(tmp_path / "ohlcv.duckdb", "LATE/USDT", "3d")
    assert late_3d[0][0] >= utc_ms(2023, 6, 17, 7) and late_3d[0][0] % (3 * 86_400_000) == 0


def test_a_series_on_another_weekly_calendar_fails_its_job_with_the_reason(
    exchange_rig, tmp_path, capsys
):
    # This exchange's weeks open on Thursday (as Kraken's), but its capabilities say Monday:
    # every weekly candle is off the grid. The job must fail saying so, not store nothing
    # quietly; the daily series of the same run is unaffected.
    rig = exchange_rig([SymbolSpec("BTC/USDT")], week_origin_ms=EPOCH_WEEK_ORIGIN_MS)
    config = rig.config(["BTC/USDT"], ["1w", "1d"])
    code, events = run_in_process(capsys, config, "--mode=history", "--start=2023-06-01")
    assert code == 1
    failed = events_named(events, "job_failed")
    assert [e["timeframe"] for e in failed] == ["1w"]
    assert "not on the 1w grid from Mon 1970-01-05 00:00 UTC" in failed[0]["error"]
    assert "the exchange's calendar differs (week origin?)" in failed[0]["error"]
    # The window opens on the Monday grid (2023-06-05); the first candle in it, a Thursday:
    assert "candles open at 2023-06-08T00:00:00Z, 2023-06-15T00:00:00Z" in failed[0]["error"]
    summary = events_named(events, "history_complete")[-1]
    assert summary["failed"] == 1 and summary["completed"] == 1
    assert stored(tmp_path / "ohlcv.duckdb", "BTC/USDT", "1w") == []
    daily = expected_candles(SymbolSpec("BTC/USDT"), "1d", utc_ms(2023, 6, 1), NOW_MS, NOW_MS)
    assert stored(tmp_path / "ohlcv.duckdb", "BTC/USDT", "1d") == daily
    # The rejections were reported too (one reason, counted), before the job failed.
    rejected = [e for e in events_named(events, "candle_rejected") if e["timeframe"] == "1w"]
    assert rejected and all(e["reason"] == "misaligned" for e in rejected)


def test_a_page_of_months_proves_up_to_the_next_month_start_not_30_days():
    jan, feb, mar = utc_ms(2024, 1, 1), utc_ms(2024, 2, 1), utc_ms(2024, 3, 1)
    window = (utc_ms(2023, 12, 1), utc_ms(2024, 6, 1))
    raw = [[t, 100.0, 110.0, 90.0, 100.0, 1.0] for t in (jan, feb)]
    grid = grid_of("1M")
    page = normalize_page(raw, KEY_1M, grid, Window(*window, closed_before_ms=window[1]))
    settled, stored_spans = proven_span(window, page, grid)
    assert settled == (jan, mar)  # February has 29 days: jan + 60 days would pass March 1st
    assert stored_spans == [(jan, mar)]


async def backfill_on_calendar(tmp_path, spec, timeframe, capabilities, start_ms):
    """One history job from `start_ms` to now against an in-memory exchange with
    `capabilities`, registered and run as history mode does; returns outcome and rows."""
    source = MemorySource([spec], lambda: FROZEN_NOW_S, asyncio.sleep)
    source.capabilities = capabilities
    key = JobKey("binance", spec.symbol, timeframe)
    run = await backfill_one(tmp_path, source, key, start_ms, NOW_MS, capabilities.max_page_size)
    return run.outcome, run.rows, run.coverage, run.job


async def test_thursday_weeks_are_stored_exactly_where_the_exchange_says_weeks_open(tmp_path):
    spec = SymbolSpec("BTC/USDT")
    caps = Capabilities(max_page_size=7, week_origin_ms=EPOCH_WEEK_ORIGIN_MS)  # as Kraken
    outcome, rows, coverage, job = await backfill_on_calendar(
        tmp_path, spec, "1w", caps, utc_ms(2023, 6, 1)
    )
    assert outcome.status == COMPLETED, outcome.error
    want = expected_candles(
        spec, "1w", utc_ms(2023, 6, 1), NOW_MS, NOW_MS, week_origin_ms=EPOCH_WEEK_ORIGIN_MS
    )
    assert rows == want and rows[0][0] == utc_ms(2023, 6, 1)  # a Thursday
    assert coverage == [(utc_ms(2023, 6, 1), utc_ms(2024, 2, 29))]  # the last closed: Feb 22
    assert job.slots == len(want) == 39


async def test_months_page_across_february_without_skipping_march(tmp_path):
    # Pages of 2 months: one page ends with February (29 days in 2024, 28 in 2023), where a
    # 30-day step would land on March 2nd or 3rd and skip March.
    spec = SymbolSpec("BTC/USDT")
    outcome, rows, coverage, job = await backfill_on_calendar(
        tmp_path, spec, "1M", Capabilities(max_page_size=2), utc_ms(2023, 1, 1)
    )
    assert outcome.status == COMPLETED, outcome.error
    assert rows == expected_candles(spec, "1M", utc_ms(2023, 1, 1), NOW_MS, NOW_MS)
    assert len(rows) == 14 and coverage == [(utc_ms(2023, 1, 1), utc_ms(2024, 3, 1))]
    assert job.slots == 14 and job.record.covered == 1.0


async def test_live_stores_the_week_as_it_closes_on_monday(tmp_path):
    # From Friday 2024-03-01 00:00:30 to Monday 03-04 past midnight: the week of Feb 26 closes
    # at Monday 00:00, is stored closed at the next due instant (+ the settle delay), and the
    # week of Mar 4 becomes the open candle. Refreshes every 6 hours in between.
    h = Harness(tmp_path, [SymbolSpec("BTC/USDT")], refresh_s=6 * 3600, initial_candles=3)
    week = live_key("BTC/USDT", "1w")
    await h.run_for(3 * 86_400 + 3600, [week])
    rows = h.store.series_rows(week)
    closed = [tuple(r[:6]) for r in rows if r[6]]
    weeks = [utc_ms(2024, 2, d) for d in (5, 12, 19, 26)]
    assert closed == [candle("BTC/USDT", "1w", t) for t in weeks]
    assert [r[0] for r in rows if not r[6]] == [utc_ms(2024, 3, 4)]
    due = [at for at, *_ in h.source.calls if at * 1000 >= utc_ms(2024, 3, 4)]
    assert due and due[0] * 1000 == utc_ms(2024, 3, 4) + 2000  # the close, settled
