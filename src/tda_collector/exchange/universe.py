"""Which symbols and timeframes an exchange's jobs cover (pure functions).

Explicit `symbols` are checked against the exchange's markets; a `markets` block adds symbols
chosen by quote currency and type (active only by default), optionally the top N by 24h quote
volume, in listing order where the exchange does not report volume.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import MarketsFilter
from ..errors import UsageError
from ..timeframes import timeframe_ms
from .source import MarketInfo


def filter_markets(markets: Iterable[MarketInfo], wanted: MarketsFilter) -> list[str]:
    quotes = {q.upper() for q in wanted.quote}
    return [
        m.symbol
        for m in markets
        if m.type == wanted.type
        and (not quotes or m.quote.upper() in quotes)
        and (m.active or not wanted.active_only)
    ]


def top_by_volume(symbols: list[str], volumes: dict[str, float], limit: int | None) -> list[str]:
    """The `limit` highest-volume symbols; unknown volumes rank last, in their given order."""
    if limit is None:
        return symbols
    position = {s: i for i, s in enumerate(symbols)}
    ranked = sorted(symbols, key=lambda s: (s not in volumes, -volumes.get(s, 0.0), position[s]))
    return ranked[:limit]


def check_symbols(exchange_id: str, symbols: Iterable[str], markets: Iterable[MarketInfo]) -> None:
    known = {m.symbol for m in markets}
    unknown = [s for s in symbols if s not in known]
    if unknown:
        raise UsageError(f"symbol {', '.join(unknown)}: not listed on {exchange_id}")


def check_timeframes(exchange_id: str, timeframes: Iterable[str], supported: set[str]) -> None:
    unknown = [tf for tf in timeframes if tf not in supported]
    if unknown:
        offered = ", ".join(sorted(supported, key=_length_or_last)) or "none"
        raise UsageError(
            f"timeframe {', '.join(unknown)}: not offered by {exchange_id} (offers {offered})"
        )


def _length_or_last(timeframe: str) -> tuple[float, str]:
    try:
        return timeframe_ms(timeframe), timeframe
    except ValueError:
        return float("inf"), timeframe


def merge_symbols(explicit: list[str], resolved: list[str]) -> list[str]:
    """Explicit symbols first, then resolved ones, without repeats."""
    return list(dict.fromkeys([*explicit, *resolved]))
