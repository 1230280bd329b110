"""Fake Bybit v5 spot REST server: the wire format real ccxt (`ccxt.async_support.bybit`) reads.

It serves the candle world of `fake_exchange` (symbols, listings, maintenance gaps, clock,
request log, budgets and injected faults) in Bybit's v5 shapes:

- `GET /v5/market/instruments-info?category=spot`: spot instruments, ids `BASEQUOTE`, all in
  one page (Bybit does not page spot). `GET /v5/market/time`: `result.timeSecond/timeNano`
  and the envelope's `time` in ms.
- `GET /v5/market/kline?category=spot&symbol=&interval=&start=&end=&limit=`: times in ms;
  the candle *containing* `start` is the first one (start is floored to its candle), candles
  open up to and including `end` (default now); `limit` defaults to 200, at most 1,000. With
  `start`, a window holding more than `limit` candles is answered from its **oldest** end
  (the `limit` candles from `start`); without `start`, the newest `limit` up to `end`. The list
  is sorted newest first ("Sort in reverse by startTime"). Rows
  `["startTime", "open", "high", "low", "close", "volume", "turnover"]`, all strings; the
  candle in progress is the first row, unflagged (the REST kline has no `confirm`).
- Intervals `1 3 5 15 30 60 120 240 360 720 D W` (weeks open Monday 00:00 UTC, as the candle
  world's). Not modelled: `M` (calendar months): a 10001 naming the fake's limit.
- Errors as Bybit sends them, `{"retCode": <int>, "retMsg", "result": {}, "retExtInfo": {},
  "time"}` with HTTP 200: 10001 "Not supported symbols" (ccxt: BadSymbol) and other bad
  parameters (BadRequest), 10006 "Too many visits!" for the rate limit (with the
  `X-Bapi-Limit-*` headers, no Retry-After), 10016 for an internal error (HTTP 500); an IP
  ban is HTTP 403 with a plain-text body (ccxt: RateLimitExceeded). Faults injected with
  `inject` (Binance-shaped in the base fake) are rewritten into these ('418' -> the 403 ban).

Checked against: Bybit v5 docs "Get Kline" (`/v5/market/kline`, start/end in ms, limit
[1, 1000] default 200, list "sort in reverse by startTime", row fields) and "Rate limit"
(retCode 10006, `X-Bapi-Limit-Reset-Timestamp`; HTTP 403 "access too frequent" IP ban);
ccxt 4.5.90 `bybit.py` (`fetch_ohlcv`: `start = ceil(since / tf) * tf`, `end = until`,
`limit` default 200 and not capped by ccxt; `parse_ohlcv` volume index 5; `fetch_spot_markets`,
`fetch_time`, `handle_errors`, `exceptions` incl. broad 'Not supported symbols', and
`httpExceptions` 403). Uncertain: which end an oversized window is answered from is not
documented; the oldest end follows ccxt #26736 and pybit #186. That the candle containing
`start` is returned follows ro-soku #3. A `limit` above 1,000 is assumed clamped.
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

KLINE_PATH = "/v5/market/kline"
INSTRUMENTS_PATH = "/v5/market/instruments-info"
TIME_PATH = "/v5/market/time"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 200
BYBIT_INTERVALS = {  # Bybit interval -> the candle world's timeframe
    "1": "1m",
    "3": "3m",
    "5": "5m",
    "15": "15m",
    "30": "30m",
    "60": "1h",
    "120": "2h",
    "240": "4h",
    "360": "6h",
    "720": "12h",
    "D": "1d",
    "W": "1w",
}
_MONDAY_OFFSET_MS = 4 * 86_400_000
_API_KEYS = ("spot", "futures", "v2", "public", "private")


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    """ccxt constructor options pointing bybit's REST API at the fake, spot markets only."""
    return {
        "urls": {"api": dict.fromkeys(_API_KEYS, base_url)},
        "options": {"fetchMarkets": {"types": ["spot"]}},
        "timeout": timeout_ms,
    }


def market_id(symbol: str) -> str:
    """Bybit's id of a unified spot symbol: `BTC/USDT` -> `BTCUSDT`."""
    return symbol.replace("/", "")


def _decimal(value: float) -> str:
    """The shortest positional decimal that parses back to exactly `value` (as ccxt does)."""
    return np.format_float_positional(value, trim="-")


def _row(values: tuple) -> list[str]:
    open_ms, o, h, low, c, volume = values
    turnover = _decimal(volume * (o + c) / 2)
    return [str(open_ms), *map(_decimal, (o, h, low, c, volume)), turnover]


def _binance_error(response: web.StreamResponse) -> dict | None:
    """The base fake's own error body (`{"code": <int>, "msg"}`), or None for anything else."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    try:
        body = json.loads(response.text or "")
    except ValueError:
        return None
    return body if isinstance(body, dict) and isinstance(body.get("code"), int) else None


def _ms_param(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise _BadParam(f"params error: {name} invalid") from None


class _BadParam(Exception):
    pass


class FakeBybit(FakeExchange):
    """Bybit v5 spot look-alike; see the module docstring. Knobs are `FakeExchange`'s."""

    def __init__(self, symbols: list[SymbolSpec] | None = None, **knobs: Any) -> None:
        super().__init__(symbols, **knobs)

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._bybit_shape, self._gate])
        app.router.add_get(INSTRUMENTS_PATH, self._instruments)
        app.router.add_get(TIME_PATH, self._time_now)
        app.router.add_get(KLINE_PATH, self._kline)
        return app

    def inject(
        self,
        kind: str,
        count: int = 1,
        path: str | None = KLINE_PATH,
        retry_after: int | None = None,
    ) -> None:
        """`FakeExchange.inject`, with `path` the full request path (default: the klines)."""
        super().inject(kind, count, path, retry_after)

    def candle_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged kline requests, optionally for one symbol (`BTC/USDT` or `BTCUSDT`)."""
        wanted = market_id(symbol) if symbol else None
        return [
            r
            for r in self.request_log()
            if r.path == KLINE_PATH and wanted in (None, r.params.get("symbol"))
        ]

    def _envelope(self, result: object, code: int = 0, msg: str = "OK") -> dict:
        return {
            "retCode": code,
            "retMsg": msg,
            "result": result,
            "retExtInfo": {},
            "time": self._now_ms(),
        }

    def _json(self, obj: object, status: int = 200) -> web.Response:
        text = json.dumps(obj, separators=(",", ":"))
        return web.Response(status=status, text=text, content_type="application/json")

    def _error(self, code: int, msg: str, status: int = 200) -> web.Response:
        return self._json(self._envelope({}, code, msg), status)

    # ---- Bybit's error shapes around the base fake's budget and fault injection

    @web.middleware
    async def _bybit_shape(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        retry_after = response.headers.get("Retry-After")
        response.headers.pop("X-MBX-USED-WEIGHT-1M", None)  # Binance's header, not Bybit's
        if _binance_error(response) is None:
            return response
        if response.status == 418:  # Bybit's IP ban: HTTP 403, not JSON
            return web.Response(status=403, text="403 Forbidden: access too frequent")
        if response.status == 429:  # Bybit refuses with HTTP 200 and retCode 10006
            reshaped = self._error(10006, "Too many visits!")
            reset_ms = self._now_ms() + int(float(retry_after or 1) * 1000)
            reshaped.headers.update(
                {
                    "X-Bapi-Limit": "600",
                    "X-Bapi-Limit-Status": "0",
                    "X-Bapi-Limit-Reset-Timestamp": str(reset_ms),
                }
            )
            return reshaped
        if response.status >= 500:
            return self._error(10016, "Internal server error.", response.status)
        return self._error(10001, "params error")

    # ---- endpoints

    async def _time_now(self, request: web.Request) -> web.Response:
        now_ms = self._now_ms()
        result = {"timeSecond": str(now_ms // 1000), "timeNano": str(now_ms * 1_000_000)}
        return self._json(self._envelope(result))

    async def _instruments(self, request: web.Request) -> web.Response:
        if request.query.get("category") != "spot":
            return self._error(10001, "fake_bybit models category=spot only")
        markets = [_instrument(s) for s in self.specs.values()]
        return self._json(self._envelope({"category": "spot", "list": markets}))

    async def _kline(self, request: web.Request) -> web.Response:
        query = request.query
        if query.get("category", "linear") != "spot":
            return self._error(10001, "fake_bybit models category=spot only")
        spec = self.specs.get(query.get("symbol", ""))
        if spec is None:
            return self._error(10001, "Not supported symbols")
        timeframe = BYBIT_INTERVALS.get(query.get("interval", ""))
        if timeframe is None:
            return self._error(10001, "Invalid period! (fake_bybit models intervals up to W)")
        try:
            start, end = _ms_param(query, "start"), _ms_param(query, "end")
            limit = _ms_param(query, "limit")
        except _BadParam as exc:
            return self._error(10001, str(exc))
        if limit is not None and limit < 1:
            return self._error(10001, "params error: limit invalid")
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        now_ms = self._now_ms()
        tf_ms = TIMEFRAME_MS[timeframe]
        hi = now_ms if end is None else min(end, now_ms)
        if start is None:
            lo = -1
        else:  # the candle containing `start` is the first one
            lo = start - (start - (_MONDAY_OFFSET_MS if timeframe == "1w" else 0)) % tf_ms
        runs = (
            _take(_runs(spec, timeframe, lo, hi), limit, newest=start is None) if lo <= hi else []
        )
        rows = []
        for run in reversed(runs):
            for open_ms in reversed(run):
                if open_ms + tf_ms > now_ms:  # the candle in progress, as it stands now
                    values = provisional_candle(spec.symbol, timeframe, open_ms, now_ms)
                else:
                    values = candle(spec.symbol, timeframe, open_ms)
                rows.append(_row(values))
        result = {"category": "spot", "symbol": spec.id, "list": rows}
        return self._json(self._envelope(result))


def _instrument(spec: SymbolSpec) -> dict:
    """An instruments-info spot entry with the fields ccxt's bybit.fetch_spot_markets reads."""
    base, quote = spec.symbol.split("/")
    decimals = _price_params(spec.symbol)[1]
    return {
        "symbol": spec.id,
        "baseCoin": base,
        "quoteCoin": quote,
        "innovation": "0",
        "status": "Trading" if spec.status == "TRADING" else "Closed",
        "marginTrading": "none",
        "stTag": "0",
        "lotSizeFilter": {
            "basePrecision": "0.001",
            "quotePrecision": "0.00000001",
            "minOrderQty": "0.001",
            "maxOrderQty": "1000000",
            "minOrderAmt": "1",
            "maxOrderAmt": "2000000",
        },
        "priceFilter": {"tickSize": f"{10.0**-decimals:.{decimals}f}" if decimals else "1"},
        "riskParameters": {"priceLimitRatioX": "0.05", "priceLimitRatioY": "0.05"},
    }
