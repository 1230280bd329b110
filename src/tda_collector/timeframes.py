"""Timeframes and their calendars: where the candles of a series open (pure functions).

A `Grid` is one timeframe on one exchange's calendar, in epoch milliseconds (UTC):

- fixed-length timeframes (`1s` … `12h`, `1d`, `3d`, …) open on multiples of their length
  counted from the Unix epoch (Binance's 3d candles are epoch-aligned, as ccxt's
  `round_timeframe` and freqtrade assume);
- weeks (`1w`, `2w`) open on multiples of their length counted from the exchange's week origin:
  Monday 1970-01-05 on Binance and most exchanges (`MONDAY_WEEK_ORIGIN_MS`), the epoch's
  Thursday on Kraken (`EPOCH_WEEK_ORIGIN_MS`);
- months (`1M`, `3M`, …) open at 00:00 UTC on the first day of a calendar month, counted from
  January 1970, so they last 28 to 31 days.

Candle arithmetic goes through the grid (`floor`, `ceil`, `next_open`, `shift`, `count`), never
through `timeframe_ms`, which is only a nominal length (exact for fixed-length timeframes; a
month counts 30 days, as in ccxt's `parse_timeframe`) for sorting, rates and estimates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import TypeVar

import numpy as np

DAY_MS = 86_400_000
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}
_MONTH_NOMINAL_MS = 30 * DAY_MS
_PATTERN = re.compile(r"^([1-9][0-9]*)([smhdwM])$")
# Weekly candles of most exchanges open on Monday 00:00 UTC; the epoch (1970-01-01) was a
# Thursday, so their grid is offset by four days from it. Kraken's weeks open on Thursday.
MONDAY_WEEK_ORIGIN_MS = 4 * DAY_MS
EPOCH_WEEK_ORIGIN_MS = 0
# 1970-03-01 as days from 0000-03-01 in the proleptic Gregorian calendar (Hinnant's algorithm).
_EPOCH_SHIFT_DAYS = 719_468

Days = TypeVar("Days", int, np.ndarray)


def parse_timeframe(timeframe: str) -> tuple[int, str]:
    """(count, unit) of a timeframe such as `15m` or `1M`; ValueError for anything else."""
    match = _PATTERN.match(timeframe)
    if not match:
        raise ValueError(
            f"unsupported timeframe {timeframe!r} (use e.g. 1m, 5m, 1h, 4h, 1d, 3d, 1w, 1M)"
        )
    return int(match.group(1)), match.group(2)


def timeframe_ms(timeframe: str) -> int:
    """Nominal length of one candle in ms (a month counts 30 days); ValueError if unsupported.
    Exact for every timeframe but months; use a `Grid` for candle arithmetic."""
    count, unit = parse_timeframe(timeframe)
    return count * (_MONTH_NOMINAL_MS if unit == "M" else _UNIT_MS[unit])


def _civil_from_days(days: Days) -> tuple[Days, Days, Days]:
    """(year, month 1-12, day 1-31) of days since the epoch; ints or int64 arrays alike."""
    z = days + _EPOCH_SHIFT_DAYS
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 - 12 * (mp >= 10)
    return yoe + era * 400 + (month <= 2), month, day


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since the epoch of a proleptic Gregorian date (the inverse of `_civil_from_days`)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * ((month + 9) % 12) + 2) // 5 + day - 1
    return era * 146_097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - _EPOCH_SHIFT_DAYS


@dataclass(frozen=True)
class Grid:
    """The open times of one timeframe on one exchange's calendar.

    Candles are numbered from the one opening at `origin_ms` (months: January 1970); `floor`,
    `ceil` and `count` accept any instant, `next_open` and `shift` any instant too (they start
    from the candle containing it). Build grids with `grid_of()`.
    """

    timeframe: str
    step_ms: int  # a candle's length; for months, the nominal 30 days a month
    origin_ms: int = 0
    months: int = 0  # > 0: calendar months of this many

    def index(self, t_ms: int) -> int:
        """Number of the candle containing `t_ms`."""
        if not self.months:
            return (t_ms - self.origin_ms) // self.step_ms
        year, month, _ = _civil_from_days(t_ms // DAY_MS)
        return ((year - 1970) * 12 + month - 1) // self.months

    def open_of(self, index: int) -> int:
        """Open time of candle number `index`."""
        if not self.months:
            return self.origin_ms + index * self.step_ms
        year, month0 = divmod(index * self.months, 12)
        return _days_from_civil(1970 + year, month0 + 1, 1) * DAY_MS

    def floor(self, t_ms: int) -> int:
        """Open time of the candle containing `t_ms` (at `now`: the candle in progress, so
        every candle opening before `floor(now)` has closed)."""
        return self.open_of(self.index(t_ms))

    def ceil(self, t_ms: int) -> int:
        """First open time at or after `t_ms`."""
        index = self.index(t_ms)
        floor = self.open_of(index)
        return floor if floor == t_ms else self.open_of(index + 1)

    def next_open(self, t_ms: int) -> int:
        """Open time of the candle after the one containing `t_ms` (its close, for an open
        time)."""
        return self.open_of(self.index(t_ms) + 1)

    def close_of(self, open_ms: int) -> int:
        """Close of the candle opening at `open_ms` (the next open time): right on any grid of
        this timeframe, whatever its week origin, so callers without the exchange's may use
        it."""
        return self.next_open(open_ms) if self.months else open_ms + self.step_ms

    def shift(self, t_ms: int, candles: int) -> int:
        """Open time `candles` candles after (negative: before) the one containing `t_ms`."""
        return self.open_of(self.index(t_ms) + candles)

    def is_open(self, t_ms: int) -> bool:
        """Whether a candle opens at `t_ms`."""
        return self.floor(t_ms) == t_ms

    def count(self, start_ms: int, end_ms: int) -> int:
        """Number of candles opening in [start_ms, end_ms) (0 when empty)."""
        if end_ms <= start_ms:
            return 0
        return self.index(self.ceil(end_ms)) - self.index(self.ceil(start_ms))

    def aligned(self, ts: np.ndarray) -> np.ndarray:
        """Elementwise `is_open` of an int64 array of instants (a bool array)."""
        if not self.months:
            return np.asarray((ts - self.origin_ms) % self.step_ms == 0)
        days, rest = np.divmod(ts, DAY_MS)
        year, month, day = _civil_from_days(days)
        index = (year - 1970) * 12 + month - 1
        return np.asarray((rest == 0) & (day == 1) & (index % self.months == 0))

    def describe(self) -> str:
        """Where the grid starts, for messages: e.g. `the 1w grid from Mon 1970-01-05`."""
        if self.months:
            return f"the {self.timeframe} grid of calendar months from Jan 1970"
        origin = datetime.fromtimestamp(self.origin_ms / 1000, tz=UTC)
        return f"the {self.timeframe} grid from {origin:%a %Y-%m-%d %H:%M} UTC"


@lru_cache(maxsize=256)
def grid_of(timeframe: str, week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS) -> Grid:
    """The grid of `timeframe` on a calendar whose weeks open at `week_origin_ms` (only weekly
    timeframes use it); ValueError for an unsupported timeframe."""
    count, unit = parse_timeframe(timeframe)
    if unit == "M":
        return Grid(timeframe, count * _MONTH_NOMINAL_MS, months=count)
    step = count * _UNIT_MS[unit]
    return Grid(timeframe, step, week_origin_ms % step if unit == "w" else 0)


# Epoch ms up to the last instant an ISO 8601 date-time can name (year 9999).
_MAX_INSTANT_MS = 253_402_300_799_999


def instant_ms(text: str) -> int:
    """Epoch ms of an ISO 8601 date or date-time (UTC when no zone is given), or of a string
    of digits read as epoch ms; ValueError, saying what is wrong, for anything else."""
    text = text.strip()
    if text.isdigit():
        if int(text) > _MAX_INSTANT_MS:
            raise ValueError(f"epoch ms beyond the year 9999: {text}")
        return int(text)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or date-time, nor epoch ms: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def iso_utc(epoch_s: float) -> str:
    """`2024-01-01T00:00:00Z`, the interface's form of a time in answers and events."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
