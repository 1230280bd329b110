import math

import numpy as np

from tda_collector.models import JobKey
from tda_collector.normalize import (
    DUPLICATE,
    MALFORMED,
    MISALIGNED,
    NEGATIVE_VOLUME,
    NOT_FINITE,
    OHLC_INCONSISTENT,
    Window,
    normalize_page,
)
from tda_collector.timeframes import EPOCH_WEEK_ORIGIN_MS, grid_of

KEY = JobKey("binance", "BTC/USDT", "1m")
MIN = 60_000
GRID = grid_of("1m")
WINDOW = Window(start_ms=0, end_ms=100 * MIN, closed_before_ms=100 * MIN)


def good(i, close=101.0):
    return [i * MIN, 100.0, 102.0, 99.0, close, 5.0]


def test_valid_rows_pass_through_exactly():
    page = normalize_page([good(1), good(2, 100.5)], KEY, GRID, WINDOW)
    assert page.batch.timestamps.tolist() == [MIN, 2 * MIN]
    assert page.batch.close.tolist() == [101.0, 100.5]
    assert page.batch.closed.all()
    assert not page.rejected


def test_each_invalid_candle_is_rejected_with_its_reason():
    raw = [
        good(1),
        [2 * MIN + 1, 100.0, 102.0, 99.0, 101.0, 5.0],
        [3 * MIN, 100.0, math.inf, 99.0, 101.0, 5.0],
        [4 * MIN, 100.0, 102.0, 99.0, None, 5.0],
        [5 * MIN, 100.0, 99.5, 99.0, 101.0, 5.0],  # close above high
        [6 * MIN, 98.0, 102.0, 99.0, 101.0, 5.0],  # open below low
        [7 * MIN, 100.0, 102.0, 99.0, 101.0, -1.0],
        [8 * MIN, "x", 102.0],
    ]
    page = normalize_page(raw, KEY, GRID, WINDOW)
    assert page.batch.timestamps.tolist() == [MIN]
    assert page.rejected == {
        MISALIGNED: 1,
        NOT_FINITE: 2,
        OHLC_INCONSISTENT: 2,
        NEGATIVE_VOLUME: 1,
        MALFORMED: 1,
    }


def test_duplicates_collapse_to_the_last_version_and_rows_are_sorted():
    raw = [good(3), good(1, 100.1), good(2), good(1, 100.2)]
    page = normalize_page(raw, KEY, GRID, WINDOW)
    assert page.batch.timestamps.tolist() == [MIN, 2 * MIN, 3 * MIN]
    assert page.batch.close[0] == 100.2
    assert page.rejected == {DUPLICATE: 1}


def test_candles_outside_the_window_or_still_open_are_left_out_silently():
    window = Window(start_ms=2 * MIN, end_ms=10 * MIN, closed_before_ms=5 * MIN)
    page = normalize_page([good(i) for i in range(12)], KEY, GRID, window)
    assert page.batch.timestamps.tolist() == [2 * MIN, 3 * MIN, 4 * MIN]
    assert not page.rejected
    assert page.newest_open_ms == 11 * MIN


def test_live_window_keeps_the_open_candle_flagged_not_closed():
    window = Window(start_ms=0, end_ms=10 * MIN, closed_before_ms=5 * MIN, keep_open=True)
    page = normalize_page([good(4), good(5)], KEY, GRID, window)
    assert page.batch.closed.tolist() == [True, False]
    assert page.batch.newest_closed_ms == 4 * MIN


def test_empty_page():
    page = normalize_page([], KEY, GRID, WINDOW)
    assert len(page.batch) == 0
    assert page.newest_open_ms is None


def test_arrow_rows_follow_the_interface_schema():
    page = normalize_page([good(1)], KEY, GRID, WINDOW)
    from datetime import UTC, datetime

    table = page.batch.to_arrow(datetime(2024, 1, 1, tzinfo=UTC))
    assert table.column_names[:10] == [
        "timestamp",
        "exchange",
        "symbol",
        "timeframe",
        "open",
        "high",
        "low",
        "close",
        "volume",
        "ingested_at",
    ]
    row = table.to_pylist()[0]
    assert row["symbol"] == "BTC/USDT" and row["close"] == 101.0
    assert np.int64(row["timestamp"].timestamp() * 1000) == MIN


DAY = 86_400_000
THURSDAY = 1_704_326_400_000  # 2024-01-04T00:00Z
MONDAY = THURSDAY - 3 * DAY


def weekly(*opens):
    return [[t, 100.0, 102.0, 99.0, 101.0, 5.0] for t in opens]


def test_weeks_are_checked_on_the_exchanges_week_origin():
    window = Window(start_ms=MONDAY - 7 * DAY, end_ms=MONDAY + 21 * DAY, closed_before_ms=10**14)
    thursdays = weekly(THURSDAY - 7 * DAY, THURSDAY, THURSDAY + 7 * DAY)
    kraken = normalize_page(thursdays, KEY, grid_of("1w", EPOCH_WEEK_ORIGIN_MS), window)
    assert len(kraken.batch) == 3 and kraken.calendar_mismatch is None
    monday = normalize_page(weekly(MONDAY, MONDAY + 7 * DAY), KEY, grid_of("1w"), window)
    assert len(monday.batch) == 2 and monday.calendar_mismatch is None


def test_a_page_wholly_off_the_grid_names_the_calendar_mismatch():
    window = Window(start_ms=MONDAY - 7 * DAY, end_ms=MONDAY + 21 * DAY, closed_before_ms=10**14)
    thursdays = weekly(THURSDAY - 7 * DAY, THURSDAY, THURSDAY + 7 * DAY)
    page = normalize_page(thursdays, KEY, grid_of("1w"), window)
    assert len(page.batch) == 0 and page.rejected == {MISALIGNED: 3}
    assert page.calendar_mismatch == (
        "candles open at 2023-12-28T00:00:00Z, 2024-01-04T00:00:00Z, 2024-01-11T00:00:00Z, "
        "not on the 1w grid from Mon 1970-01-05 00:00 UTC: "
        "the exchange's calendar differs (week origin?)"
    )


def test_a_stray_misaligned_candle_is_only_rejected():
    page = normalize_page(
        [good(1), [2 * MIN + 1, 100.0, 102.0, 99.0, 101.0, 5.0]], KEY, GRID, WINDOW
    )
    assert page.rejected == {MISALIGNED: 1} and page.calendar_mismatch is None


def test_months_are_calendar_months():
    jan, feb, mar = 1_704_067_200_000, 1_706_745_600_000, 1_709_251_200_000  # 2024-01/02/03-01
    window = Window(start_ms=jan, end_ms=mar + 31 * DAY, closed_before_ms=mar)
    raw = weekly(jan, feb, mar, jan + 30 * DAY)  # 30 days after January 1st is no month start
    page = normalize_page(raw, KEY, grid_of("1M"), window)
    assert page.batch.timestamps.tolist() == [jan, feb]
    assert page.rejected == {MISALIGNED: 1}
