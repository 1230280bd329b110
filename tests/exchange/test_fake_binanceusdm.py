"""The fake Binance USDⓈ-M futures server must look like fapi to real ccxt, through our
adapter, or the binanceusdm collector tests prove nothing."""

from __future__ import annotations

from contextlib import asynccontextmanager

import aiohttp
import pytest
from fake_binanceusdm import KLINES_PATH, MAX_LIMIT, FakeBinanceUsdm, ccxt_options
from fake_exchange import SymbolSpec, candle, expected_candles, provisional_candle

from tda_collector.errors import PermanentFault, RateLimited, TransientFault
from tda_collector.exchange.ccxt_source import CcxtExchange

MINUTE = 60_000
HOUR = 3_600_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z
NOW_MS = T0 + 30_500
LISTED_MS = T0 - 3 * HOUR + 40_000
GAP = (T0 - 2 * HOUR - 30_000, T0 - 90 * MINUTE)
BTC = SymbolSpec("BTC/USDT")
NEW = SymbolSpec("NEW/USDT", listed_at_ms=LISTED_MS, gaps=[GAP])
SETTLING = SymbolSpec("OLD/USDT", status="SETTLING")
PERP = "BTC/USDT:USDT"


@pytest.fixture
def fake():
    with FakeBinanceUsdm([BTC, NEW, SETTLING], clock=lambda: NOW_MS / 1000) as fx:
        yield fx


@asynccontextmanager
async def opened(fake: FakeBinanceUsdm):
    source = CcxtExchange("binanceusdm", ccxt_options(fake.base_url))
    try:
        await source.open()
        yield source
    finally:
        await source.close()


def as_tuples(rows) -> list[tuple]:
    return [(int(r[0]), *(float(v) for v in r[1:6])) for r in rows]


def closed(symbol: str, timeframe: str, opens) -> list[tuple]:
    return [candle(symbol, timeframe, t) for t in opens]


async def klines(fake: FakeBinanceUsdm, **params) -> tuple[int, object, dict]:
    url = fake.base_url + KLINES_PATH
    async with aiohttp.ClientSession() as http, http.get(url, params=params) as response:
        return response.status, await response.json(), dict(response.headers)


async def test_perpetuals_and_clock_load_from_fapi_alone(fake):
    async with opened(fake) as source:
        markets = {m.symbol: m for m in source.markets()}
        market = source._client.market(PERP)
        assert source.now_ms() == pytest.approx(NOW_MS, abs=1_000)
    assert set(markets) == {PERP, "NEW/USDT:USDT", "OLD/USDT:USDT"}
    assert markets[PERP].type == "swap" and markets[PERP].active
    assert not markets["OLD/USDT:USDT"].active
    assert market["linear"] and market["settle"] == "USDT" and market["id"] == "BTCUSDT"
    assert [r.path for r in fake.request_log()] == ["/fapi/v1/exchangeInfo", "/fapi/v1/time"]


async def test_a_page_is_exactly_the_fakes_candles_with_ms_params(fake):
    since, until = T0 - 100 * MINUTE, T0 - 51 * MINUTE
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv(PERP, "1m", since, until, 50)
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(since, until + 1, MINUTE))
    (request,) = fake.candle_requests(PERP)
    assert request.params == {
        "symbol": "BTCUSDT",
        "interval": "1m",
        "startTime": str(since),
        "endTime": str(until),
        "limit": "50",
    }


async def test_a_window_wider_than_a_page_is_answered_oldest_first_from_start(fake):
    since = T0 - 4 * 24 * HOUR + 1  # one ms past an open: the first candle is the next one
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv(PERP, "1m", since, T0, 300)
    first = since - 1 + MINUTE
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(first, first + 300 * MINUTE, MINUTE))


async def test_ccxt_asks_at_most_1000_though_fapi_serves_1500(fake):
    since = T0 - 4 * 24 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv(PERP, "1m", since, T0, MAX_LIMIT)
    assert len(rows) == 1000 and fake.candle_requests()[0].params["limit"] == "1000"
    status, body, _ = await klines(
        fake, symbol="BTCUSDT", interval="1m", startTime=since, limit=1500
    )
    assert status == 200 and len(body) == MAX_LIMIT and body[0][0] == since
    status, body, _ = await klines(fake, symbol="BTCUSDT", interval="1m", limit=1501)
    assert status == 400 and body["code"] == -1130


@pytest.mark.parametrize(("limit", "weight"), [(99, 1), (100, 2), (499, 2), (1000, 5), (1001, 10)])
async def test_request_weight_follows_the_limit(fake, limit, weight):
    fake.reset_log()
    _, _, first = await klines(fake, symbol="BTCUSDT", interval="1h", limit=limit)
    _, _, second = await klines(fake, symbol="BTCUSDT", interval="1h", limit=limit)
    used = int(second["X-MBX-USED-WEIGHT-1M"]) - int(first["X-MBX-USED-WEIGHT-1M"])
    assert used == weight


async def test_without_start_the_newest_candles_come_and_the_last_is_in_progress(fake):
    status, body, _ = await klines(fake, symbol="BTCUSDT", interval="1m", limit=3)
    assert status == 200 and [row[0] for row in body] == [T0 - 2 * MINUTE, T0 - MINUTE, T0]
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv(PERP, "1m", T0 - 2 * MINUTE, NOW_MS, 10)
    expected = [*closed("BTC/USDT", "1m", (T0 - 2 * MINUTE, T0 - MINUTE))]
    assert as_tuples(rows) == [*expected, provisional_candle("BTC/USDT", "1m", T0, NOW_MS)]


async def test_listing_and_maintenance_gap_leave_exactly_the_candles_that_exist(fake):
    since = T0 - 4 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("NEW/USDT:USDT", "1m", since, T0 - MINUTE, 1000)
    assert as_tuples(rows) == expected_candles(NEW, "1m", since, T0, NOW_MS)


async def test_bad_symbol_is_permanent_on_the_wire_and_in_ccxt(fake):
    status, body, _ = await klines(fake, symbol="NOPEUSDT", interval="1m")
    assert (status, body["code"]) == (400, -1121)
    async with opened(fake) as source:
        with pytest.raises(PermanentFault):
            await source.fetch_ohlcv("NOPE/USDT:USDT", "1m", T0 - HOUR, T0, 10)
        with pytest.raises(PermanentFault):
            await source._call("fapiPublicGetKlines", {"symbol": "NOPEUSDT", "interval": "1m"})


@pytest.mark.parametrize("kind", ["500", "502", "503", "truncated", "garbage"])
async def test_server_faults_are_transient(fake, kind):
    async with opened(fake) as source:
        fake.inject(kind)
        with pytest.raises(TransientFault) as caught:
            await source.fetch_ohlcv(PERP, "1m", T0 - HOUR, T0, 10)
    assert not isinstance(caught.value, RateLimited)


async def test_429_is_rate_limited_with_its_retry_after(fake):
    async with opened(fake) as source:
        fake.inject("429", retry_after=7)
        with pytest.raises(RateLimited) as caught:
            await source.fetch_ohlcv(PERP, "1m", T0 - HOUR, T0, 10)
    assert caught.value.status == 429 and caught.value.retry_after_s == 7
