"""The fake Kraken must look like Kraken to real ccxt, through our adapter, or the Kraken tests
prove nothing. Semantics are Kraken's documented ones (see fake_kraken's docstring)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import aiohttp
import ccxt.async_support as ccxt
import pytest
from fake_exchange import SymbolSpec, candle, expected_candles, provisional_candle
from fake_kraken import MAX_ENTRIES, OHLC_PATH, FakeKraken, ccxt_options, pair_id

from tda_collector.errors import PermanentFault, RateLimited, TransientFault
from tda_collector.exchange.ccxt_source import CcxtExchange

MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z
NOW_MS = T0 + 30_500  # 30.5 s into a 1m candle
LISTED_MS = T0 - 3 * HOUR + 40_000
GAP = (T0 - 2 * HOUR - 30_000, T0 - 90 * MINUTE)
BTC = SymbolSpec("BTC/USD")
SOL = SymbolSpec("SOL/USD", listed_at_ms=LISTED_MS, gaps=[GAP])


class FakeClock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW_MS)


@pytest.fixture
def kraken(clock):
    with FakeKraken([BTC, SOL], clock=clock) as fx:
        yield fx


@asynccontextmanager
async def opened(fx: FakeKraken, clock: FakeClock):
    source = CcxtExchange("kraken", ccxt_options(fx.base_url, timeout_ms=5_000), clock=clock)
    try:
        await source.open()
        yield source
    finally:
        await source.close()


def fetch(fx, clock, symbol, timeframe, since_ms, until_ms, limit=MAX_ENTRIES):
    async def go():
        async with opened(fx, clock) as source:
            return await source.fetch_ohlcv(symbol, timeframe, since_ms, until_ms, limit)

    return [tuple(row[:6]) for row in asyncio.run(go())]


def raw_ohlc(fx: FakeKraken, **params) -> dict:
    async def go():
        async with (
            aiohttp.ClientSession() as session,
            session.get(fx.base_url + OHLC_PATH, params=params) as response,
        ):
            assert response.status == 200
            return json.loads(await response.text())

    return asyncio.run(go())


def test_markets_and_clock_load_through_the_adapter(kraken, clock):
    async def go():
        async with opened(kraken, clock) as source:
            markets = {m.symbol: m for m in source.markets()}
            return markets, source.now_ms()

    markets, now_ms = asyncio.run(go())
    assert set(markets) == {"BTC/USD", "SOL/USD"}
    assert all(m.type == "spot" and m.quote == "USD" and m.active for m in markets.values())
    assert abs(now_ms - NOW_MS) < 1_000  # Kraken's clock has whole seconds
    assert pair_id("BTC/USD") == "XXBTZUSD" and pair_id("SOL/USD") == "SOLUSD"


def test_ccxt_parses_the_wire_rows_to_exactly_the_world_candles(kraken, clock):
    async def go():
        client = ccxt.kraken({**ccxt_options(kraken.base_url), "enableRateLimit": False})
        try:
            return await client.fetch_ohlcv("BTC/USD", "1h", T0 - 50 * HOUR)
        finally:
            await client.close()

    rows = [tuple(r) for r in asyncio.run(go())]
    closed = expected_candles(BTC, "1h", T0 - 50 * HOUR, NOW_MS, NOW_MS)
    assert rows[:-1] == closed
    assert rows[-1] == provisional_candle("BTC/USD", "1h", T0, NOW_MS)  # the last is open
    (request,) = kraken.candle_requests("BTC/USD")
    # ccxt asks one interval earlier: Kraken's since is exclusive.
    assert request.params["interval"] == "60"
    assert request.params["since"] == str((T0 - 51 * HOUR) // 1000)


def test_adapter_returns_exactly_the_candles_from_since_with_the_open_one_last(kraken, clock):
    since = T0 - 4 * HOUR
    rows = fetch(kraken, clock, "SOL/USD", "1m", since, T0, MAX_ENTRIES)
    assert rows[:-1] == expected_candles(SOL, "1m", since, NOW_MS, NOW_MS)
    assert rows[0][0] == LISTED_MS - LISTED_MS % MINUTE + MINUTE  # nothing before the listing
    assert not [r for r in rows if GAP[0] <= r[0] < GAP[1]]  # the maintenance hole stays one
    assert rows[-1] == provisional_candle("SOL/USD", "1m", T0, NOW_MS)


def test_since_older_than_720_candles_still_answers_only_the_newest_720(kraken, clock):
    rows = fetch(kraken, clock, "BTC/USD", "1m", T0 - 3 * DAY, T0, MAX_ENTRIES)
    assert len(rows) == MAX_ENTRIES
    assert rows[0][0] == T0 - (MAX_ENTRIES - 1) * MINUTE  # the depth limit, not since
    assert rows[:-1] == expected_candles(BTC, "1m", T0 - 3 * DAY, NOW_MS, NOW_MS)[-719:]
    hourly = raw_ohlc(kraken, pair="XBTUSD", interval=60, since=0)["result"]["XXBTZUSD"]
    assert len(hourly) == MAX_ENTRIES and hourly[-1][0] * 1000 == T0  # 30 days, the open last


def test_the_open_candle_is_always_present_and_last_names_the_newest_committed(kraken, clock):
    body = raw_ohlc(kraken, pair="XXBTZUSD", interval=1, since=NOW_MS // 1000 + 3600)
    (row,) = body["result"]["XXBTZUSD"]
    assert row[0] * 1000 == T0 and len(row) == 8
    assert body["result"]["last"] == (T0 - MINUTE) // 1000
    body = raw_ohlc(kraken, pair="XXBTZUSD", interval=1, since=(T0 - 3 * MINUTE) // 1000)
    times = [r[0] * 1000 for r in body["result"]["XXBTZUSD"]]
    assert times == [T0 - 2 * MINUTE, T0 - MINUTE, T0]  # since itself is excluded
    assert [float(v) for v in body["result"]["XXBTZUSD"][0][1:5]] == list(
        candle("BTC/USD", "1m", T0 - 2 * MINUTE)[1:5]
    )


def test_kraken_errors_come_in_its_own_shape(kraken):
    assert raw_ohlc(kraken, pair="NOPEUSD", interval=1) == {
        "error": ["EQuery:Unknown asset pair"],
        "result": {},
    }
    assert raw_ohlc(kraken, pair="XXBTZUSD", interval=2)["error"] == ["EGeneral:Invalid arguments"]


def test_an_unknown_symbol_is_a_permanent_fault(kraken, clock):
    with pytest.raises(PermanentFault):
        fetch(kraken, clock, "NOPE/USD", "1m", T0 - HOUR, T0)


def test_a_pair_kraken_no_longer_knows_is_a_permanent_fault(kraken, clock):
    async def go():
        async with opened(kraken, clock) as source:
            del kraken.pairs["SOLUSD"], kraken._by_altname["SOLUSD"]  # delisted after loading
            return await source.fetch_ohlcv("SOL/USD", "1m", T0 - HOUR, T0, 60)

    with pytest.raises(PermanentFault):
        asyncio.run(go())


@pytest.mark.parametrize(
    ("kind", "fault"),
    [("500", TransientFault), ("503", TransientFault), ("502", TransientFault)],
)
def test_server_errors_are_transient(kraken, clock, kind, fault):
    kraken.inject(kind, path=OHLC_PATH)
    with pytest.raises(fault):
        fetch(kraken, clock, "BTC/USD", "1m", T0 - HOUR, T0)


def test_rate_limit_answers_are_rate_limited(kraken, clock):
    kraken.inject("429", path=OHLC_PATH, retry_after=3)
    with pytest.raises(RateLimited):
        fetch(kraken, clock, "BTC/USD", "1m", T0 - HOUR, T0)
    assert kraken.candle_requests()[-1].status == 429


def test_invalid_arguments_are_permanent(kraken, clock):
    kraken.inject("400", path=OHLC_PATH)
    with pytest.raises(PermanentFault):
        fetch(kraken, clock, "BTC/USD", "1m", T0 - HOUR, T0)
