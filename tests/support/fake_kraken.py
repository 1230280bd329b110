"""Fake Kraken spot REST server (``/0/public/...``) over the candle world of fake_exchange.

What it reproduces, for real ccxt (``ccxt.async_support.kraken``, 4.5.90) pointed at it with
``{"urls": {"api": {"public": base_url, "private": base_url}}}`` and no other option:

- ``GET /0/public/Assets`` and ``/0/public/AssetPairs``: what ``load_markets`` reads (ccxt's
  kraken always calls ``fetch_currencies`` first; no option turns it off). Legacy assets keep
  Kraken's X/Z ids (``XXBT``, ``ZUSD``; pair id ``XXBTZUSD``, altname ``XBTUSD``), newer ones
  do not (``SOLUSD``), as on the real exchange.
- ``GET /0/public/Time``: ``{"unixtime": <whole seconds>}`` (ccxt's ``fetch_time``).
- ``GET /0/public/OHLC?pair=&interval=<minutes>&since=<seconds>``: the newest 720 entries of
  the series, oldest first, whatever ``since`` says (older data cannot be retrieved); ``since``
  is exclusive (entries with ``time > since``); the last entry is the current, not yet
  committed candle and is always present; ``last`` is the open time of the newest committed
  one. Rows are ``[time_s, "open", "high", "low", "close", "vwap", "volume", count]`` with
  prices to the pair's ``pair_decimals`` and volume to 8 decimals, so ccxt's ``parse_ohlcv``
  yields exactly fake_exchange's ``candle()`` floats. Intervals 1, 5, 15, 30, 60, 240, 1440;
  10080 and 21600 exist on Kraken but their grid is not modelled here (HTTP 501).
- Errors in Kraken's shape ``{"error": ["<class>:<message>"], "result": {}}`` with HTTP 200:
  ``EQuery:Unknown asset pair``, ``EGeneral:Invalid arguments``; injected faults (``inject``,
  whose ``path`` is the full request path, e.g. ``/0/public/OHLC``) are answered in Kraken's
  shape too (``EAPI:Rate limit exceeded``, ``EService:Unavailable``, ...).

Checked against: https://docs.kraken.com/api-reference/market-data/get-ohlc-data ("The last
entry in the OHLC array is for the current, not-yet-committed timeframe, and will always be
present, regardless of the value of since. Returns up to 720 of the most recent entries");
https://docs.kraken.com/exchange/guides/general/historical-data (``since``: "return candles
after this time"; 720 a call); ccxt's kraken.py ``fetch_markets``, ``fetch_currencies``,
``fetch_time``, ``fetch_ohlcv`` (sends ``since_s - interval_s`` to include the candle at
``since``), ``parse_ohlcv`` (volume is field 6, vwap 5 is skipped) and ``handle_errors``.

Simplifications: a maintenance gap of the candle world is missing entries (Kraken itself
repeats the last price with zero volume for intervals without trades); so an answer holds fewer
than 720 entries where the world has holes (the 720 are intervals, counted back from now).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

from aiohttp import web
from fake_exchange import (
    FakeExchange,
    RequestRecord,
    SymbolSpec,
    _price_params,
    _runs,
    candle,
    provisional_candle,
)

OHLC_PATH = "/0/public/OHLC"
MAX_ENTRIES = 720  # "Returns up to 720 of the most recent entries"
INTERVALS = {1: "1m", 5: "5m", 15: "15m", 30: "30m", 60: "1h", 240: "4h", 1440: "1d"}
UNMODELLED_INTERVALS = (10080, 21600)  # 1 week and 15 days: Kraken has them, the world not
# Kraken's legacy asset ids (X for crypto, Z for fiat) and their altnames.
_LEGACY_ASSETS = {
    "BTC": ("XXBT", "XBT"),
    "ETH": ("XETH", "ETH"),
    "DOGE": ("XXDG", "XDG"),
    "XRP": ("XXRP", "XRP"),
    "LTC": ("XLTC", "LTC"),
    "USD": ("ZUSD", "USD"),
    "EUR": ("ZEUR", "EUR"),
    "GBP": ("ZGBP", "GBP"),
}
_FIAT = {"USD", "EUR", "GBP"}
# Kraken's answers to faults fake_exchange injects (its bodies are Binance's).
_FAULT_ERRORS = {
    400: "EGeneral:Invalid arguments",
    418: "EGeneral:Temporary lockout",
    429: "EAPI:Rate limit exceeded",
    500: "EGeneral:Internal error",
    503: "EService:Unavailable",
}


def asset_id(code: str) -> str:
    """Kraken's asset id of a currency code: ``BTC`` -> ``XXBT``, ``SOL`` -> ``SOL``."""
    return _LEGACY_ASSETS.get(code, (code, code))[0]


def altname(code: str) -> str:
    return _LEGACY_ASSETS.get(code, (code, code))[1]


def pair_id(symbol: str) -> str:
    """Kraken's pair id: ``BTC/USD`` -> ``XXBTZUSD`` (both legacy), ``SOL/USD`` -> ``SOLUSD``."""
    base, quote = symbol.split("/")
    if base in _LEGACY_ASSETS and quote in _LEGACY_ASSETS:
        return asset_id(base) + asset_id(quote)
    return altname(base) + altname(quote)


def pair_altname(symbol: str) -> str:
    base, quote = symbol.split("/")
    return altname(base) + altname(quote)


def _error(message: str, status: int = 200) -> web.Response:
    return web.json_response({"error": [message], "result": {}}, status=status)


def _result(result: object) -> web.Response:
    return web.Response(
        text=json.dumps({"error": [], "result": result}, separators=(",", ":")),
        content_type="application/json",
    )


def render_row(symbol: str, row: tuple) -> str:
    """One OHLC entry as Kraken writes it; ``row`` is (open_ms, o, h, l, c, volume)."""
    decimals = _price_params(symbol)[1]
    open_ms, o, h, low, c, volume = row[:6]
    vwap = (o + c) / 2
    prices = ",".join(f'"{value:.{decimals}f}"' for value in (o, h, low, c, vwap))
    count = max(1, int(volume)) if volume else 0
    return f'[{open_ms // 1000},{prices},"{volume:.8f}",{count}]'


class FakeKraken(FakeExchange):
    """Kraken spot REST look-alike; see the module docstring."""

    def __init__(self, symbols: list[SymbolSpec] | None = None, **kwargs) -> None:
        specs = symbols if symbols is not None else [SymbolSpec("BTC/USD"), SymbolSpec("ETH/USD")]
        super().__init__(specs, **kwargs)
        self.pairs = {pair_id(s.symbol): s for s in specs}
        self._by_altname = {pair_altname(s.symbol): s for s in specs}

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._kraken_faults, self._gate])
        for name, handler in (
            ("Time", self._kraken_time),
            ("Assets", self._assets),
            ("AssetPairs", self._asset_pairs),
            ("OHLC", self._ohlc),
        ):
            app.router.add_get("/0/public/" + name, handler)
        return app

    @web.middleware
    async def _kraken_faults(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        """Faults that fake_exchange injects, reworded in Kraken's error shape."""
        response = await handler(request)
        response.headers.pop("X-MBX-USED-WEIGHT-1M", None)
        body = getattr(response, "body", None)
        if isinstance(body, bytes) and body.startswith(b'{"code":-1'):
            message = _FAULT_ERRORS.get(response.status, "EGeneral:Internal error")
            reworded = _error(message, response.status)
            if "Retry-After" in response.headers:
                reworded.headers["Retry-After"] = response.headers["Retry-After"]
            return reworded
        return response

    def candle_requests(self, symbol: str | None = None) -> list[RequestRecord]:
        """Logged OHLC requests, optionally for one symbol (``BTC/USD``)."""
        wanted = {pair_id(symbol), pair_altname(symbol)} if symbol else None
        return [
            r
            for r in self.request_log()
            if r.path == OHLC_PATH and (wanted is None or r.params.get("pair") in wanted)
        ]

    # ---- endpoints

    async def _kraken_time(self, request: web.Request) -> web.Response:
        now_s = int(self.clock())
        stamp = datetime.fromtimestamp(now_s, UTC).strftime("%a, %d %b %y %H:%M:%S +0000")
        return _result({"unixtime": now_s, "rfc1123": stamp})

    async def _assets(self, request: web.Request) -> web.Response:
        codes = sorted({code for s in self.pairs.values() for code in s.symbol.split("/")})
        return _result(
            {
                asset_id(code): {
                    "aclass": "currency",
                    "altname": altname(code),
                    "decimals": 4 if code in _FIAT else 10,
                    "display_decimals": 2 if code in _FIAT else 5,
                    "status": "enabled",
                }
                for code in codes
            }
        )

    async def _asset_pairs(self, request: web.Request) -> web.Response:
        return _result({pid: _asset_pair(spec) for pid, spec in self.pairs.items()})

    def _pair(self, name: str | None) -> tuple[str, SymbolSpec] | None:
        spec = self.pairs.get(name or "") or self._by_altname.get(name or "")
        return (pair_id(spec.symbol), spec) if spec else None

    async def _ohlc(self, request: web.Request) -> web.Response:
        query = request.query
        found = self._pair(query.get("pair"))
        if found is None:
            return _error("EQuery:Unknown asset pair")
        pid, spec = found
        try:
            interval = int(query.get("interval", "1"))
            since_s = int(query["since"]) if "since" in query else None
        except ValueError:
            return _error("EGeneral:Invalid arguments")
        if interval in UNMODELLED_INTERVALS:
            raise web.HTTPNotImplemented(text=f"fake_kraken does not model interval {interval}")
        if interval not in INTERVALS:
            return _error("EGeneral:Invalid arguments")
        timeframe = INTERVALS[interval]
        now_ms, tf_ms = int(self.clock() * 1000), interval * 60_000
        reach_ms = (now_ms // tf_ms - MAX_ENTRIES + 1) * tf_ms  # the newest 720 intervals
        newest = [t for run in _runs(spec, timeframe, reach_ms, now_ms) for t in run]
        if not newest:
            return _result({pid: [], "last": 0})
        in_progress = newest[-1] + tf_ms > now_ms
        committed = newest[:-1] if in_progress else newest
        shown = [t for t in committed if since_s is None or t // 1000 > since_s]
        rows = [render_row(spec.symbol, candle(spec.symbol, timeframe, t)) for t in shown]
        if in_progress:  # always present, whatever since says
            row = provisional_candle(spec.symbol, timeframe, newest[-1], now_ms)
            rows.append(render_row(spec.symbol, row))
        last = (committed[-1] if committed else newest[-1] - tf_ms) // 1000
        text = f'{{"error":[],"result":{{"{pid}":[{",".join(rows)}],"last":{last}}}}}'
        return web.Response(text=text, content_type="application/json")


def _asset_pair(spec: SymbolSpec) -> dict:
    """An AssetPairs entry with the fields ccxt's kraken parses."""
    base, quote = spec.symbol.split("/")
    decimals = _price_params(spec.symbol)[1]
    return {
        "altname": pair_altname(spec.symbol),
        "wsname": f"{altname(base)}/{altname(quote)}",
        "aclass_base": "currency",
        "base": asset_id(base),
        "aclass_quote": "currency",
        "quote": asset_id(quote),
        "lot": "unit",
        "cost_decimals": 5,
        "pair_decimals": decimals,
        "lot_decimals": 8,
        "lot_multiplier": 1,
        "leverage_buy": [],
        "leverage_sell": [],
        "fees": [[0, 0.4], [10000, 0.35], [50000, 0.24]],
        "fees_maker": [[0, 0.25], [10000, 0.2], [50000, 0.14]],
        "fee_volume_currency": "ZUSD",
        "margin_call": 80,
        "margin_stop": 40,
        "ordermin": "0.0001",
        "costmin": "0.5",
        "tick_size": f"{10.0**-decimals:.{decimals}f}",
        "status": "online" if spec.status == "TRADING" else "cancel_only",
    }


def ccxt_options(base_url: str, timeout_ms: int = 10_000) -> dict:
    """The ccxt options that point ccxt's kraken at this fake (nothing else is needed)."""
    return {"urls": {"api": {"public": base_url, "private": base_url}}, "timeout": timeout_ms}
