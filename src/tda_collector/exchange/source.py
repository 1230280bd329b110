"""The exchange seam: what the collector needs from an exchange, and the values it answers with.

Everything above it (paging, live scheduling, progress) is written against `CandleSource`, so a
new exchange library plugs in without touching the rest, and tests put fakes here. The only
implementation over the wire is `ccxt_source.CcxtExchange`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..models import RawCandles


@dataclass(frozen=True)
class UsedWeightRule:
    """An exchange's own count of the request weight an IP used in the current window, sent
    as a header on every answer: it includes other clients on the same IP, which our
    limiter cannot see."""

    header: str
    limit: int  # weight allowed per window
    window_s: float = 60.0  # windows are aligned to the exchange's clock (Binance: minutes)


# Weekly candles of most exchanges open on Monday 00:00 UTC; the epoch (1970-01-01) was a
# Thursday, so their grid is offset by four days from it.
MONDAY_WEEK_ORIGIN_MS = 4 * 86_400_000


@dataclass(frozen=True)
class Capabilities:
    """Per-exchange facts that change how we page, kept as data rather than subclasses.

    Paging: every request asks for a window that one page can hold (`max_page_size` candles
    from `since`), so it makes no difference to correctness whether the exchange answers a
    larger window from its oldest or its newest end; `newest_first` only says which end an
    exchange answers (and so which end of an oversized answer to trust). `reach_candles` is
    how deep the exchange serves history at all (Kraken: the newest 720 candles, whatever
    `since` says); `deep_after_candles`/`deep_page_size` describe an exchange that serves
    older candles from a second endpoint with a smaller page (OKX: beyond the newest 1,440,
    `history-candles`, 100 a request). `week_origin_ms` is where weekly candles open.
    """

    max_page_size: int = 500
    ohlcv_request_cost: float = 1.0  # budget units one candle request consumes
    newest_first: bool = False
    reach_candles: int | None = None
    deep_after_candles: int | None = None
    deep_page_size: int | None = None
    week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS
    # A ccxt implicit-API method answering Binance-style kline arrays for spot markets. Asking
    # it directly skips ccxt's per-candle parsing (about 10 µs a candle, most of our CPU), and
    # its body is parsed straight to floats (`klines_matrix`); ccxt still builds, sends and
    # error-checks the request.
    raw_klines_method: str | None = None
    used_weight: UsedWeightRule | None = None


@dataclass(frozen=True)
class MarketInfo:
    symbol: str
    quote: str
    type: str
    active: bool


class CandleSource(Protocol):
    id: str
    capabilities: Capabilities

    @property
    def default_requests_per_second(self) -> float: ...

    @property
    def timeframes(self) -> set[str]: ...

    def now_ms(self) -> int: ...

    async def open(self) -> None: ...

    def markets(self) -> list[MarketInfo]: ...

    async def quote_volumes(self, symbols: list[str]) -> dict[str, float]: ...

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int, until_ms: int, limit: int
    ) -> RawCandles: ...

    def watch_used_weight(self, header: str, listener: Callable[[int, int], None]) -> None:
        """Call `listener(used_weight, sent_ms)` for every answer carrying `header`."""

    async def close(self) -> None: ...
