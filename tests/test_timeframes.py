from datetime import UTC, datetime

import numpy as np
import pytest

from tda_collector.timeframes import (
    EPOCH_WEEK_ORIGIN_MS,
    MONDAY_WEEK_ORIGIN_MS,
    grid_of,
    parse_timeframe,
    timeframe_ms,
)

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def at(*parts: int) -> int:
    """Epoch ms of a UTC date-time."""
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1s", 1000),
        ("1m", MIN),
        ("15m", 15 * MIN),
        ("1h", HOUR),
        ("4h", 4 * HOUR),
        ("1d", DAY),
        ("3d", 3 * DAY),
        ("1w", 7 * DAY),
        ("1M", 30 * DAY),  # nominal, as ccxt's parse_timeframe
    ],
)
def test_timeframe_lengths(text, ms):
    assert timeframe_ms(text) == ms


@pytest.mark.parametrize("text", ["", "0m", "m", "1y", "01m", "1 m", "1H", "1mo"])
def test_unsupported_timeframes_are_refused(text):
    with pytest.raises(ValueError, match="unsupported timeframe"):
        timeframe_ms(text)


def test_parse_timeframe_splits_count_and_unit():
    assert parse_timeframe("15m") == (15, "m")
    assert parse_timeframe("1M") == (1, "M")


# (timeframe, week origin, instant, floor, next open after the floor)
FLOORS = [
    ("1m", MONDAY_WEEK_ORIGIN_MS, 10 * MIN + 59_999, 10 * MIN, 11 * MIN),
    ("4h", MONDAY_WEEK_ORIGIN_MS, at(2024, 3, 1, 3, 59), at(2024, 3, 1), at(2024, 3, 1, 4)),
    ("1d", MONDAY_WEEK_ORIGIN_MS, at(2024, 2, 29, 23), at(2024, 2, 29), at(2024, 3, 1)),
    # 3d: epoch-aligned (2024-02-29 is day 19782 from the epoch, a multiple of 3)
    ("3d", MONDAY_WEEK_ORIGIN_MS, at(2024, 3, 1, 12), at(2024, 2, 29), at(2024, 3, 3)),
    ("3d", EPOCH_WEEK_ORIGIN_MS, at(2024, 3, 1, 12), at(2024, 2, 29), at(2024, 3, 3)),
    ("3d", MONDAY_WEEK_ORIGIN_MS, 0, 0, 3 * DAY),
    # weeks on Monday (2024-01-01 was a Monday) and on the epoch's Thursday (Kraken)
    ("1w", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 4), at(2024, 1, 1), at(2024, 1, 8)),
    ("1w", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 1), at(2024, 1, 1), at(2024, 1, 8)),
    ("1w", EPOCH_WEEK_ORIGIN_MS, at(2024, 1, 4), at(2024, 1, 4), at(2024, 1, 11)),
    ("1w", EPOCH_WEEK_ORIGIN_MS, at(2024, 1, 3, 23), at(2023, 12, 28), at(2024, 1, 4)),
    # across a year end
    ("1w", MONDAY_WEEK_ORIGIN_MS, at(2025, 1, 1), at(2024, 12, 30), at(2025, 1, 6)),
    ("2w", MONDAY_WEEK_ORIGIN_MS, 4 * DAY + 20 * DAY, 4 * DAY + 14 * DAY, 4 * DAY + 28 * DAY),
    # months: 31, 30, 29 (leap), 28 days; year ends; before the epoch
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 31, 23, 59), at(2024, 1, 1), at(2024, 2, 1)),
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 2, 29, 12), at(2024, 2, 1), at(2024, 3, 1)),
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2023, 2, 28, 23), at(2023, 2, 1), at(2023, 3, 1)),
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2100, 2, 28), at(2100, 2, 1), at(2100, 3, 1)),  # no leap
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2000, 2, 29), at(2000, 2, 1), at(2000, 3, 1)),  # leap
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 4, 30, 23), at(2024, 4, 1), at(2024, 5, 1)),
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 12, 31, 23), at(2024, 12, 1), at(2025, 1, 1)),
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(2025, 1, 1), at(2025, 1, 1), at(2025, 2, 1)),
    ("1M", MONDAY_WEEK_ORIGIN_MS, at(1969, 12, 15), at(1969, 12, 1), at(1970, 1, 1)),
    ("3M", MONDAY_WEEK_ORIGIN_MS, at(2024, 5, 20), at(2024, 4, 1), at(2024, 7, 1)),
]


@pytest.mark.parametrize(("timeframe", "origin", "t", "floor", "following"), FLOORS)
def test_floor_next_open_and_alignment(timeframe, origin, t, floor, following):
    grid = grid_of(timeframe, origin)
    assert grid.floor(t) == floor
    assert grid.next_open(t) == following
    assert grid.next_open(floor) == following
    assert grid.is_open(floor) and grid.is_open(following)
    assert grid.is_open(t) == (t == floor)
    assert grid.ceil(t) == (floor if t == floor else following)
    assert grid.shift(following, -1) == floor
    assert grid.count(floor, following) == 1
    assert list(grid.aligned(np.array([floor, following, floor + 1], dtype=np.int64))) == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    ("timeframe", "origin", "start", "end", "count"),
    [
        ("1m", MONDAY_WEEK_ORIGIN_MS, 0, 10 * MIN, 10),
        ("1m", MONDAY_WEEK_ORIGIN_MS, 1, 10 * MIN + 1, 10),  # [1 min .. 10 min]
        ("1m", MONDAY_WEEK_ORIGIN_MS, 5 * MIN, 5 * MIN, 0),
        ("1m", MONDAY_WEEK_ORIGIN_MS, 6 * MIN, 5 * MIN, 0),
        ("1d", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 1), at(2025, 1, 1), 366),
        ("1d", MONDAY_WEEK_ORIGIN_MS, at(2023, 1, 1), at(2024, 1, 1), 365),
        ("1w", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 1), at(2024, 1, 29), 4),
        ("1w", EPOCH_WEEK_ORIGIN_MS, at(2024, 1, 1), at(2024, 1, 29), 4),  # 4th .. 25th
        ("1w", EPOCH_WEEK_ORIGIN_MS, at(2024, 1, 1), at(2024, 1, 4), 0),
        ("1w", MONDAY_WEEK_ORIGIN_MS, at(2024, 1, 1), at(2024, 1, 4), 1),
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2023, 1, 1), at(2024, 3, 1), 14),
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2023, 1, 2), at(2024, 3, 1, 0, 0, 1), 14),
        ("1M", MONDAY_WEEK_ORIGIN_MS, at(2024, 2, 2), at(2024, 2, 28), 0),
        ("3d", MONDAY_WEEK_ORIGIN_MS, at(2024, 2, 28), at(2024, 3, 5), 2),
    ],
)
def test_count_of_candles_in_a_half_open_range(timeframe, origin, start, end, count):
    assert grid_of(timeframe, origin).count(start, end) == count


def test_months_follow_the_calendar_for_four_centuries():
    grid = grid_of("1M")
    opens = [at(year, month, 1) for year in range(1900, 2301) for month in range(1, 13)]
    assert [grid.next_open(t) for t in opens[:-1]] == opens[1:]
    assert all(grid.floor(t + DAY - 1) == t for t in opens)
    assert grid.aligned(np.array(opens, dtype=np.int64)).all()
    assert not grid.aligned(np.array([t + DAY for t in opens], dtype=np.int64)).any()
    assert grid.count(opens[0], opens[-1]) == len(opens) - 1


def test_the_week_origin_moves_only_weekly_grids():
    assert grid_of("1d", EPOCH_WEEK_ORIGIN_MS) == grid_of("1d", MONDAY_WEEK_ORIGIN_MS)
    assert grid_of("1M", EPOCH_WEEK_ORIGIN_MS) == grid_of("1M", MONDAY_WEEK_ORIGIN_MS)
    assert grid_of("1w", EPOCH_WEEK_ORIGIN_MS) != grid_of("1w", MONDAY_WEEK_ORIGIN_MS)


def test_describe_names_the_grid_and_its_origin():
    assert grid_of("1w").describe() == "the 1w grid from Mon 1970-01-05 00:00 UTC"
    assert grid_of("1w", EPOCH_WEEK_ORIGIN_MS).describe().endswith("Thu 1970-01-01 00:00 UTC")
    assert "calendar months" in grid_of("1M").describe()


def test_close_of_a_candle_is_right_whatever_the_week_origin():
    thursday = at(2024, 1, 4)
    assert grid_of("1w").close_of(thursday) == at(2024, 1, 11)  # a Monday grid, Kraken's week
    assert grid_of("1M").close_of(at(2024, 2, 1)) == at(2024, 3, 1)
    assert grid_of("1h").close_of(at(2024, 2, 1)) == at(2024, 2, 1, 1)
