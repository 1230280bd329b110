"""The exchange seam: what the collector needs from an exchange, and the values it answers with.

Everything above it (paging, live scheduling, progress) is written against `CandleSource`, so a
new exchange library plugs in without touching the rest, and tests put fakes here. The only
implementation over the wire is `ccxt_source.CcxtExchange`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

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
class ThrottleRule:
    """How an exchange says how long a refused client must wait, where it differs from a
    standard Retry-After in seconds.

    `wait_header` carries the wait, read per `wait_unit`: seconds, milliseconds from now
    (KuCoin's `gw-ratelimit-reset`), or the epoch ms at which the limit resets (Bybit's
    `X-Bapi-Limit-Reset-Timestamp`). `bans` maps HTTP statuses that mean an IP ban sent
    without any wait header to the least the ban lasts (Bybit: 403, lifted after 10 minutes
    at the earliest); asking again sooner only prolongs it.
    """

    wait_header: str = "Retry-After"
    wait_unit: Literal["s", "ms", "epoch_ms"] = "s"
    bans: tuple[tuple[int, float], ...] = ()

    def wait_s(self, status: int | None, headers: Mapping[str, str], now_ms: int) -> float | None:
        """Seconds to wait before asking again, or None when the answer does not say."""
        value = next((v for k, v in headers.items() if k.lower() == self.wait_header.lower()), None)
        try:
            number = float(value) if value is not None else None
        except ValueError:
            number = None
        if number is not None:
            seconds = {"s": number, "ms": number / 1000, "epoch_ms": (number - now_ms) / 1000}
            return max(0.0, seconds[self.wait_unit])
        return dict(self.bans).get(status) if status is not None else None


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
    throttle: ThrottleRule = ThrottleRule()

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
