"""The fake Coinbase Advanced Trade must look like Coinbase to real ccxt, through our adapter.
Semantics are Coinbase's documented ones (see fake_coinbase's docstring)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import aiohttp
import ccxt.async_support as ccxt
import pytest
from fake_coinbase import API, MAX_CANDLES, FakeCoinbase, ccxt_options
from fake_exchange import SymbolSpec, expected_candles, provisional_candle

from tda_collector.errors import PermanentFault, RateLimited, TransientFault
from tda_collector.exchange.ccxt_source import CcxtExchange

MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z
NOW_MS = T0 + 30_500
LISTED_MS = T0 - 3 * HOUR + 40_000
GAP = (T0 - 2 * HOUR - 30_000, T0 - 90 * MINUTE)
BTC = SymbolSpec("BTC/USD")
SOL = SymbolSpec("SOL/USD", listed_at_ms=LISTED_MS, gaps=[GAP])
CCXT_PAGE = 300  # ccxt's coinbase keeps at most 300 candles of an answer


class FakeClock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW_MS)


@pytest.fixture
def coinbase(clock):
    with FakeCoinbase([BTC, SOL], clock=clock) as fx:
        yield fx


@asynccontextmanager
async def opened(fx: FakeCoinbase, clock: FakeClock):
    source = CcxtExchange("coinbase", ccxt_options(fx.base_url, timeout_ms=5_000), clock=clock)
    try:
        await source.open()
        yield source
    finally:
        await source.close()


def fetch(fx, clock, symbol, timeframe, since_ms, until_ms, limit=CCXT_PAGE):
    async def go():
        async with opened(fx, clock) as source:
            return await source.fetch_ohlcv(symbol, timeframe, since_ms, until_ms, limit)

    return [tuple(row[:6]) for row in asyncio.run(go())]


def raw_candles(fx: FakeCoinbase, product: str, **params) -> tuple[int, dict]:
    async def go():
        url = f"{fx.base_url}{API}/market/products/{product}/candles"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, params=params) as response,
        ):
            return response.status, json.loads(await response.text())

    return asyncio.run(go())


def test_markets_and_clock_load_through_the_adapter_without_credentials(coinbase, clock):
    async def go():
        async with opened(coinbase, clock) as source:
            return {m.symbol: m for m in source.markets()}, source.now_ms()

    markets, now_ms = asyncio.run(go())
    assert set(markets) == {"BTC/USD", "SOL/USD"}
    assert all(m.type == "spot" and m.quote == "USD" and m.active for m in markets.values())
    assert abs(now_ms - NOW_MS) < 1_000  # /v2/time has whole seconds
    paths = {r.path for r in coinbase.request_log()}
    assert f"{API}/market/products" in paths  # the public list, no signed request
    assert f"{API}/products" not in paths


def test_ccxt_parses_the_wire_candles_to_exactly_the_world_candles(coinbase):
    async def go():
        client = ccxt.coinbase({**ccxt_options(coinbase.base_url), "enableRateLimit": False})
        try:
            return await client.fetch_ohlcv("BTC/USD", "1h", T0 - 50 * HOUR)
        finally:
            await client.close()

    rows = [tuple(r) for r in asyncio.run(go())]
    assert rows[:-1] == expected_candles(BTC, "1h", T0 - 50 * HOUR, NOW_MS, NOW_MS)
    assert rows[-1] == provisional_candle("BTC/USD", "1h", T0, NOW_MS)
    (request,) = coinbase.candle_requests("BTC/USD")
    assert request.path == f"{API}/market/products/BTC-USD/candles"
    assert request.params["granularity"] == "ONE_HOUR"
    assert request.params["start"] == str((T0 - 50 * HOUR) // 1000)  # seconds
    assert request.params["end"] == str((T0 + 250 * HOUR) // 1000)  # start + 300 candles


def test_adapter_returns_exactly_the_candles_of_the_window(coinbase, clock):
    since = T0 - 4 * HOUR
    rows = fetch(coinbase, clock, "SOL/USD", "1m", since, T0 - 10 * MINUTE)
    assert rows == expected_candles(SOL, "1m", since, T0 - 9 * MINUTE, NOW_MS)
    assert rows[0][0] == LISTED_MS - LISTED_MS % MINUTE + MINUTE
    assert not [r for r in rows if GAP[0] <= r[0] < GAP[1]]
    (request,) = coinbase.candle_requests("SOL/USD")
    assert request.params["end"] == str((T0 - 10 * MINUTE) // 1000)  # `until`, inclusive


def test_the_open_candle_comes_first_unflagged(coinbase):
    start, end = (T0 - 5 * MINUTE) // 1000, (T0 + HOUR) // 1000
    status, body = raw_candles(coinbase, "BTC-USD", start=start, end=end, granularity="ONE_MINUTE")
    assert status == 200
    starts = [int(c["start"]) * 1000 for c in body["candles"]]
    assert starts == [T0 - k * MINUTE for k in range(6)]  # newest first, the open one too
    assert set(body["candles"][0]) == {"start", "low", "high", "open", "close", "volume"}


def test_a_window_over_350_candles_is_rejected_and_limit_takes_the_newest(coinbase, clock):
    start = (T0 - 400 * MINUTE) // 1000
    status, body = raw_candles(
        coinbase, "BTC-USD", start=start, end=T0 // 1000, granularity="ONE_MINUTE"
    )
    assert status == 400 and body["error"] == "INVALID_ARGUMENT"
    with pytest.raises(PermanentFault):
        fetch(coinbase, clock, "BTC/USD", "1m", T0 - 400 * MINUTE, T0 - MINUTE)
    status, body = raw_candles(
        coinbase,
        "BTC-USD",
        start=start,
        end=(T0 - 100 * MINUTE) // 1000,
        granularity="ONE_MINUTE",
        limit=10,
    )
    assert status == 200
    assert [int(c["start"]) * 1000 for c in body["candles"]] == [
        T0 - (100 + k) * MINUTE for k in range(10)
    ]


def test_between_300_and_350_candles_ccxt_keeps_the_oldest_300(coinbase, clock):
    since = T0 - 400 * MINUTE
    rows = fetch(coinbase, clock, "BTC/USD", "1m", since, since + 339 * MINUTE, limit=MAX_CANDLES)
    assert len(rows) == CCXT_PAGE  # the answer held 340; ccxt dropped the newest 40
    assert rows == expected_candles(BTC, "1m", since, since + CCXT_PAGE * MINUTE, NOW_MS)


def test_history_reaches_back_to_the_listing(coinbase, clock):
    listed = BTC.listed_at_ms
    rows = fetch(coinbase, clock, "BTC/USD", "1d", listed - 10 * DAY, listed + 20 * DAY)
    assert rows == expected_candles(BTC, "1d", listed - 10 * DAY, listed + 21 * DAY, NOW_MS)
    assert rows[0][0] == listed


def test_an_unknown_symbol_or_granularity_is_a_permanent_fault(coinbase, clock):
    with pytest.raises(PermanentFault):
        fetch(coinbase, clock, "NOPE/USD", "1m", T0 - HOUR, T0)
    with pytest.raises(PermanentFault):  # no FOUR_HOUR on the public endpoint
        fetch(coinbase, clock, "BTC/USD", "4h", T0 - 10 * DAY, T0)
    status, body = raw_candles(coinbase, "NOPE-USD", start=0, end=60, granularity="ONE_MINUTE")
    assert status == 404 and body["error"] == "NOT_FOUND"


def test_a_product_coinbase_no_longer_knows_is_a_permanent_fault(coinbase, clock):
    async def go():
        async with opened(coinbase, clock) as source:
            del coinbase.products["SOL-USD"]  # delisted after loading
            return await source.fetch_ohlcv("SOL/USD", "1m", T0 - HOUR, T0, 60)

    with pytest.raises(PermanentFault):
        asyncio.run(go())


@pytest.mark.parametrize("kind", ["500", "502", "503"])
def test_server_errors_are_transient(coinbase, clock, kind):
    coinbase.inject(kind, path=f"{API}/market/products/BTC-USD/candles")
    with pytest.raises(TransientFault):
        fetch(coinbase, clock, "BTC/USD", "1m", T0 - HOUR, T0)


def test_rate_limit_answers_are_rate_limited(coinbase, clock):
    coinbase.inject("429", path=f"{API}/market/products/BTC-USD/candles", retry_after=2)
    with pytest.raises(RateLimited) as caught:
        fetch(coinbase, clock, "BTC/USD", "1m", T0 - HOUR, T0)
    assert caught.value.retry_after_s == 2
    assert coinbase.candle_requests()[-1].status == 429
