"""Fake OKX v5 spot REST server: the wire format real ccxt (`ccxt.async_support.okx`) reads.

It serves the candle world of `fake_exchange` (symbols, listings, maintenance gaps, clock,
request log, budgets and injected faults) in OKX's shapes:

- `GET /api/v5/public/instruments?instType=SPOT`: spot instruments, ids `BASE-QUOTE` (ccxt
  `okx.fetch_markets`, spot only with `options.fetchMarkets.types = ["spot"]`; any other
  instType answers no instruments). `GET /api/v5/public/time`: `data[0].ts` in ms.
- `GET /api/v5/market/candles` and `/api/v5/market/history-candles` with `instId`, `bar`,
  `after`, `before`, `limit`: `after` = open times strictly EARLIER than it, `before` = strictly
  LATER than it (both ms, both exclusive); the answer is the **newest** `limit` candles of that
  window, newest first (a window wider than a page loses its oldest part). `limit` defaults to
  100 and is clamped to 300 on `candles` and to `history_cap` (default 300) on
  `history-candles`. `candles` serves only the newest 1,440 open times (the in-progress one
  included); `history-candles` reaches back to the listing.
- Rows `["ts", "o", "h", "l", "c", "vol", "volCcy", "volCcyQuote", "confirm"]`, all strings,
  ts in ms, `vol` in base currency (what ccxt reads for spot), `confirm` "0" for the candle in
  progress (served by both endpoints) and "1" for closed ones.
- Bars `1m 3m 5m 15m 30m 1H 2H 4H` and the UTC-aligned `6Hutc 12Hutc 1Dutc 1Wutc` (ccxt adds
  `utc` for >= 6h). Not modelled: Hong Kong-aligned `6H 12H 1D 1W ...` (candles open at
  16:00 UTC) and `1Mutc`/`3Mutc` (calendar months): a 51000 naming the fake's limit.
- Errors as OKX sends them, `{"code": "<5 digits>", "msg": ..., "data": []}`: 51001 (HTTP 200)
  unknown instId, 51000 (HTTP 400) bad parameter, 50011 (HTTP 429) rate limit, 50001/50026 for
  5xx. Faults injected with `inject` (Binance-shaped in the base fake) are rewritten into these.

Checked against: OKX API v5 docs "Get candlesticks" (latest 1,440 entries, limit max 300,
default 100) and "Get candlesticks history" (after/before semantics, `confirm` 0 = uncompleted,
"the first candlestick data may be incomplete"); ccxt 4.5.90 `okx.py` (`fetch_ohlcv`: history
endpoint when `since < now - 1439 * tf` on the *local* clock, `before = since - 1`,
`after = since + tf * limit` or `until`, limit capped at 300; `parse_ohlcv` volume index 5 for
spot; `fetch_markets_by_type`, `fetch_time`, `handle_errors` and `exceptions`) and ccxt #26705
(history-candles page raised from 100 to 300 in 2025; `history_cap=100` gives the old one).
Assumed (not documented): a `limit` above the cap is clamped, not refused.
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

CANDLES_PATH = "/api/v5/market/candles"
HISTORY_PATH = "/api/v5/market/history-candles"
INSTRUMENTS_PATH = "/api/v5/public/instruments"
TIME_PATH = "/api/v5/public/time"
CANDLES_CAP = 300
DEFAULT_LIMIT = 100
RECENT_REACH = 1440  # /market/candles: "the latest 1,440 data entries"
OKX_BARS = {  # OKX bar -> the candle world's timeframe
    "1m": "1m",
    "3m": "3m",
    "5m": "5m",
    "15m": "15m",
    "30m": "30m",
    "1H": "1h",
    "2H": "2h",
    "4H": "4h",
    "6Hutc": "6h",
    "12Hutc": "12h",
    "1Dutc": "1d",
    "1Wutc": "1w",  # OKX's UTC weeks open Monday 00:00 UTC, as the candle world's do
}
_MONDAY_OFFSET_MS = 4 * 86_400_000
_RATE_LIMITED = {"code": "50011", "msg": "Too Many Requests", "data": []}


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    """ccxt constructor options pointing okx's REST API at the fake, spot markets only."""
    return {
        "urls": {"api": {"rest": base_url}},
        "options": {"fetchMarkets": {"types": ["spot"]}},
        "timeout": timeout_ms,
    }


def market_id(symbol: str) -> str:
    """OKX's instId of a unified spot symbol: `BTC/USDT` -> `BTC-USDT`."""
    return symbol.replace("/", "-")


def _decimal(value: float) -> str:
    """The shortest positional decimal that parses back to exactly `value` (as ccxt does)."""
    return np.format_float_positional(value, trim="-")


def _row(values: tuple, confirm: str) -> list[str]:
    open_ms, o, h, low, c, volume = values
    quote = _decimal(volume * (o + c) / 2)
    return [str(open_ms), *map(_decimal, (o, h, low, c, volume)), quote, quote, confirm]


def okx_json(obj: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(obj, separators=(",", ":")), content_type="application/json"
    )


def _error(code: str, msg: str, status: int) -> web.Response:
    return okx_json({"code": code, "msg": msg, "data": []}, status)


def _binance_error(response: web.StreamResponse) -> dict | None:
    """The base fake's own error body (`{"code": <int>, "msg"}`), or None for anything else."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    try:
        body = json.loads(response.text or "")
    except ValueError:
        return None
    return body if isinstance(body, dict) and isinstance(body.get("code"), int) else None


class _BadParam(Exception):
    pass


def _ms_param(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise _BadParam(f"Parameter {name} error") from None


class FakeOkx(FakeExchange):
    """OKX spot look-alike; see the module docstring. `history_cap` is the page cap of
    history-candles; other knobs are `FakeExchange`'s."""

    def __init__(
        self, symbols: list[SymbolSpec] | None = None, *, history_cap: int = 300, **knobs: Any
    ) -> None:
        super().__init__(symbols, **knobs)
        self.history_cap = history_cap
        self.by_okx_id = {market_id(s.symbol): s for s in self.specs.values()}

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._okx_shape, self._gate])
        app.router.add_get(INSTRUMENTS_PATH, self._instruments)
        app.router.add_get(TIME_PATH, self._time_ms)
        app.router.add_get(CANDLES_PATH, self._recent_candles)
        app.router.add_get(HISTORY_PATH, self._history_candles)
        return app

    def inject(
        self,
        kind: str,
        count: int = 1,
        path: str | None = HISTORY_PATH,
        retry_after: int | None = None,
    ) -> None:
        """`FakeExchange.inject`, `path` the full request path (default: history-candles)."""
        super().inject(kind, count, path, retry_after)

    def candle_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged requests to either candle endpoint, optionally for one symbol."""
        wanted = market_id(symbol) if symbol else None
        return [
            r
            for r in self.request_log()
            if r.path in (CANDLES_PATH, HISTORY_PATH) and wanted in (None, r.params.get("instId"))
        ]

    # ---- OKX's error shapes around the base fake's budget and fault injection

    @web.middleware
    async def _okx_shape(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        response.headers.pop("X-MBX-USED-WEIGHT-1M", None)  # Binance's header, not OKX's
        if _binance_error(response) is None:
            return response
        if response.status in (418, 429):  # OKX has no bans: every refusal is a 50011
            return okx_json(_RATE_LIMITED, 429)
        if response.status == 503:
            return _error("50001", "Service temporarily unavailable, please try again later.", 503)
        if response.status >= 500:
            return _error("50026", "System error, please try again later.", response.status)
        return _error("51000", "Parameter error", 400)

    # ---- endpoints

    async def _time_ms(self, request: web.Request) -> web.Response:
        return okx_json({"code": "0", "msg": "", "data": [{"ts": str(self._now_ms())}]})

    async def _instruments(self, request: web.Request) -> web.Response:
        if request.query.get("instType") != "SPOT":
            return okx_json({"code": "0", "msg": "", "data": []})
        data = [_instrument(s) for s in self.specs.values()]
        return okx_json({"code": "0", "msg": "", "data": data})

    async def _recent_candles(self, request: web.Request) -> web.Response:
        return self._candles(request, CANDLES_CAP, recent_only=True)

    async def _history_candles(self, request: web.Request) -> web.Response:
        return self._candles(request, self.history_cap, recent_only=False)

    def _candles(self, request: web.Request, cap: int, *, recent_only: bool) -> web.Response:
        query = request.query
        spec = self.by_okx_id.get(query.get("instId", ""))
        if spec is None:  # OKX answers an unknown instrument with HTTP 200
            return _error("51001", "Instrument ID does not exist.", 200)
        timeframe = OKX_BARS.get(query.get("bar", "1m"))
        if timeframe is None:
            return _error("51000", "Parameter bar error (fake_okx models UTC bars <= 1Wutc)", 400)
        try:
            after, before = _ms_param(query, "after"), _ms_param(query, "before")
            limit = _ms_param(query, "limit")
        except _BadParam as exc:
            return _error("51000", str(exc), 400)
        if limit is not None and limit < 1:
            return _error("51000", "Parameter limit error", 400)
        limit = min(limit or DEFAULT_LIMIT, cap)
        now_ms = self._now_ms()
        tf_ms = TIMEFRAME_MS[timeframe]
        lo = -1 if before is None else before + 1
        hi = now_ms if after is None else min(after - 1, now_ms)
        if recent_only:
            offset = _MONDAY_OFFSET_MS if timeframe == "1w" else 0
            current_open = now_ms - (now_ms - offset) % tf_ms
            lo = max(lo, current_open - (RECENT_REACH - 1) * tf_ms)
        runs = _take(_runs(spec, timeframe, lo, hi), limit, newest=True) if lo <= hi else []
        rows = []
        for run in reversed(runs):
            for open_ms in reversed(run):
                if open_ms + tf_ms > now_ms:
                    values = provisional_candle(spec.symbol, timeframe, open_ms, now_ms)
                    rows.append(_row(values, "0"))
                else:
                    rows.append(_row(candle(spec.symbol, timeframe, open_ms), "1"))
        return okx_json({"code": "0", "msg": "", "data": rows})


def _instrument(spec: SymbolSpec) -> dict:
    """A `/api/v5/public/instruments` SPOT entry with the fields ccxt's okx.parse_market reads."""
    base, quote = spec.symbol.split("/")
    decimals = _price_params(spec.symbol)[1]
    return {
        "instType": "SPOT",
        "instId": market_id(spec.symbol),
        "uly": "",
        "instFamily": "",
        "category": "1",
        "baseCcy": base,
        "quoteCcy": quote,
        "settleCcy": "",
        "ctVal": "",
        "ctMult": "",
        "ctValCcy": "",
        "optType": "",
        "stk": "",
        "listTime": str(max(spec.listed_at_ms, 0)),
        "expTime": "",
        "lever": "10",
        "tickSz": f"{10.0**-decimals:.{decimals}f}" if decimals else "1",
        "lotSz": "0.001",
        "minSz": "0.001",
        "ctType": "",
        "alias": "",
        "state": "live" if spec.status == "TRADING" else "suspend",
        "ruleType": "normal",
        "maxLmtSz": "9999999999",
        "maxMktSz": "1000000",
    }
