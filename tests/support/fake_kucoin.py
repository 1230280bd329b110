"""Fake KuCoin spot REST server: the wire format real ccxt (`ccxt.async_support.kucoin`) reads.

It serves the candle world of `fake_exchange` (same symbols, listings, maintenance gaps, clock,
request log, budgets and injected faults) in KuCoin's shapes:

- `GET /api/v2/symbols`: spot markets, ids `BASE-QUOTE` (ccxt `kucoin.fetch_markets`, spot only
  with `options.fetchMarkets.types = ["spot"]`); `GET /api/v1/market/allTickers` for the ticker
  fees and 24h volumes ccxt asks for unless `fetchMarkets.fetchTickersFees` is false.
- `GET /api/v1/timestamp`: `{"code": "200000", "msg": "success", "data": <ms>}`.
- `GET /api/v1/market/candles?symbol=&type=1min&startAt=<s>&endAt=<s>`: times in **seconds**;
  candles whose open time lies in `[startAt, endAt)` (endAt 0 or absent: now); at most 1,500 a
  request, the **newest** of the window, answered newest first; rows
  `["<open s>", "<open>", "<close>", "<high>", "<low>", "<volume>", "<turnover>"]` (strings;
  note close before high/low); the candle in progress is the first row, unflagged. No depth
  limit: candles exist from the listing on.
- Errors as KuCoin sends them: `{"code": "400100", "msg": ...}` for a bad parameter or pair,
  `{"code": "429000", ...}` (HTTP 429, `gw-ratelimit-reset` in ms, no Retry-After) for the rate
  limit, `{"code": "500000", ...}` for 5xx. Faults injected with `inject` (Binance-shaped in the
  base fake) are rewritten into these shapes.

Checked against: KuCoin's "Get Klines" doc (`/api/v1/market/candles`, startAt/endAt in seconds,
"at most 1500 pieces of data ... page the data by time", types 1min ... 1month, row order time,
open, close, high, low, volume, turnover); ccxt 4.5.90 `kucoin.py` (`fetch_spot_ohlcv`: startAt
= floor(since / 1000), endAt = floor((since + limit * tf) / 1000), `until` is passed through as
an unknown query parameter; `parse_ohlcv` reads a <= 10-digit time as seconds and columns
[0, 1, 3, 4, 2, 5]; `fetch_markets`, `fetch_time`, `handle_errors`, `exceptions`), and
Kucoin/kucoin-api-docs issues #350 and #373 (weekly candles open on Thursday 00:00 UTC).

Not modelled: `1week` (KuCoin's weeks open on Thursday, the candle world's on Monday) and
`1month` (calendar months); asking for them is a 400100 naming the fake's limit. Which end of
the window is exclusive is not documented; half-open `[startAt, endAt)` is assumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import web
from fake_exchange import (
    TIMEFRAME_MS,
    FakeExchange,
    RequestRecord,
    SymbolSpec,
    _price_params,
    _runs,
    _take,
    candle,
    provisional_candle,
)

MAX_CANDLES = 1500  # "For each query, the system would return at most 1500 pieces of data."
CANDLES_PATH = "/api/v1/market/candles"
SYMBOLS_PATH = "/api/v2/symbols"
TIME_PATH = "/api/v1/timestamp"
TICKERS_PATH = "/api/v1/market/allTickers"
KUCOIN_TYPES = {  # KuCoin's candle type -> the candle world's timeframe
    "1min": "1m",
    "3min": "3m",
    "5min": "5m",
    "15min": "15m",
    "30min": "30m",
    "1hour": "1h",
    "2hour": "2h",
    "4hour": "4h",
    "6hour": "6h",
    "8hour": "8h",
    "12hour": "12h",
    "1day": "1d",
}
UNMODELLED_TYPES = ("1week", "1month")
_RATE_LIMITED = {"code": "429000", "msg": "Too many requests. System-level rate limit exceeded."}


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    """ccxt constructor options pointing kucoin's spot API at the fake (and nothing else)."""
    return {
        "urls": {"api": {"public": base_url, "private": base_url}},
        "options": {"fetchMarkets": {"types": ["spot"], "fetchTickersFees": False}},
        "has": {"fetchCurrencies": False},  # else load_markets asks /api/v3/currencies first
        "timeout": timeout_ms,
    }


def market_id(symbol: str) -> str:
    """KuCoin's id of a unified spot symbol: `BTC/USDT` -> `BTC-USDT`."""
    return symbol.replace("/", "-")


def _decimal(value: float) -> str:
    """The shortest positional decimal that parses back to exactly `value` (as ccxt does)."""
    return np.format_float_positional(value, trim="-")


def _row(values: tuple) -> list[str]:
    open_ms, o, h, low, c, volume = values
    turnover = volume * (o + c) / 2
    return [str(open_ms // 1000), *map(_decimal, (o, c, h, low, volume)), _decimal(turnover)]


def _kucoin_json(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(obj, separators=(",", ":")), content_type="application/json"
    )


def _bad_request(msg: str) -> web.Response:
    return _kucoin_json({"code": "400100", "msg": msg}, 400)


def _seconds(query: Any, name: str) -> int | None:
    value = query.get(name)
    try:
        return None if value in (None, "") else int(value)
    except ValueError:
        return None


def _binance_error(response: web.StreamResponse) -> dict | None:
    """The base fake's own error body (`{"code": <int>, "msg"}`), or None for anything else."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    try:
        body = json.loads(response.text or "")
    except ValueError:
        return None
    return body if isinstance(body, dict) and isinstance(body.get("code"), int) else None


class FakeKucoin(FakeExchange):
    """KuCoin spot look-alike; see the module docstring. Knobs are `FakeExchange`'s."""

    def __init__(self, symbols: list[SymbolSpec] | None = None, **knobs: Any) -> None:
        super().__init__(symbols, **knobs)
        self.by_kucoin_id = {market_id(s.symbol): s for s in self.specs.values()}

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._kucoin_shape, self._gate])
        for path, handler in (
            (SYMBOLS_PATH, self._symbols),
            (TIME_PATH, self._timestamp),
            (CANDLES_PATH, self._candles),
            (TICKERS_PATH, self._all_tickers),
        ):
            app.router.add_get(path, handler)
        return app

    def inject(
        self,
        kind: str,
        count: int = 1,
        path: str | None = CANDLES_PATH,
        retry_after: int | None = None,
    ) -> None:
        """`FakeExchange.inject`, with `path` the full request path (default: the candles)."""
        super().inject(kind, count, path, retry_after)

    def candle_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged candle requests, optionally for one symbol (`BTC/USDT` or `BTC-USDT`)."""
        wanted = market_id(symbol) if symbol else None
        return [
            r
            for r in self.request_log()
            if r.path == CANDLES_PATH and wanted in (None, r.params.get("symbol"))
        ]

    # ---- KuCoin's error shapes around the base fake's budget and fault injection

    @web.middleware
    async def _kucoin_shape(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        retry_after = response.headers.get("Retry-After")
        response.headers.pop("X-MBX-USED-WEIGHT-1M", None)  # Binance's header, not KuCoin's
        if _binance_error(response) is None:
            return response
        if response.status in (418, 429):  # KuCoin has no 418 bans: every refusal is a 429
            reshaped = _kucoin_json(_RATE_LIMITED, 429)
            reset_ms = int(float(retry_after or 1) * 1000)
            reshaped.headers.update(
                {
                    "gw-ratelimit-limit": "2000",
                    "gw-ratelimit-remaining": "0",
                    "gw-ratelimit-reset": str(reset_ms),
                }
            )
            return reshaped
        if response.status >= 500:
            return _kucoin_json({"code": "500000", "msg": "Internal Server Error"}, response.status)
        return _bad_request("Parameter error")

    # ---- endpoints

    async def _timestamp(self, request: web.Request) -> web.Response:
        return _kucoin_json({"code": "200000", "msg": "success", "data": self._now_ms()})

    async def _symbols(self, request: web.Request) -> web.Response:
        return _kucoin_json({"code": "200000", "data": [_market(s) for s in self.specs.values()]})

    async def _all_tickers(self, request: web.Request) -> web.Response:
        now_ms = self._now_ms()
        tickers = [_ticker(spec, now_ms) for spec in self.specs.values()]
        return _kucoin_json({"code": "200000", "data": {"time": now_ms, "ticker": tickers}})

    async def _candles(self, request: web.Request) -> web.Response:
        query = request.query
        spec = self.by_kucoin_id.get(query.get("symbol", ""))
        if spec is None:
            return _bad_request("This pair is not provided at present")
        kind = query.get("type", "")
        if kind in UNMODELLED_TYPES:
            return _bad_request(f"fake_kucoin does not model {kind} candles")
        timeframe = KUCOIN_TYPES.get(kind)
        if timeframe is None:
            return _bad_request("Unsupported type")
        start_s, end_s = _seconds(query, "startAt"), _seconds(query, "endAt")
        if (start_s is None and "startAt" in query) or (end_s is None and "endAt" in query):
            return _bad_request("startAt and endAt must be integers (seconds)")
        now_ms = self._now_ms()
        lo = (start_s or 0) * 1000
        hi = min(now_ms, end_s * 1000 - 1) if end_s else now_ms  # endAt exclusive; 0 is now
        rows = self._rows(spec, timeframe, lo, hi, now_ms) if lo <= hi else []
        return _kucoin_json({"code": "200000", "data": rows})

    def _rows(
        self, spec: SymbolSpec, timeframe: str, lo: int, hi: int, now_ms: int
    ) -> list[list[str]]:
        """The newest MAX_CANDLES candles opening in [lo, hi], newest first."""
        tf_ms = TIMEFRAME_MS[timeframe]
        runs = _take(_runs(spec, timeframe, lo, hi), MAX_CANDLES, newest=True)
        rows = []
        for run in reversed(runs):
            for open_ms in reversed(run):
                if open_ms + tf_ms > now_ms:  # the candle in progress, as it stands now
                    values = provisional_candle(spec.symbol, timeframe, open_ms, now_ms)
                else:
                    values = candle(spec.symbol, timeframe, open_ms)
                rows.append(_row(values))
        return rows


def _market(spec: SymbolSpec) -> dict:
    """A `/api/v2/symbols` entry with the fields ccxt's kucoin.fetch_markets reads."""
    base, quote = spec.symbol.split("/")
    decimals = _price_params(spec.symbol)[1]
    return {
        "symbol": market_id(spec.symbol),
        "name": market_id(spec.symbol),
        "baseCurrency": base,
        "quoteCurrency": quote,
        "feeCurrency": quote,
        "market": "USDS",
        "baseMinSize": "0.001",
        "quoteMinSize": "0.1",
        "baseMaxSize": "10000000000",
        "quoteMaxSize": "99999999",
        "baseIncrement": "0.001",
        "quoteIncrement": "0.000001",
        "priceIncrement": f"{10.0**-decimals:.{decimals}f}" if decimals else "1",
        "priceLimitRate": "0.1",
        "minFunds": "0.1",
        "isMarginEnabled": False,
        "enableTrading": spec.status == "TRADING",
        "feeCategory": 1,
        "makerFeeCoefficient": "1.00",
        "takerFeeCoefficient": "1.00",
        "st": False,
    }


def _ticker(spec: SymbolSpec, now_ms: int) -> dict:
    """An allTickers entry: prices follow the current day's candle, volValue is the spec's."""
    day_open = now_ms - now_ms % TIMEFRAME_MS["1d"]
    _, o, h, low, c, _ = provisional_candle(spec.symbol, "1d", day_open, now_ms)
    return {
        "symbol": market_id(spec.symbol),
        "symbolName": market_id(spec.symbol),
        "buy": _decimal(c),
        "sell": _decimal(c),
        "changeRate": f"{(c - o) / o:.4f}",
        "changePrice": _decimal(c - o),
        "high": _decimal(h),
        "low": _decimal(low),
        "vol": f"{spec.volume_24h / c:.8f}",
        "volValue": f"{spec.volume_24h:.8f}",
        "last": _decimal(c),
        "averagePrice": _decimal((o + c) / 2),
        "takerFeeRate": "0.001",
        "makerFeeRate": "0.001",
        "takerCoefficient": "1",
        "makerCoefficient": "1",
    }
