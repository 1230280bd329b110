"""The fake Bybit must look like Bybit to real ccxt, through our adapter, or the Bybit collector
tests prove nothing."""

from __future__ import annotations

from contextlib import asynccontextmanager

import aiohttp
import pytest
from fake_bybit import INSTRUMENTS_PATH, KLINE_PATH, MAX_LIMIT, TIME_PATH, FakeBybit, ccxt_options
from fake_exchange import SymbolSpec, candle, expected_candles, provisional_candle

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
    with FakeBybit([BTC, NEW, HALTED], clock=lambda: NOW_MS / 1000) as fx:
        yield fx


@asynccontextmanager
async def opened(fake: FakeBybit):
    source = CcxtExchange("bybit", ccxt_options(fake.base_url))
    try:
        await source.open()
        yield source
    finally:
        await source.close()


def as_tuples(rows) -> list[tuple]:
    return [(int(r[0]), *(float(v) for v in r[1:6])) for r in rows]


def closed(symbol: str, timeframe: str, opens) -> list[tuple]:
    return [candle(symbol, timeframe, t) for t in opens]


async def test_markets_and_clock_load_from_instruments_and_time_alone(fake):
    async with opened(fake) as source:
        markets = {m.symbol: m for m in source.markets()}
        assert source.now_ms() == pytest.approx(NOW_MS, abs=1_000)
    assert set(markets) == {"BTC/USDT", "NEW/USDT", "OLD/USDT"}
    assert markets["BTC/USDT"].type == "spot" and markets["BTC/USDT"].active
    assert not markets["OLD/USDT"].active
    assert [r.path for r in fake.request_log()] == [INSTRUMENTS_PATH, TIME_PATH]
    assert fake.request_log()[0].params == {"category": "spot"}


async def test_a_page_is_exactly_the_fakes_candles_asked_in_ms(fake):
    since = T0 - 100 * MINUTE
    end = since + 50 * MINUTE
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, end - 1, 50)
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(since, end, MINUTE))
    (request,) = fake.candle_requests("BTC/USDT")
    assert request.params == {
        "category": "spot",
        "symbol": "BTCUSDT",
        "interval": "1",
        "start": str(since),
        "end": str(end - 1),
        "limit": "50",
    }


async def test_a_window_wider_than_a_page_is_answered_from_its_oldest_end(fake):
    since = T0 - 4 * 24 * HOUR
    end = since + 2000 * MINUTE
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, end - 1, 1000)
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(since, since + 1000 * MINUTE, MINUTE))


async def test_a_limit_above_1000_is_clamped(fake):
    since = T0 - 4 * 24 * HOUR
    async with opened(fake) as source:
        rows = await source._call(
            "publicGetV5MarketKline",
            {
                "category": "spot",
                "symbol": "BTCUSDT",
                "interval": "1",
                "start": since,
                "limit": 5000,
            },
        )
    assert len(rows["result"]["list"]) == MAX_LIMIT


async def test_ccxt_rounds_since_up_and_the_candle_containing_start_comes_first(fake):
    since = T0 - 10 * HOUR + 1_999  # 1.999 s into an hour: ccxt asks from the next hour
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1h", since, since + 5 * HOUR, 5)
        raw = await source._call(
            "publicGetV5MarketKline",
            {"category": "spot", "symbol": "BTCUSDT", "interval": "60", "start": since, "limit": 2},
        )
    assert fake.candle_requests()[0].params["start"] == str(T0 - 9 * HOUR)
    assert as_tuples(rows) == closed("BTC/USDT", "1h", range(T0 - 9 * HOUR, T0 - 4 * HOUR, HOUR))
    # on the wire, a start inside a candle gets that candle first (newest first in the list)
    assert [row[0] for row in raw["result"]["list"]] == [str(T0 - 9 * HOUR), str(T0 - 10 * HOUR)]


async def test_the_newest_row_is_the_candle_in_progress_unflagged(fake):
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", T0 - 3 * MINUTE, NOW_MS, 10)
    opens = range(T0 - 3 * MINUTE, T0, MINUTE)
    expected = [*closed("BTC/USDT", "1m", opens), provisional_candle("BTC/USDT", "1m", T0, NOW_MS)]
    assert as_tuples(rows) == expected


@pytest.mark.parametrize(
    ("timeframe", "interval", "step"),
    [("1h", "60", HOUR), ("4h", "240", 4 * HOUR), ("1d", "D", 24 * HOUR)],
)
async def test_intervals_use_bybit_names(fake, timeframe, interval, step):
    since = T0 - 20 * step
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", timeframe, since, since + 10 * step - 1, 10)
    assert fake.candle_requests()[0].params["interval"] == interval
    assert as_tuples(rows) == closed("BTC/USDT", timeframe, range(since, since + 10 * step, step))


async def test_listing_and_maintenance_gap_leave_exactly_the_candles_that_exist(fake):
    since = T0 - 4 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("NEW/USDT", "1m", since, T0 - 1, 240)
    assert as_tuples(rows) == expected_candles(NEW, "1m", since, T0, NOW_MS)
    assert rows and int(rows[0][0]) == LISTED_MS - 40_000 + MINUTE


async def test_a_window_before_the_listing_is_an_empty_page(fake):
    since = LISTED_MS - 10 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("NEW/USDT", "1h", since, since + 5 * HOUR - 1, 5)
    assert list(rows) == []


async def test_unsupported_symbol_is_10001_with_http_200_and_permanent(fake):
    async with aiohttp.ClientSession() as http:
        params = {"category": "spot", "symbol": "NOPEUSDT", "interval": "1"}
        async with http.get(fake.base_url + KLINE_PATH, params=params) as response:
            assert response.status == 200
            body = await response.json()
            assert (body["retCode"], body["retMsg"]) == (10001, "Not supported symbols")
    async with opened(fake) as source:
        with pytest.raises(PermanentFault):  # on the wire: ccxt maps it to BadSymbol
            await source._call("publicGetV5MarketKline", {**params})
        with pytest.raises(PermanentFault):  # a bad interval: BadRequest
            await source._call(
                "publicGetV5MarketKline", {**params, "symbol": "BTCUSDT", "interval": "2"}
            )
        with pytest.raises(PermanentFault):  # ccxt: unknown symbol
            await source.fetch_ohlcv("NOPE/USDT", "1m", T0 - HOUR, T0, 10)


@pytest.mark.parametrize("kind", ["500", "503", "502", "truncated", "garbage"])
async def test_server_faults_are_transient(fake, kind):
    async with opened(fake) as source:
        fake.inject(kind)
        with pytest.raises(TransientFault) as caught:
            await source.fetch_ohlcv("BTC/USDT", "1m", T0 - HOUR, T0 - 1, 10)
    assert not isinstance(caught.value, RateLimited)


async def test_10006_too_many_visits_is_rate_limited_and_bybit_shaped(fake):
    async with opened(fake) as source:
        fake.inject("429", retry_after=3)
        with pytest.raises(RateLimited) as caught:
            await source.fetch_ohlcv("BTC/USDT", "1m", T0 - HOUR, T0 - 1, 10)
    # A refusal in an HTTP 200 answer counts as a 429; the wait is until the reset timestamp.
    assert caught.value.status == 429
    assert caught.value.retry_after_s == pytest.approx(3, abs=0.5)
    async with aiohttp.ClientSession() as http:
        fake.inject("429", retry_after=3)
        async with http.get(fake.base_url + KLINE_PATH) as response:
            assert response.status == 200
            assert (await response.json())["retCode"] == 10006
            assert response.headers["X-Bapi-Limit-Reset-Timestamp"] == str(NOW_MS + 3000)
            assert "X-MBX-USED-WEIGHT-1M" not in response.headers


async def test_an_ip_ban_is_http_403_and_rate_limited(fake):
    async with opened(fake) as source:
        fake.inject("418")
        with pytest.raises(RateLimited) as caught:
            await source.fetch_ohlcv("BTC/USDT", "1m", T0 - HOUR, T0 - 1, 10)
    assert caught.value.status == 403
    # No header says how long: Bybit's documented least ban, so that no retry prolongs it.
    assert caught.value.retry_after_s == 600
