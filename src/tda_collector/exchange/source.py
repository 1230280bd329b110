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
from ..timeframes import MONDAY_WEEK_ORIGIN_MS, Grid, grid_of


@dataclass(frozen=True)
class UsedWeightRule:
    """An exchange's own count of the request weight an IP used in the current window, sent
    as a header on every answer: it includes other clients on the same IP, which our
    limiter cannot see."""

    header: str
    limit: int  # weight allowed per window
    window_s: float = 60.0  # windows are aligned to the exchange's clock (Binance: minutes)


@dataclass(frozen=True)
class Capabilities:
    """Per-exchange facts that change how we page, kept as data rather than subclasses.

    Paging needs only two of them, because every request asks for a window one page can
    hold (`max_page_size` candles from `since`) and the ledger records only the span between
    the first and last candle an answer holds (`modes.pipeline.proven_span`): so it makes no
    difference whether an exchange answers an oversized window from its oldest end (Binance,
    Bybit) or its newest (OKX, Coinbase, KuCoin), or serves older candles from another
    endpoint with a smaller page (OKX's history-candles): a short answer costs one more
    request, never a candle. `reach_candles` is how deep an exchange serves history at all
    (Kraken: the newest 720 candles of any timeframe, whatever `since` says); older windows
    are reported as unavailable, not asked for. `week_origin_ms` is where weekly candles open.
    """

    max_page_size: int = 500
    ohlcv_request_cost: float = 1.0  # budget units one candle request consumes
    reach_candles: int | None = None
    week_origin_ms: int = MONDAY_WEEK_ORIGIN_MS
    # A ccxt implicit-API method answering Binance-style kline arrays for spot markets. Asking
    # it directly skips ccxt's per-candle parsing (about 10 µs a candle, most of our CPU), and
    # its body is parsed straight to floats (`klines_matrix`); ccxt still builds, sends and
    # error-checks the request.
    raw_klines_method: str | None = None
    used_weight: UsedWeightRule | None = None
    # Budget units a 24h-tickers request for many markets takes (`markets.limit` ranks by
    # volume). ccxt declares it per endpoint in `describe()['api']`; `tickers_api` names that
    # endpoint (api, method, path), and the ccxt adapter reads the cost from there.
    tickers_api: tuple[str, str, str] | None = None
    tickers_request_cost: float = 1.0

    def grid(self, timeframe: str) -> Grid:
        """Where `timeframe`'s candles open on this exchange (ValueError if unsupported)."""
        return grid_of(timeframe, self.week_origin_ms)


@dataclass(frozen=True)
class MarketInfo:
    symbol: str
    quote: str
    type: str
    active: bool
    id: str = ""  # the exchange's own market id (BTCUSDT), which archive paths use


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
