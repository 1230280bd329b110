"""Timeframe arithmetic on epoch milliseconds (pure functions).

Candles open on multiples of their length counted from the Unix epoch, except weekly candles,
which open on Mondays (the epoch was a Thursday), as on Binance and most ccxt exchanges.
Calendar months have no fixed length and are not supported.
"""

from __future__ import annotations

import re

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_PATTERN = re.compile(r"^([1-9][0-9]*)([smhdw])$")
# 1970-01-05 00:00 UTC, the first Monday after the epoch.
_WEEK_ORIGIN_MS = 4 * 86_400_000


def timeframe_ms(timeframe: str) -> int:
    """Length of one candle in milliseconds; ValueError for anything unsupported."""
    match = _PATTERN.match(timeframe)
    if not match:
        raise ValueError(f"unsupported timeframe {timeframe!r} (use e.g. 1m, 5m, 1h, 4h, 1d, 1w)")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _origin(tf_ms: int) -> int:
    return _WEEK_ORIGIN_MS if tf_ms % _UNIT_MS["w"] == 0 else 0


def floor_ms(ts_ms: int, tf_ms: int) -> int:
    """Open time of the candle that contains `ts_ms`."""
    origin = _origin(tf_ms)
    return (ts_ms - origin) // tf_ms * tf_ms + origin


def ceil_ms(ts_ms: int, tf_ms: int) -> int:
    """First candle open time at or after `ts_ms`."""
    floor = floor_ms(ts_ms, tf_ms)
    return floor if floor == ts_ms else floor + tf_ms


def closed_before(now_ms: int, tf_ms: int) -> int:
    """Candles opening before this instant have closed at `now_ms`."""
    return floor_ms(now_ms, tf_ms)


def alignment_origin(tf_ms: int) -> int:
    """The instant that candle open times are counted from (for vectorised checks)."""
    return _origin(tf_ms)
