import pytest

from tda_collector.timeframes import ceil_ms, closed_before, floor_ms, timeframe_ms

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1s", 1000),
        ("1m", MIN),
        ("15m", 15 * MIN),
        ("1h", HOUR),
        ("4h", 4 * HOUR),
        ("1d", DAY),
        ("1w", 7 * DAY),
    ],
)
def test_timeframe_lengths(text, ms):
    assert timeframe_ms(text) == ms


@pytest.mark.parametrize("text", ["", "1M", "0m", "m", "1y", "01m", "1 m", "1H"])
def test_unsupported_timeframes_are_refused(text):
    with pytest.raises(ValueError, match="unsupported timeframe"):
        timeframe_ms(text)


def test_floor_and_ceil_on_minute_candles():
    assert floor_ms(10 * MIN + 59_999, MIN) == 10 * MIN
    assert ceil_ms(10 * MIN + 1, MIN) == 11 * MIN
    assert ceil_ms(10 * MIN, MIN) == 10 * MIN


def test_weekly_candles_open_on_monday():
    monday = 1_704_067_200_000  # 2024-01-01 00:00 UTC, a Monday
    assert floor_ms(monday + 3 * DAY, 7 * DAY) == monday
    assert floor_ms(monday, 7 * DAY) == monday
    assert floor_ms(monday + DAY, 7 * DAY) != monday + DAY


def test_closed_before_excludes_the_candle_in_progress():
    now = 5 * HOUR + 30 * MIN
    assert closed_before(now, HOUR) == 5 * HOUR  # the 05:00 candle is still open
    assert closed_before(5 * HOUR, HOUR) == 5 * HOUR  # exactly at the close, 04:00 has closed
