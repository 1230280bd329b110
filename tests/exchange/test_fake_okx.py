"""The fake OKX must look like OKX to real ccxt, through our adapter, or the OKX collector
tests prove nothing."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import aiohttp
import pytest
from fake_exchange import SymbolSpec, candle, expected_candles, provisional_candle
from fake_okx import CANDLES_PATH, HISTORY_PATH, INSTRUMENTS_PATH, TIME_PATH, FakeOkx, ccxt_options

from tda_collector.errors import PermanentFault, RateLimited, TransientFault
from tda_collector.exchange.ccxt_source import CcxtExchange

MINUTE = 60_000
HOUR = 3_600_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z: far older than 1,440 bars, so history-candles
NOW_MS = T0 + 30_500  # 30.5 s into a 1m candle
LISTED_MS = T0 - 3 * HOUR + 40_000  # not on a minute boundary
GAP = (T0 - 2 * HOUR - 30_000, T0 - 90 * MINUTE)
BTC = SymbolSpec("BTC/USDT")
NEW = SymbolSpec("NEW/USDT", listed_at_ms=LISTED_MS, gaps=[GAP])
HALTED = SymbolSpec("OLD/USDT", status="BREAK")


@pytest.fixture
def fake():
    with FakeOkx([BTC, NEW, HALTED], clock=lambda: NOW_MS / 1000) as fx:
        yield fx


@asynccontextmanager
async def opened(fake: FakeOkx, **extra_options):
    options = ccxt_options(fake.base_url)
    options["options"].update(extra_options)
    source = CcxtExchange("okx", options)
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
    assert fake.request_log()[0].params == {"instType": "SPOT"}


async def test_an_old_page_comes_from_history_candles_exactly(fake):
    since = T0 - 100 * MINUTE
    end = since + 50 * MINUTE
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, end - 1, 50)
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(since, end, MINUTE))
    (request,) = fake.candle_requests("BTC/USDT")
    assert request.path == HISTORY_PATH
    assert request.params["bar"] == "1m"
    assert request.params["limit"] == "50"
    assert request.params["before"] == str(since - 1)  # exclusive: since itself is included
    assert request.params["after"] == str(end - 1)  # ccxt sends `until` as OKX's `after`


async def test_after_is_exclusive_so_the_candle_opening_at_until_is_not_returned(fake):
    since = T0 - 10 * HOUR
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1h", since, since + 5 * HOUR, 10)
    assert as_tuples(rows) == closed("BTC/USDT", "1h", range(since, since + 5 * HOUR, HOUR))


async def test_a_window_wider_than_a_page_is_answered_from_its_newest_end(fake):
    since = T0 - 4 * 24 * HOUR
    end = since + 1000 * MINUTE
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, end - 1, 1000)
    (request,) = fake.candle_requests()
    assert request.params["limit"] == "300"  # ccxt caps limit at 300
    # the newest 300 of the window, not the 300 from `since`: the oldest 700 are not in it
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(end - 300 * MINUTE, end, MINUTE))


async def test_history_cap_of_100_clamps_a_page_of_300_silently():
    with FakeOkx([BTC], clock=lambda: NOW_MS / 1000, history_cap=100) as fake:
        since = T0 - 2 * 24 * HOUR
        end = since + 300 * MINUTE
        async with opened(fake) as source:
            rows = await source.fetch_ohlcv("BTC/USDT", "1m", since, end - 1, 300)
    assert as_tuples(rows) == closed("BTC/USDT", "1m", range(end - 100 * MINUTE, end, MINUTE))


async def test_recent_candles_endpoint_reaches_only_the_newest_1440():
    now_ms = int(time.time() * 1000)
    with FakeOkx([BTC], clock=lambda: now_ms / 1000) as fake:
        current = now_ms - now_ms % MINUTE
        async with opened(fake) as source:
            recent = await source.fetch_ohlcv("BTC/USDT", "1m", current - 5 * MINUTE, now_ms, 10)
        async with opened(fake, fetchOHLCV={"type": "Candles"}) as source:
            since = current - 1600 * MINUTE
            deep = await source.fetch_ohlcv("BTC/USDT", "1m", since, since + 99 * MINUTE, 100)
            edge_since = current - 1445 * MINUTE
            edge_end = edge_since + 10 * MINUTE
            edge = await source.fetch_ohlcv("BTC/USDT", "1m", edge_since, edge_end - 1, 10)
    assert [r.path for r in fake.candle_requests()] == [CANDLES_PATH] * 3
    expected = closed("BTC/USDT", "1m", range(current - 5 * MINUTE, current, MINUTE))
    assert as_tuples(recent) == [*expected, provisional_candle("BTC/USDT", "1m", current, now_ms)]
    assert list(deep) == []  # older than the newest 1,440: only history-candles has it
    first = current - 1439 * MINUTE
    assert as_tuples(edge) == closed("BTC/USDT", "1m", range(first, edge_end, MINUTE))


async def test_the_candle_in_progress_is_flagged_confirm_0_on_the_wire(fake):
    async with aiohttp.ClientSession() as http:
        params = {"instId": "BTC-USDT", "bar": "1m", "limit": "3"}
        async with http.get(fake.base_url + HISTORY_PATH, params=params) as response:
            body = await response.json()
    assert body["code"] == "0"
    assert [row[0] for row in body["data"]] == [str(T0 - k * MINUTE) for k in range(3)]
    assert [row[8] for row in body["data"]] == ["0", "1", "1"]
    assert all(isinstance(v, str) for row in body["data"] for v in row)
    async with opened(fake) as source:  # ccxt drops the flag: the adapter sees a plain row
        rows = await source.fetch_ohlcv("BTC/USDT", "1m", T0 - 2 * MINUTE, NOW_MS, 10)
    expected = [*closed("BTC/USDT", "1m", [T0 - 2 * MINUTE, T0 - MINUTE])]
    assert as_tuples(rows) == [*expected, provisional_candle("BTC/USDT", "1m", T0, NOW_MS)]


@pytest.mark.parametrize(
    ("timeframe", "bar", "step"),
    [("1h", "1H", HOUR), ("4h", "4H", 4 * HOUR), ("1d", "1Dutc", 24 * HOUR)],
)
async def test_bars_of_an_hour_and_more_use_okx_names(fake, timeframe, bar, step):
    since = T0 - 20 * step
    async with opened(fake) as source:
        rows = await source.fetch_ohlcv("BTC/USDT", timeframe, since, since + 10 * step - 1, 10)
    assert fake.candle_requests()[0].params["bar"] == bar
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


async def test_unknown_instrument_is_51001_with_http_200_and_permanent(fake):
    async with aiohttp.ClientSession() as http:
        params = {"instId": "NOPE-USDT", "bar": "1m"}
        async with http.get(fake.base_url + HISTORY_PATH, params=params) as response:
            assert response.status == 200
            assert (await response.json())["code"] == "51001"
    async with opened(fake) as source:
        with pytest.raises(PermanentFault):  # on the wire: ccxt maps 51001 to BadSymbol
            await source._call("publicGetMarketHistoryCandles", {"instId": "NOPE-USDT"})
        with pytest.raises(PermanentFault):  # 51000: bad bar
            await source._call(
                "publicGetMarketHistoryCandles", {"instId": "BTC-USDT", "bar": "2min"}
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


@pytest.mark.parametrize("kind", ["429", "418"])
async def test_50011_is_rate_limited_and_okx_shaped(fake, kind):
    async with opened(fake) as source:
        fake.inject(kind)
        with pytest.raises(RateLimited) as caught:
            await source.fetch_ohlcv("BTC/USDT", "1m", T0 - HOUR, T0 - 1, 10)
    assert caught.value.status == 429
    async with aiohttp.ClientSession() as http:
        fake.inject("429")
        async with http.get(fake.base_url + HISTORY_PATH) as response:
            assert response.status == 429
            assert (await response.json())["code"] == "50011"
            assert "X-MBX-USED-WEIGHT-1M" not in response.headers
