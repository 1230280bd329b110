"""The one door to the exchange: the only module that imports ccxt.

It builds the async ccxt client from the config's `ccxt:` options (verbatim, so users can point
it at testnets, proxies or a local server), loads markets once, measures the exchange's clock,
keeps per-exchange capabilities as data, and translates ccxt's exception tree into the
project's three kinds of fault in one place.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import ccxt.async_support as ccxt_async
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from ccxt.base import errors as ccxt_errors

from ..errors import ExchangeFault, PermanentFault, RateLimited, TransientFault, UsageError
from ..models import RawCandles
from ..timeframes import EPOCH_WEEK_ORIGIN_MS
from .source import Capabilities, MarketInfo, ThrottleRule, UsedWeightRule

# Facts checked against each exchange's documentation and ccxt's own code, each proven
# against a fake of that exchange's wire format in tests/support/fake_<exchange>.py;
# everything else falls back to what ccxt declares in `features` (page size) and to the
# defaults of `Capabilities`. Page sizes are what ccxt sends at most, not what the exchange
# would take: ccxt caps binanceusdm at 1000 (fapi takes 1500) and keeps only the oldest 300
# of a Coinbase answer (which takes 350).
KNOWN_CAPABILITIES: dict[str, Capabilities] = {
    "binance": Capabilities(
        max_page_size=1000,
        raw_klines_method="publicGetKlines",
        used_weight=UsedWeightRule("X-MBX-USED-WEIGHT-1M", limit=6000, window_s=60.0),
        tickers_api=("public", "get", "ticker/24hr"),  # weight 80 for all markets: cost 16
    ),
    "binanceus": Capabilities(max_page_size=1000),
    "binanceusdm": Capabilities(
        max_page_size=1000,
        used_weight=UsedWeightRule("X-MBX-USED-WEIGHT-1M", limit=2400, window_s=60.0),
        tickers_api=("fapiPublic", "get", "ticker/24hr"),  # weight 40 for all markets
    ),
    # Bybit refuses too many visits with retCode 10006 (HTTP 200) and the epoch ms its limit
    # resets at; an IP over its limit gets HTTP 403 and no header: a ban "lifted after at
    # least 10 minutes" (docs: Rate Limit; older pages say 30), which retries would prolong.
    "bybit": Capabilities(
        max_page_size=1000,
        throttle=ThrottleRule("X-Bapi-Limit-Reset-Timestamp", "epoch_ms", bans=((403, 600.0),)),
    ),
    # candles (the newest 1,440) and history-candles both answer at most 300 (ccxt #26705;
    # history-candles was 100 before 2025, which would cost requests, not candles).
    "okx": Capabilities(max_page_size=300),
    "coinbase": Capabilities(max_page_size=300),
    # KuCoin's weekly candles open on Thursday 00:00 UTC (kucoin-api-docs #350, #373).
    # Its 429000 refusals carry the pool's reset countdown in ms, not a Retry-After (docs: Rate
    # Limit, "Request Header").
    "kucoin": Capabilities(
        max_page_size=1500,
        week_origin_ms=EPOCH_WEEK_ORIGIN_MS,
        throttle=ThrottleRule("gw-ratelimit-reset", "ms"),
    ),
    # Kraken serves only the newest 720 candles of any interval, whatever `since` asks
    # (docs: Get OHLC Data); its weekly candles open on Thursday 00:00 UTC, the epoch's.
    "kraken": Capabilities(
        max_page_size=720, reach_candles=720, week_origin_ms=EPOCH_WEEK_ORIGIN_MS
    ),
}

# Answers ccxt leaves unclassified (a plain ExchangeError, which we would retry) that mean
# a market the exchange does not know: permanent, so the job fails at once.
EXTRA_EXACT_ERRORS: dict[str, dict[str, type[ccxt_errors.BaseError]]] = {
    "kraken": {"EQuery:Unknown asset pair": ccxt_errors.BadSymbol},
    "coinbase": {"NOT_FOUND": ccxt_errors.BadSymbol},
}


@dataclass
class _ResponseMeta:
    status: int | None = None
    headers: dict[str, str] | None = None
    body: str = ""
    parse_klines: bool = False  # try `klines_matrix` on a 200 body before ccxt parses it
    klines: np.ndarray | None = None
    json_body: bool = False  # ccxt parsed the body as JSON (an array, or an object like OKX's)
    sent_ms: int | None = None  # when the request left, on the exchange's clock


# Each asyncio task sees its own response metadata; ccxt's `last_response_headers` is shared
# by every concurrent request of an instance and would mix answers up.
_current_response: contextvars.ContextVar[_ResponseMeta | None] = contextvars.ContextVar(
    "tda_current_response", default=None
)


def _header(headers: Mapping[str, str] | None, wanted: str) -> str | None:
    """A header's value, whatever case the server spelled its name in."""
    wanted = wanted.lower()
    for name, value in (headers or {}).items():
        if name.lower() == wanted:
            return value
    return None


_KLINE_FIELDS = [f"f{i}" for i in range(6)]  # open time, open, high, low, close, volume
_KLINES_CSV_READ = pa_csv.ReadOptions(autogenerate_column_names=True, use_threads=False)
_KLINES_CSV_CONVERT = pa_csv.ConvertOptions(
    column_types=dict.fromkeys(_KLINE_FIELDS, pa.float64()), include_columns=_KLINE_FIELDS
)


def klines_matrix(body: str) -> np.ndarray | None:
    """A kline-array body (`[[0,"1.5",...],...]`, as Binance sends it) as an (n, 6) float64
    matrix, or None when the text is anything but that plain shape (then it is parsed as JSON).

    Read as CSV by Arrow: JSON parsing plus numpy's conversion of the price strings cost
    ~2 µs a candle, this ~1 µs. Arrow's float parsing is correctly rounded, as `float()` is.
    """
    text = body.strip()
    if text == "[]":
        return np.empty((0, 6))
    if not (text.startswith("[[") and text.endswith("]]")) or "\n" in text or "\r" in text:
        return None
    lines = text[2:-2].replace("],[", "\n").encode()  # one line a row, as nothing else breaks
    try:
        table = pa_csv.read_csv(
            pa.py_buffer(lines), read_options=_KLINES_CSV_READ, convert_options=_KLINES_CSV_CONVERT
        )
    except (pa.ArrowInvalid, pa.ArrowKeyError):  # another shape, or not numbers
        return None
    # The CSV reader skips empty lines, which an empty row (`[]`) would leave.
    if table.num_rows != lines.count(b"\n") + 1 or any(c.null_count for c in table.columns):
        return None
    return np.column_stack([column.to_numpy() for column in table.columns])


def translate(
    exc: Exception, meta: _ResponseMeta | None = None, throttle: ThrottleRule | None = None
) -> ExchangeFault:
    """Map a ccxt (or parsing) exception to transient / rate-limited / permanent; a refusal
    carries the wait the exchange asked for, read per its `throttle` rule."""
    status = meta.status if meta else None
    text = f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, ccxt_errors.DDoSProtection | ccxt_errors.RateLimitExceeded):
        if status is None or status < 400:  # Bybit refuses inside an HTTP 200 answer
            status = 418 if " 418 " in f" {exc} " else 429
        headers, sent_ms = (meta.headers or {}, meta.sent_ms or 0) if meta else ({}, 0)
        wait_s = (throttle or ThrottleRule()).wait_s(status, headers, sent_ms)
        return RateLimited(text, status=status, retry_after_s=wait_s)
    if isinstance(
        exc,
        ccxt_errors.BadRequest
        | ccxt_errors.AuthenticationError
        | ccxt_errors.NotSupported
        | ccxt_errors.ArgumentsRequired,
    ):
        return PermanentFault(text, status=status)
    # Network errors, timeouts, 5xx (ExchangeNotAvailable), bad responses, and unexpected
    # exchange answers are worth another try; a bounded retry policy stops the hopeless ones.
    return TransientFault(text, status=status)


class CcxtExchange:
    """An exchange source backed by ccxt.async_support; see `sources.CandleSource`."""

    def __init__(
        self,
        exchange_id: str,
        ccxt_options: dict[str, Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        exchange_class = getattr(ccxt_async, exchange_id, None)
        if exchange_id not in ccxt_async.exchanges or exchange_class is None:
            raise UsageError(f"exchanges.id: unknown ccxt exchange id {exchange_id!r}")
        # Our own limiter spaces every request of this exchange; ccxt's throttle would count
        # the same requests a second time, so it is off unless the options turn it on.
        options = {"enableRateLimit": False, **ccxt_options}
        self.id = exchange_id
        self._client = exchange_class(options)
        extra_errors = EXTRA_EXACT_ERRORS.get(exchange_id)
        if extra_errors:
            exact = self._client.exceptions.get("exact", {})
            self._client.exceptions = {
                **self._client.exceptions,
                "exact": {**exact, **extra_errors},
            }
        self._client.on_rest_response = self._record_response
        self._ccxt_json_loads = type(self._client).on_json_response
        self._client.on_json_response = self._record_json
        self._clock = clock
        self._clock_offset_ms = 0
        self._used_weight_header: str | None = None
        self._used_weight_listener: Callable[[int, int], None] | None = None
        known = KNOWN_CAPABILITIES.get(exchange_id)
        capabilities = known or Capabilities(max_page_size=self._declared_page_size())
        self.capabilities = replace(
            capabilities, tickers_request_cost=self._declared_tickers_cost(capabilities)
        )

    def _declared_tickers_cost(self, capabilities: Capabilities) -> float:
        """ccxt's cost of `capabilities.tickers_api` without a single symbol (its `noSymbol`),
        in ccxt's units, which are the budget's (`default_requests_per_second`)."""
        if capabilities.tickers_api is None:
            return capabilities.tickers_request_cost
        api, method, path = capabilities.tickers_api
        declared = ((self._client.api or {}).get(api) or {}).get(method, {}).get(path)
        if isinstance(declared, dict):
            declared = declared.get("noSymbol", declared.get("cost"))
        if isinstance(declared, int | float) and declared > 0:
            return float(declared)
        return capabilities.tickers_request_cost

    def _declared_page_size(self) -> int:
        features = getattr(self._client, "features", None) or {}
        for market_type in ("spot", "swap", "future"):
            limit = ((features.get(market_type) or {}).get("fetchOHLCV") or {}).get("limit")
            if isinstance(limit, int) and limit > 0:
                return limit
        return Capabilities().max_page_size

    def _record_response(
        self,
        code: int,
        reason: str,
        url: str,
        method: str,
        headers: Mapping[str, str] | None,
        body: str,
        req_headers: Any,
        req_body: Any,
    ) -> str:
        """ccxt's hook before it parses a body: what we return is what ccxt parses."""
        meta = _current_response.get()
        if self._used_weight_listener is not None:
            self._report_used_weight(headers, meta)
        if meta is not None:
            meta.status, meta.headers, meta.body = code, dict(headers or {}), body
            if meta.parse_klines and code == 200:
                meta.klines = klines_matrix(body)
                if meta.klines is not None:
                    return "[]"  # parsed already: spare ccxt the work
        return body.strip()

    def _report_used_weight(
        self, headers: Mapping[str, str] | None, meta: _ResponseMeta | None
    ) -> None:
        assert self._used_weight_header is not None and self._used_weight_listener is not None
        value = (_header(headers, self._used_weight_header) or "").strip()
        if value.isdigit():
            sent_ms = meta.sent_ms if meta is not None else None
            self._used_weight_listener(int(value), self.now_ms() if sent_ms is None else sent_ms)

    def watch_used_weight(self, header: str, listener: Callable[[int, int], None]) -> None:
        """Call `listener(used_weight, sent_ms)` for every answer carrying `header`, any status;
        `sent_ms` is when that request left, on the exchange's clock."""
        self._used_weight_header, self._used_weight_listener = header, listener

    def _record_json(self, text: str) -> Any:
        """ccxt's JSON parsing, noting whether the body was JSON at all: ccxt turns a body it
        cannot parse into None, and its OHLCV parser turns None into no candles. Exchanges
        wrap their rows differently (Binance: a bare array; OKX `{"code":"0","data":[...]}`;
        Bybit `{"retCode":0,"result":{"list":[...]}}`), and ccxt's parser knows each shape."""
        parsed = self._ccxt_json_loads(text)
        meta = _current_response.get()
        if meta is not None:
            meta.json_body = isinstance(parsed, list | dict)
        return parsed

    @property
    def default_requests_per_second(self) -> float:
        """ccxt's own idea of the budget (`rateLimit` is milliseconds between requests)."""
        return 1000.0 / float(self._client.rateLimit or 1000)

    @property
    def timeframes(self) -> set[str]:
        return set((self._client.timeframes or {}).keys())

    def now_ms(self) -> int:
        """The exchange's clock, as measured at `open`."""
        return int(self._clock() * 1000) + self._clock_offset_ms

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result, _ = await self._call_with_meta(method, *args, **kwargs)
        return result

    async def _call_with_meta(
        self, method: str, *args: Any, parse_klines: bool = False, **kwargs: Any
    ) -> tuple[Any, _ResponseMeta]:
        meta = _ResponseMeta(parse_klines=parse_klines, sent_ms=self.now_ms())
        token = _current_response.set(meta)
        try:
            return await getattr(self._client, method)(*args, **kwargs), meta
        except (ccxt_errors.BaseError, ValueError, TypeError, KeyError, IndexError) as exc:
            # Non-ccxt exceptions here come from ccxt parsing a garbled body.
            raise translate(exc, meta, self.capabilities.throttle) from exc
        finally:
            _current_response.reset(token)

    async def open(self) -> None:
        """Load markets once and measure the exchange's clock offset."""
        await self._call("load_markets")
        if self._client.has.get("fetchTime"):
            sent = self._clock()
            server_ms = await self._call("fetch_time")
            midpoint = (sent + self._clock()) / 2
            if isinstance(server_ms, int | float):
                self._clock_offset_ms = int(server_ms - midpoint * 1000)

    def markets(self) -> list[MarketInfo]:
        return [
            MarketInfo(
                symbol=m["symbol"],
                quote=m.get("quote") or "",
                type=m.get("type") or "",
                active=m.get("active") is not False,
                id=str(m.get("id") or ""),
            )
            for m in (self._client.markets or {}).values()
        ]

    async def quote_volumes(self, symbols: list[str]) -> dict[str, float]:
        """24h quote volume per symbol, or {} where the exchange cannot say."""
        if not self._client.has.get("fetchTickers") or not symbols:
            return {}
        tickers = await self._call("fetch_tickers", symbols)
        return {
            symbol: float(t["quoteVolume"])
            for symbol, t in tickers.items()
            if isinstance(t, dict) and isinstance(t.get("quoteVolume"), int | float)
        }

    async def fetch_ohlcv(
        self, symbol: str, timeframe: str, since_ms: int, until_ms: int, limit: int
    ) -> RawCandles:
        """Candles opening in [since_ms, until_ms] (inclusive, as ccxt's `until`), oldest first.

        Rows start with [open_ms, open, high, low, close, volume], as numbers or numeric strings
        (or, from the klines fast path, as an (n, 6) float64 matrix).
        """
        method = self.capabilities.raw_klines_method
        if method and self._client.market(symbol).get("spot"):
            return await self._raw_klines(method, symbol, timeframe, since_ms, until_ms, limit)
        rows, meta = await self._call_with_meta(
            "fetch_ohlcv", symbol, timeframe, since_ms, limit, {"until": until_ms}
        )
        if not isinstance(rows, list):
            raise TransientFault(f"unexpected OHLCV payload of type {type(rows).__name__}")
        if not meta.json_body:
            # ccxt turns an unparsable body (truncated JSON, an HTML error page) into [] or junk
            # rows, which would read as "no candles from here on" and skip real data.
            raise TransientFault(
                f"unparsable response body: {meta.body[:80]!r}", status=meta.status
            )
        return rows

    async def _raw_klines(
        self, method: str, symbol: str, timeframe: str, since_ms: int, until_ms: int, limit: int
    ) -> RawCandles:
        request = {
            "symbol": self._client.market_id(symbol),
            "interval": self._client.timeframes[timeframe],
            "startTime": since_ms,
            "endTime": until_ms,
            "limit": limit,
        }
        rows, meta = await self._call_with_meta(method, request, parse_klines=True)
        if meta.klines is not None:
            return meta.klines
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows[:1]):
            raise TransientFault(f"unparsable klines body: {str(rows)[:80]!r}")
        return [row[:6] for row in rows]

    async def close(self) -> None:
        await self._client.close()
