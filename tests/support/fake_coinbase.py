"""Fake Coinbase Advanced Trade REST server (``/api/v3/brokerage/...`` + the ``/v2`` bits ccxt
reads) over the candle world of fake_exchange.

What it reproduces, for real ccxt (``ccxt.async_support.coinbase``, 4.5.90) pointed at it with
``{"urls": {"api": {"rest": base_url}}}`` and no credentials:

- ``load_markets``: ccxt's coinbase first calls ``fetch_currencies`` (``GET /v2/currencies``,
  ``/v2/currencies/crypto``, ``/v2/exchange-rates``; no option turns it off), then
  ``GET /api/v3/brokerage/market/products`` (the public list; ``options.fetchMarkets.usePrivate``
  would pick the authenticated one) and, tolerating a failure, the same with
  ``product_type=FUTURE`` (answered with no products: the fake lists spot only).
- ``fetch_time``: ``GET /v2/time`` (ccxt's default, ``{"data": {"epoch": <whole seconds>}}``)
  and ``GET /api/v3/brokerage/time`` (``options.fetchTime: "v3PublicGetBrokerageTime"``).
- ``GET /api/v3/brokerage/market/products/{product_id}/candles?start=&end=&granularity=&limit=``
  (the public endpoint ccxt uses unless ``usePrivate``): ``start``/``end`` in UNIX seconds,
  candles whose bucket holds ``start`` up to the one opening at ``end`` (inclusive), newest
  first, the bucket in progress included with no flag. More than 350 buckets between
  ``start`` and ``end`` (or ``limit`` > 350) is rejected (400 ``INVALID_ARGUMENT``); at most
  ``limit`` (default 350) newest are returned. History reaches back to the listing. Candles are
  ``{"start": "<s>", "low", "high", "open", "close", "volume"}``, all strings. Granularities:
  ONE_MINUTE, FIVE_MINUTE, FIFTEEN_MINUTE, THIRTY_MINUTE, ONE_HOUR, TWO_HOUR, SIX_HOUR, ONE_DAY
  (the authenticated endpoint also has FOUR_HOUR; there is no weekly or monthly candle).
- Errors in the v3 shape ``{"error": "NOT_FOUND", "error_details": ..., "message": ...}``;
  injected faults (``inject``, whose ``path`` is the full request path) answer 5xx/400 in that
  shape and 429 with an HTML page, as Coinbase's gateway does.

Checked against: https://docs.cdp.coinbase.com/api-reference/advanced-trade-api/rest-api/public/
get-public-product-candles ("limit: The number of candle buckets to be returned. By default,
returns 350 (max 350)"; the granularity list); the Exchange API's candle page (requests that
would hold more candles than the maximum are rejected; no candle where there was no trade);
coinbase-samples/advanced-trade-sdk-go#18 (429 answered with HTML); ccxt's coinbase.py
``fetch_currencies``, ``fetch_markets_v3``, ``parse_spot_market``, ``fetch_time``,
``fetch_ohlcv`` (at most 300 a call: ``end = until`` or ``start + 300 * tf``; keeps the oldest
300 of the answer), ``parse_ohlcv`` and ``handle_errors``. Docs say 350 a page; ccxt caps 300.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from fake_exchange import (
    FakeExchange,
    RequestRecord,
    SymbolSpec,
    _price_params,
    _runs,
    _take,
    candle,
    provisional_candle,
)

API = "/api/v3/brokerage"
CANDLES_PATH = API + "/market/products/{product_id}/candles"
MAX_CANDLES = 350  # "By default, returns 350 (max 350)"
GRANULARITIES = {
    "ONE_MINUTE": "1m",
    "FIVE_MINUTE": "5m",
    "FIFTEEN_MINUTE": "15m",
    "THIRTY_MINUTE": "30m",
    "ONE_HOUR": "1h",
    "TWO_HOUR": "2h",
    "SIX_HOUR": "6h",
    "ONE_DAY": "1d",
}
_TF_S = {"1m": 60, "5m": 300, "15m": 900, "30m": 1800, "1h": 3600, "2h": 7200, "6h": 21600}
_TF_S["1d"] = 86_400
_FIAT = {"USD": "US Dollar", "EUR": "Euro", "GBP": "British Pound"}
_FAULT_ERRORS = {400: "INVALID_ARGUMENT", 500: "INTERNAL", 503: "UNAVAILABLE"}
_THROTTLED_PAGE = "<html><head><title>Coinbase</title></head><body>Too Many Requests</body></html>"


def product_id(symbol: str) -> str:
    """``BTC/USD`` -> ``BTC-USD``."""
    return symbol.replace("/", "-")


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"error": code, "error_details": message, "message": message}
    return web.json_response(body, status=status)


def _decimal(value: float, decimals: int) -> str:
    """The exact decimal of a world price, trailing zeros dropped as Coinbase writes them."""
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def render_candle(symbol: str, row: tuple) -> str:
    """One candle as Coinbase writes it; ``row`` is (open_ms, o, h, l, c, volume)."""
    decimals = _price_params(symbol)[1]
    open_ms, o, h, low, c, volume = row[:6]
    low_s, high_s, open_s, close_s = (_decimal(v, decimals) for v in (low, h, o, c))
    return (
        f'{{"start":"{open_ms // 1000}","low":"{low_s}","high":"{high_s}","open":"{open_s}",'
        f'"close":"{close_s}","volume":"{volume:.8f}"}}'
    )


class FakeCoinbase(FakeExchange):
    """Coinbase Advanced Trade look-alike; see the module docstring."""

    def __init__(self, symbols: list[SymbolSpec] | None = None, **kwargs) -> None:
        specs = symbols if symbols is not None else [SymbolSpec("BTC/USD"), SymbolSpec("ETH/USD")]
        super().__init__(specs, **kwargs)
        self.products = {product_id(s.symbol): s for s in specs}

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._coinbase_faults, self._gate])
        for path, handler in (
            ("/v2/time", self._v2_time),
            ("/v2/currencies", self._fiat_currencies),
            ("/v2/currencies/crypto", self._crypto_currencies),
            ("/v2/exchange-rates", self._exchange_rates),
            (API + "/time", self._v3_time),
            (API + "/market/products", self._products),
            (CANDLES_PATH, self._candles),
        ):
            app.router.add_get(path, handler)
        return app

    @web.middleware
    async def _coinbase_faults(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Faults that fake_exchange injects, reworded as Coinbase answers them."""
        response = await handler(request)
        response.headers.pop("X-MBX-USED-WEIGHT-1M", None)
        body = getattr(response, "body", None)
        if not (isinstance(body, bytes) and body.startswith(b'{"code":-1')):
            return response
        if response.status in (418, 429):
            reworded = web.Response(status=429, text=_THROTTLED_PAGE, content_type="text/html")
        else:
            code = _FAULT_ERRORS.get(response.status, "INTERNAL")
            reworded = _error(response.status, code, "fault injected by the fake")
        if "Retry-After" in response.headers:
            reworded.headers["Retry-After"] = response.headers["Retry-After"]
        return reworded

    def inject(
        self, kind: str, count: int = 1, path: str | None = None, retry_after: int | None = None
    ) -> None:
        """fake_exchange's ``inject`` with ``path`` the full request path (None: any), e.g.
        ``/api/v3/brokerage/market/products/BTC-USD/candles``; its gate strips ``/api/v3/``."""
        endpoint = path.removeprefix("/api/v3/") if path is not None else None
        super().inject(kind, count, endpoint, retry_after)

    def candle_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged candle requests, optionally for one symbol (``BTC/USD``)."""
        prefix = f"{API}/market/products/{product_id(symbol) if symbol else ''}"
        return [
            r
            for r in self.request_log()
            if r.path.startswith(prefix) and r.path.endswith("/candles")
        ]

    # ---- endpoints

    def _now_s(self) -> int:
        return int(self.clock())

    async def _v2_time(self, request: web.Request) -> web.Response:
        now = self._now_s()
        iso = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return web.json_response({"data": {"iso": iso, "epoch": now}})

    async def _v3_time(self, request: web.Request) -> web.Response:
        now = self.clock()
        iso = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"iso": iso, "epochSeconds": str(int(now)), "epochMillis": str(int(now * 1000))}
        return web.json_response(body)

    def _codes(self) -> set[str]:
        return {code for spec in self.products.values() for code in spec.symbol.split("/")}

    async def _fiat_currencies(self, request: web.Request) -> web.Response:
        fiat = sorted(self._codes() & set(_FIAT))
        data = [{"id": code, "name": _FIAT[code], "min_size": "0.01"} for code in fiat]
        return web.json_response({"data": data})

    async def _crypto_currencies(self, request: web.Request) -> web.Response:
        crypto = sorted(self._codes() - set(_FIAT))
        data = [
            {
                "asset_id": f"00000000-0000-0000-0000-{i:012d}",
                "code": code,
                "name": code.title(),
                "color": "#0052FF",
                "sort_index": i,
                "exponent": 8,
                "type": "crypto",
                "address_regex": "^.+$",
            }
            for i, code in enumerate(crypto)
        ]
        return web.json_response({"data": data})

    async def _exchange_rates(self, request: web.Request) -> web.Response:
        rates = {code: "1" for code in sorted(self._codes())}
        return web.json_response({"data": {"currency": "USD", "rates": rates}})

    async def _products(self, request: web.Request) -> web.Response:
        if request.query.get("product_type", "SPOT").upper() != "SPOT":
            return web.json_response({"products": [], "num_products": 0})
        products = [_product(pid, spec) for pid, spec in self.products.items()]
        return web.json_response({"products": products, "num_products": len(products)})

    async def _candles(self, request: web.Request) -> web.Response:
        spec = self.products.get(request.match_info["product_id"])
        if spec is None:
            return _error(404, "NOT_FOUND", "ProductID is invalid")
        query = request.query
        timeframe = GRANULARITIES.get(query.get("granularity", ""))
        if timeframe is None:
            return _error(400, "INVALID_ARGUMENT", "granularity argument is invalid")
        try:
            start_s, end_s = int(query["start"]), int(query["end"])
            limit = int(query.get("limit", MAX_CANDLES))
        except (KeyError, ValueError):
            return _error(400, "INVALID_ARGUMENT", "start and end argument is invalid")
        tf_s = _TF_S[timeframe]
        if end_s < start_s or limit < 1 or limit > MAX_CANDLES:
            return _error(400, "INVALID_ARGUMENT", "start and end argument is invalid")
        if (end_s - start_s) // tf_s > MAX_CANDLES:
            return _error(
                400,
                "INVALID_ARGUMENT",
                "start and end argument is invalid - number of candles requested should be "
                f"less than or equal to {MAX_CANDLES}",
            )
        now_ms = int(self.clock() * 1000)
        lo = (start_s - start_s % tf_s) * 1000  # the bucket holding start
        hi = min(end_s * 1000, now_ms)
        times = [t for run in _take(_runs(spec, timeframe, lo, hi), limit, True) for t in run]
        rows = []
        for t in reversed(times):  # newest first
            if t + tf_s * 1000 > now_ms:
                row = provisional_candle(spec.symbol, timeframe, t, now_ms)
            else:
                row = candle(spec.symbol, timeframe, t)
            rows.append(render_candle(spec.symbol, row))
        return web.Response(
            text='{"candles":[' + ",".join(rows) + "]}", content_type="application/json"
        )


def _product(pid: str, spec: SymbolSpec) -> dict:
    """A public products entry with the fields ccxt's ``parse_spot_market`` reads."""
    base, quote = spec.symbol.split("/")
    tick = f"{10.0 ** -_price_params(spec.symbol)[1]:.8f}".rstrip("0")
    trading = spec.status == "TRADING"
    return {
        "product_id": pid,
        "price": "1",
        "price_percentage_change_24h": "0",
        "volume_24h": f"{spec.volume_24h:.2f}",
        "volume_percentage_change_24h": "0",
        "base_increment": "0.00000001",
        "quote_increment": tick,
        "quote_min_size": "1",
        "quote_max_size": "150000000",
        "base_min_size": "0.00000001",
        "base_max_size": "3400",
        "base_name": base.title(),
        "quote_name": _FIAT.get(quote, quote.title()),
        "watched": False,
        "is_disabled": False,
        "new": False,
        "status": "online" if trading else "offline",
        "cancel_only": False,
        "limit_only": False,
        "post_only": False,
        "trading_disabled": not trading,
        "auction_mode": False,
        "product_type": "SPOT",
        "quote_currency_id": quote,
        "base_currency_id": base,
        "fcm_trading_session_details": None,
        "mid_market_price": "",
        "alias": "",
        "alias_to": [],
        "base_display_symbol": base,
        "quote_display_symbol": quote,
        "view_only": False,
        "price_increment": tick,
        "display_name": pid,
        "product_venue": "CBE",
    }


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict:
    """The ccxt options that point ccxt's coinbase at this fake (nothing else is needed)."""
    return {"urls": {"api": {"rest": base_url}}, "timeout": timeout_ms}
