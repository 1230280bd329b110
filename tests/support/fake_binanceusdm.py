"""Fake Binance USDⓈ-M futures REST server: the `fapi` wire format real ccxt
(`ccxt.async_support.binanceusdm`) reads.

It serves the candle world of `fake_exchange` (same symbols, listings, maintenance gaps, clock,
request log, budgets, `X-MBX-USED-WEIGHT-1M` and injected faults, all Binance-shaped as fapi's
are) as perpetual contracts: `SymbolSpec("BTC/USDT")` is the market `BTCUSDT`, ccxt's
`BTC/USDT:USDT`, with the same candles as the spot fake's `BTC/USDT`.

- `GET /fapi/v1/exchangeInfo`: `contractType: PERPETUAL`, `marginAsset`, `onboardDate` (the
  listing), fapi filters; `GET /fapi/v1/time`, `GET /fapi/v1/ping`, `GET /fapi/v1/ticker/24hr`.
- `GET /fapi/v1/klines?symbol=&interval=&startTime=&endTime=&limit=`: times in ms; `limit`
  default 500, at most 1,500 (more is error -1130); with `startTime` the **oldest** `limit`
  candles from it (open time >= startTime, <= endTime), without it the newest up to `endTime`
  (or now); oldest first; the 12-field kline rows of spot; the candle in progress is the last
  row, unflagged (its close time lies in the future). Request weight by `limit`: 1 below 100,
  2 below 500, 5 up to 1,000, 10 above. No depth limit: candles exist from the listing on.
- Errors: `{"code": -1121, "msg": "Invalid symbol."}` (HTTP 400), -1120 for a bad interval,
  -1130 for a bad limit, -1003 with Retry-After on 429/418.

Checked against: Binance's USDⓈ-M "Kline/Candlestick Data" doc (`/fapi/v1/klines`, limit
default 500 max 1500, weight by limit [1,100) 1, [100,500) 2, [500,1000] 5, > 1000 10; most
recent klines without startTime/endTime) and "Exchange Information"; ccxt 4.5.90 `binance.py`
(`fetch_ohlcv`: `startTime` = since, `endTime` = until, `limit` = min(limit, 1000): ccxt never asks
for more than 1,000; `fetch_markets` with `options.fetchMarkets.types = ["linear"]` reads only
`/fapi/v1/exchangeInfo`; `parse_market`; `fetch_time` -> `fapiPublicGetTime`; the -1121 etc.
mappings) and `binanceusdm.py` (`describe`). Weekly candles open on Monday, as on spot.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web
from fake_exchange import (
    TIMEFRAME_MS,
    FakeExchange,
    RequestRecord,
    SymbolSpec,
    _ApiError,
    _int_param,
    _json_response,
    _open_ticks,
    _price_params,
    _render,
    _runs,
    _take,
    _ticker,
)

FAPI = "/fapi/v1/"
KLINES_PATH = FAPI + "klines"
DEFAULT_LIMIT = 500
MAX_LIMIT = 1500
CCXT_MAX_LIMIT = 1000  # binance.fetch_ohlcv: min(limit, 1000), also for fapi
FAPI_WEIGHT_PER_MINUTE = 2400

# The weight of the request being served: set before the base fake's gate counts it.
_request_weight: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "fake_fapi_request_weight", default=None
)


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    """ccxt constructor options pointing binanceusdm's public fapi at the fake."""
    return {
        "urls": {
            "api": {
                "fapiPublic": base_url + "/fapi/v1",
                "fapiPublicV2": base_url + "/fapi/v2",
                "fapiPublicV3": base_url + "/fapi/v3",
            }
        },
        "options": {"fetchMarkets": {"types": ["linear"]}, "fetchCurrencies": False},
        "timeout": timeout_ms,
    }


def market_id(symbol: str) -> str:
    """fapi's id of `BTC/USDT` or `BTC/USDT:USDT`: `BTCUSDT`."""
    return symbol.split(":")[0].replace("/", "")


def klines_weight(limit: int) -> int:
    """Request weight of /fapi/v1/klines by its `limit`, as the doc's table gives it."""
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    return 5 if limit <= 1000 else 10


class _WeightedBudget:
    """The base fake's rate budget, counting the weight of the request being served."""

    def __init__(self, budget: Any) -> None:
        self._budget = budget

    def __getattr__(self, name: str) -> Any:
        return getattr(self._budget, name)

    def count(self, exchange_now: float, weight: int) -> int:
        return self._budget.count(exchange_now, _request_weight.get() or weight)

    def reject(self, now: float, weight: int, *args: Any) -> tuple[str, int] | None:
        return self._budget.reject(now, _request_weight.get() or weight, *args)


class FakeBinanceUsdm(FakeExchange):
    """Binance USDⓈ-M futures look-alike; see the module docstring. Knobs are FakeExchange's."""

    def __init__(self, symbols: list[SymbolSpec] | None = None, **knobs: Any) -> None:
        super().__init__(symbols, **knobs)
        self._budget = _WeightedBudget(self._budget)

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._weigh, self._gate])
        for name, handler in (
            ("ping", self._ping),
            ("time", self._time),
            ("exchangeInfo", self._futures_exchange_info),
            ("klines", self._futures_klines),
            ("ticker/24hr", self._ticker_24hr),
        ):
            app.router.add_get(FAPI + name, handler)
        return app

    def inject(
        self,
        kind: str,
        count: int = 1,
        path: str | None = KLINES_PATH,
        retry_after: int | None = None,
    ) -> None:
        """`FakeExchange.inject`, with `path` the full request path (default: the klines)."""
        super().inject(kind, count, path, retry_after)

    def candle_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged klines requests, optionally for one symbol (`BTC/USDT:USDT` or `BTCUSDT`)."""
        wanted = market_id(symbol) if symbol else None
        return [
            r
            for r in self.request_log()
            if r.path == KLINES_PATH and wanted in (None, r.params.get("symbol"))
        ]

    @web.middleware
    async def _weigh(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        weight = 1
        if request.path == KLINES_PATH:
            limit = request.query.get("limit", "")
            weight = klines_weight(int(limit) if limit.isdigit() else DEFAULT_LIMIT)
        elif request.path == FAPI + "ticker/24hr" and "symbol" not in request.query:
            weight = 40
        token = _request_weight.set(weight)
        try:
            return await handler(request)
        finally:
            _request_weight.reset(token)

    async def _futures_exchange_info(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "timezone": "UTC",
                "serverTime": self._now_ms(),
                "futuresType": "U_MARGINED",
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": FAPI_WEIGHT_PER_MINUTE,
                    },
                    {
                        "rateLimitType": "ORDERS",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": 1200,
                    },
                ],
                "exchangeFilters": [],
                "assets": [{"asset": "USDT", "marginAvailable": True, "autoAssetExchange": "0"}],
                "symbols": [_futures_market(s) for s in self.specs.values()],
            }
        )

    async def _futures_klines(self, request: web.Request) -> web.Response:
        query = request.query
        spec = self._spec(query.get("symbol"))
        timeframe = query.get("interval")
        if timeframe not in TIMEFRAME_MS:
            raise _ApiError(400, -1120, "Invalid interval.")
        limit = _int_param(query, "limit")
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise _ApiError(400, -1130, "Data sent for parameter 'limit' is not valid.")
        start, end = _int_param(query, "startTime"), _int_param(query, "endTime")
        if start is not None and end is not None and start > end:
            raise _ApiError(400, -1023, "Start time is greater than end time.")
        now_ms = self._now_ms()
        hi = now_ms if end is None else min(end, now_ms)
        lo = -(2**62) if start is None else start
        runs = _take(_runs(spec, timeframe, lo, hi), limit, newest=start is None)
        return web.Response(
            text="[" + ",".join(self._kline_parts(spec, timeframe, runs, now_ms)) + "]",
            content_type="application/json",
        )

    def _kline_parts(
        self, spec: SymbolSpec, timeframe: str, runs: list[range], now_ms: int
    ) -> list[str]:
        tf_ms = TIMEFRAME_MS[timeframe]
        parts: list[str] = []
        open_row = None
        if runs and runs[-1][-1] + tf_ms > now_ms:  # the candle in progress
            open_ms = runs[-1][-1]
            ticks = _open_ticks(spec.symbol, timeframe, open_ms, now_ms)
            open_row = _render(spec.symbol, tf_ms, np.array([open_ms]), ticks)[0]
            runs = [*runs[:-1], runs[-1][:-1]]
        for run in runs:
            if run:
                parts.extend(self._cache.slices(spec.symbol, timeframe, run))
        if open_row is not None:
            parts.append(open_row)
        return parts

    async def _ticker_24hr(self, request: web.Request) -> web.Response:
        now_ms = self._now_ms()
        if "symbol" in request.query:
            return _json_response(_ticker(self._spec(request.query["symbol"]), now_ms))
        return _json_response([_ticker(spec, now_ms) for spec in self.specs.values()])


def _futures_market(spec: SymbolSpec) -> dict:
    """A fapi exchangeInfo symbol entry with the fields and filters ccxt's parse_market reads."""
    base, quote = spec.symbol.split("/")
    decimals = _price_params(spec.symbol)[1]
    tick = f"{10.0**-decimals:.{decimals}f}" if decimals else "1"
    return {
        "symbol": spec.id,
        "pair": spec.id,
        "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000,
        "onboardDate": spec.listed_at_ms,
        "status": spec.status,
        "maintMarginPercent": "2.5000",
        "requiredMarginPercent": "5.0000",
        "baseAsset": base,
        "quoteAsset": quote,
        "marginAsset": quote,
        "pricePrecision": decimals,
        "quantityPrecision": 3,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "underlyingType": "COIN",
        "underlyingSubType": [],
        "settlePlan": 0,
        "triggerProtect": "0.0500",
        "liquidationFee": "0.012500",
        "marketTakeBound": "0.05",
        "maxMoveOrderLimit": 10000,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "4529764",
                "tickSize": tick,
            },
            {"filterType": "LOT_SIZE", "minQty": "0.001", "maxQty": "1000", "stepSize": "0.001"},
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": "0.001",
                "maxQty": "120",
                "stepSize": "0.001",
            },
            {"filterType": "MAX_NUM_ORDERS", "limit": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
            {"filterType": "MIN_NOTIONAL", "notional": "100"},
            {
                "filterType": "PERCENT_PRICE",
                "multiplierUp": "1.0500",
                "multiplierDown": "0.9500",
                "multiplierDecimal": "4",
            },
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
    }
