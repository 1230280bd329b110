"""The fake KuCoin must look like KuCoin to real ccxt, through our adapter, or the KuCoin
collector tests prove nothing."""

from __future__ import annotations

from contextlib import asynccontextmanager

import aiohttp
import pytest
from fake_exchange import SymbolSpec, candle, expected_candles, provisional_candle
from fake_kucoin import CANDLES_PATH, MAX_CANDLES, FakeKucoin, ccxt_options

from tda_collector.errors import PermanentFault, RateLimited, TransientFault
from tda_collector.exchange.ccxt_source import CcxtExchange

MINUTE = 60_000
HOUR = 3_600_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z
NOW_MS = T0 + 30_500  # 30.5 s into a 1m candle
LISTED_MS = T0 - 3 * HOUR + 40_000  # not on a minute boundary
GAP = (T0 - 2 * HOUR - 30_000, T0 - 90 * MINUTE)
BTC = SymbolSpec("BTC/USDT")
NEW = SymbolSpec("NEW/USDT", listed_at_ms=LISTED_MS, gaps=[GAP])
HALTED = SymbolSpec("OLD/USDT", status="BREAK")


@pytest.fixture
def fake():
    with FakeKucoin([BTC, NEW, HALTED], clock=lambda: NOW_MS / 1000) as fx:
        yield fx


@asynccontextmanager
async def opened(fake: FakeKucoin):
    source = CcxtExchange("kucoin", ccxt_options(fake.base_url))
    try:
        await source.open()
        yield source
    finally:
        await source.close()


def as_tuples(rows) -> list[tuple]:
    return [(int(r[0]), *(float(v) for v in r[1:6])) for r in rows]


def closed(symbol: str, timeframe: str, opens) -> list[tuple]:
    return [candle(symbol, timeframe, t) for t in opens]


async def test_markets_and_clock_load_from_symbols_and_timestamp_alone(fake):
    async with opened(fake) as source:
        markets = {m.symbol: m for m in source.markets()}
        assert source.now_ms() == pytest.approx(NOW_MS, abs=1_000)
    assert set(markets) == {"BTC/USDT", "NEW/USDT", "OLD/USDT"}
    assert markets["BTC/USDT"].type == "spot" and markets["BTC/USDT"].active
    assert not markets["OLD/USDT"].active
    assert [r.path for r in fake.request_log()] == ["/api/v2/symbols", "/api/v1/timestamp"]
    assert source.capabilities.max_page_size == MAX_CANDLES  # ccxt's features, spot


async def test_a_page_is_exactly_the_fakes_candles_asked_in_seconds(fake):
    since = T0 - 100 * MINUTE
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, since + 49 * MINUTE, 50)
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(since, since + 50 * MINUTE, MINUTE))
    (request,) = fake.candle_requests("BTC/USDT")
    assert request.params["type"] == "1min"
    assert request.params["startAt"] == str(since // 1000)
    assert request.params["endAt"] == str((since + 50 * MINUTE) // 1000)  # ccxt: since + limit


async def test_since_is_floored_to_seconds_and_candles_start_at_the_next_open(fake):
    since = T0 - 10 * HOUR + 1_999  # 1.999 s into an hour
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1h", since, since + 5 * HOUR, 5)
    assert fake.candle_requests()[0].params["startAt"] == str(since // 1000)  # T0 - 10h + 1 s
    first = T0 - 9 * HOUR  # [startAt, endAt) = [T0 - 10h + 1 s, T0 - 5h + 1 s): five opens
    assert as_tuples(rows) == closed("BTC/USDT", "1h", range(first, first + 5 * HOUR, HOUR))


async def test_a_window_wider_than_a_page_is_answered_from_its_newest_end(fake):
    since = T0 - 4 * 24 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, since + 2000 * MINUTE, 2000)
    end = since + 2000 * MINUTE
    first = end - MAX_CANDLES * MINUTE  # the oldest 500 of the window are not in the answer
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(first, end, MINUTE))


async def test_the_newest_row_is_the_candle_in_progress_unflagged(fake):
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", T0 - 3 * MINUTE, NOW_MS, 10)
    opens = range(T0 - 3 * MINUTE, T0, MINUTE)
    expected = [*closed("BTC/USDT", "1m", opens), provisional_candle("BTC/USDT", "1m", T0, NOW_MS)]
    assert as_tuples(rows) == expected


async def test_listing_and_maintenance_gap_leave_exactly_the_candles_that_exist(fake):
    since = T0 - 4 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("NEW/USDT", "1m", since, T0 - MINUTE, 240)
    assert as_tuples(rows) == expected_candles(NEW, "1m", since, T0, NOW_MS)
    assert rows and int(rows[0][0]) == LISTED_MS - 40_000 + MINUTE


async def test_a_window_before_the_listing_is_an_empty_page(fake):
    since = LISTED_MS - 10 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("NEW/USDT", "1h", since, since + 5 * HOUR, 5)
    assert list(rows) == []


async def test_bad_pair_and_bad_type_are_kucoin_400100_and_permanent(fake):
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            fake.base_url + CANDLES_PATH, params={"symbol": "NOPE-USDT", "type": "1min"}
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["code"] == "400100"
    async with opened(fake) as source:
        with pytest.raises(PermanentFault):
            await source.fetch_ohlcv("NOPE/USDT", "1m", T0 - HOUR, T0, 10)  # ccxt: unknown
        with pytest.raises(PermanentFault):  # on the wire: ccxt maps 400100 to BadRequest
            await source._call("publicGetMarketCandles", {"symbol": "NOPE-USDT", "type": "1min"})
        with pytest.raises(PermanentFault):
            await source._call("publicGetMarketCandles", {"symbol": "BTC-USDT", "type": "2min"})


@pytest.mark.parametrize("kind", ["500", "503", "502", "truncated", "garbage"])
async def test_server_faults_are_transient(fake, kind):
    async with opened(fake) as source:
        fake.inject(kind)
        with pytest.raises(TransientFault) as caught:
            await source.fetch_ohlcv("BTC/USDT", "1m", T0 - HOUR, T0, 10)
    assert not isinstance(caught.value, RateLimited)


async def test_429000_is_rate_limited_and_kucoin_shaped(fake):
    async with opened(fake) as source:
        fake.inject("429", retry_after=3)
        with pytest.raises(RateLimited) as caught:
            await source.fetch_ohlcv("BTC/USDT", "1m", T0 - HOUR, T0, 10)
    assert caught.value.status == 429
    assert caught.value.retry_after_s == 3  # gw-ratelimit-reset: 3000 ms
    async with aiohttp.ClientSession() as http:
        fake.inject("429", retry_after=3)
        async with http.get(fake.base_url + CANDLES_PATH) as response:
            assert response.status == 429
            assert (await response.json())["code"] == "429000"
            assert response.headers["gw-ratelimit-reset"] == "3000"
            assert "X-MBX-USED-WEIGHT-1M" not in response.headers
