"""The fake Binance server must look like Binance to real ccxt, or collector tests prove nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import ccxt.async_support as ccxt
import pytest
from fake_exchange import (
    EPOCH_WEEK_ORIGIN_MS,
    TIMEFRAME_MS,
    FakeExchange,
    SymbolSpec,
    candle,
    expected_candles,
    make_symbols,
    provisional_candle,
)

MINUTE = 60_000
HOUR = 3_600_000
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z
NOW_MS = T0 + 30_500  # 30.5 s into a 1m candle
LISTED_MS = T0 - 3 * HOUR + 40_000  # not on a minute boundary
GAP = (T0 - 2 * HOUR - 30_000, T0 - 90 * MINUTE)  # maintenance [a, b): 30 one-minute candles
BTC = SymbolSpec("BTC/USDT", quote_volume=5e9)
NEW = SymbolSpec("NEW/USDT", listed_at_ms=LISTED_MS, gaps=[GAP], quote_volume=1e6)


class FakeClock:
    """Settable clock so tests control which candles exist and which one is open."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> float:
        return self.now_ms / 1000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW_MS)


@pytest.fixture
def exchange(clock: FakeClock):
    halted = SymbolSpec("OLD/USDT", status="BREAK", quote_volume=1.0)
    with FakeExchange([BTC, NEW, halted, *make_symbols(3)[1:]], clock=clock) as fx:
        yield fx


@asynccontextmanager
async def binance(base_url: str, **config):
    client = ccxt.binance(
        {
            "urls": {"api": {"public": base_url + "/api/v3", "private": base_url + "/api/v3"}},
            "options": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False},
            "enableRateLimit": False,
            **config,
        }
    )
    try:
        yield client
    finally:
        await client.close()


async def get(base_url: str, endpoint: str, timeout: float = 5, **params):
    """Raw GET returning (status, headers, body text)."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(f"{base_url}/api/v3/{endpoint}", params=params) as response,
    ):
        return response.status, response.headers, await response.text()


def klines(base_url: str, **params) -> list[list]:
    status, _, body = asyncio.run(get(base_url, "klines", **params))
    assert status == 200, body
    return json.loads(body)


# --------------------------------------------------------------------------- pure functions


def test_candle_is_stable_and_ohlc_consistent():
    # Pinned value: collector tests across processes and Python versions rely on it.
    assert candle("BTC/USDT", "1m", 1_717_200_000_000) == (
        1_717_200_000_000,
        59961.54,
        60697.48,
        59520.74,
        60500.4,
        9296.954,
    )
    for timeframe, tf_ms in TIMEFRAME_MS.items():
        for spec in (BTC, SymbolSpec("DOGE/USDT"), SymbolSpec("SYM0042/USDT")):
            candles = expected_candles(spec, timeframe, NOW_MS - 50 * tf_ms, NOW_MS, NOW_MS)
            assert len(candles) >= 49
            for _, o, h, low, c, volume in candles:
                assert low <= min(o, c) <= max(o, c) <= h
                assert low > 0 and volume > 0
    assert candle("BTC/USDT", "1m", 0) != candle("BTC/USDT", "5m", 0) != candle("ETH/USDT", "5m", 0)
    with pytest.raises(ValueError):
        candle("BTC/USDT", "1h", T0 + MINUTE)


def test_provisional_candle_grows_into_the_final_one():
    open_ms = NOW_MS - NOW_MS % HOUR
    final = candle("ETH/USDT", "1h", open_ms)
    early = provisional_candle("ETH/USDT", "1h", open_ms, open_ms + 1000)
    late = provisional_candle("ETH/USDT", "1h", open_ms, open_ms + HOUR - 1)
    for _, o, h, low, c, _volume in (early, late):
        assert low <= min(o, c) <= max(o, c) <= h
    assert early[1] == final[1] and early[5] < late[5] < final[5]
    assert provisional_candle("ETH/USDT", "1h", open_ms, open_ms + HOUR) == final


def test_expected_candles_honour_listing_gaps_and_close_time():
    start, end = LISTED_MS - HOUR, NOW_MS + HOUR
    times = [c[0] for c in expected_candles(NEW, "1m", start, end, NOW_MS)]
    # The first candle opens at or after the listing time.
    assert times[0] == LISTED_MS - LISTED_MS % MINUTE + MINUTE
    # Closed candles only: the one opened at 00:00:00 closes after NOW_MS.
    assert times[-1] == T0 - MINUTE
    assert not [t for t in times if GAP[0] <= t < GAP[1]]
    assert GAP[1] in times and GAP[0] - GAP[0] % MINUTE in times
    assert len(times) == (times[-1] - times[0]) // MINUTE + 1 - 30
    assert expected_candles(NEW, "1m", times[5], times[8], NOW_MS) == [
        candle("NEW/USDT", "1m", t) for t in times[5:8]
    ]
    weekly = expected_candles(BTC, "1w", 0, NOW_MS, NOW_MS)
    assert weekly and all(datetime.fromtimestamp(c[0] / 1000, UTC).weekday() == 0 for c in weekly)


# --------------------------------------------------------------------------- ccxt over HTTP


def utc_ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)


def test_months_are_calendar_months_with_leap_years():
    listed = SymbolSpec("BTC/USDT", listed_at_ms=utc_ms(2023, 1, 15))
    now = utc_ms(2024, 3, 10)
    times = [c[0] for c in expected_candles(listed, "1M", 0, now, now)]
    # February 2023 is the first whole month after the listing; March 2024 is still open.
    assert times[0] == utc_ms(2023, 2, 1) and times[-1] == utc_ms(2024, 2, 1)
    assert times == [utc_ms(2023 + (m // 12), m % 12 + 1, 1) for m in range(1, 14)]
    with pytest.raises(ValueError):
        candle("BTC/USDT", "1M", utc_ms(2024, 1, 31))  # 30 days after January 1st
    gapped = SymbolSpec("GAP/USDT", gaps=[(utc_ms(2023, 6, 1), utc_ms(2023, 7, 1))])
    assert utc_ms(2023, 6, 1) not in [c[0] for c in expected_candles(gapped, "1M", 0, now, now)]


def test_weeks_open_on_the_given_week_origin():
    now = utc_ms(2024, 1, 20)
    monday = [c[0] for c in expected_candles(BTC, "1w", utc_ms(2024, 1, 1), now, now)]
    thursday = [
        c[0]
        for c in expected_candles(
            BTC, "1w", utc_ms(2024, 1, 1), now, now, week_origin_ms=EPOCH_WEEK_ORIGIN_MS
        )
    ]
    assert monday == [utc_ms(2024, 1, 1), utc_ms(2024, 1, 8)]
    assert thursday == [utc_ms(2024, 1, 4), utc_ms(2024, 1, 11)]
    with pytest.raises(ValueError):
        candle("BTC/USDT", "1w", utc_ms(2024, 1, 4))


async def test_ccxt_reads_3d_1M_and_thursday_weeks_as_served(clock):
    clock.now_ms = utc_ms(2024, 3, 10, 12)
    with FakeExchange([BTC], clock=clock, week_origin_ms=EPOCH_WEEK_ORIGIN_MS) as fx:
        async with binance(fx.base_url) as client:
            since = utc_ms(2024, 1, 1)
            for timeframe in ("3d", "1M", "1w"):
                rows = await client.fetch_ohlcv("BTC/USDT", timeframe, since, 100)
                closed = [tuple(r) for r in rows[:-1]]
                assert closed == expected_candles(
                    BTC,
                    timeframe,
                    since,
                    clock.now_ms,
                    clock.now_ms,
                    week_origin_ms=EPOCH_WEEK_ORIGIN_MS,
                ), timeframe
                assert rows[-1][0] <= clock.now_ms  # the candle in progress comes last
        status, _, body = await get(
            fx.base_url, "klines", symbol="BTCUSDT", interval="1M", startTime=since
        )
        assert status == 200
        months = json.loads(body)
        # Binance's close time is the last millisecond of the month (29 days in Feb 2024)
        assert [(k[0], k[6]) for k in months] == [
            (utc_ms(2024, 1, 1), utc_ms(2024, 2, 1) - 1),
            (utc_ms(2024, 2, 1), utc_ms(2024, 3, 1) - 1),
            (utc_ms(2024, 3, 1), utc_ms(2024, 4, 1) - 1),
        ]


async def test_ccxt_markets_time_and_tickers(exchange):
    async with binance(exchange.base_url) as client:
        markets = await client.load_markets()
        assert set(markets) == {"BTC/USDT", "NEW/USDT", "OLD/USDT", "ETH/USDT", "BNB/USDT"}
        btc = markets["BTC/USDT"]
        assert (btc["id"], btc["spot"], btc["active"], btc["precision"]["price"]) == (
            "BTCUSDT",
            True,
            True,
            0.01,
        )
        assert markets["OLD/USDT"]["active"] is False
        assert await client.fetch_time() == NOW_MS
        tickers = await client.fetch_tickers()
        ranked = sorted(tickers, key=lambda s: tickers[s]["quoteVolume"], reverse=True)
        assert ranked == ["BTC/USDT", "ETH/USDT", "BNB/USDT", "NEW/USDT", "OLD/USDT"]
        assert tickers["NEW/USDT"]["quoteVolume"] == 1e6


async def test_ccxt_fetch_ohlcv_returns_expected_candles(exchange, clock):
    since = NOW_MS - 1500 * MINUTE
    async with binance(exchange.base_url) as client:
        page = await client.fetch_ohlcv("BTC/USDT", "1m", since=since, limit=1000)
        assert [tuple(row) for row in page] == expected_candles(
            BTC, "1m", since, since + 1000 * MINUTE, NOW_MS
        )
        rest = await client.fetch_ohlcv("BTC/USDT", "1m", since=page[-1][0] + 1, limit=1000)
        closed, open_row = [tuple(row) for row in rest[:-1]], tuple(rest[-1])
        assert closed == expected_candles(BTC, "1m", page[-1][0] + 1, NOW_MS, NOW_MS)
        assert open_row == provisional_candle("BTC/USDT", "1m", T0, NOW_MS)
        assert open_row != candle("BTC/USDT", "1m", open_row[0])
        clock.now_ms += MINUTE
        again = await client.fetch_ohlcv("BTC/USDT", "1m", since=open_row[0], limit=1)
        assert tuple(again[0]) == candle("BTC/USDT", "1m", open_row[0])


async def test_ccxt_fetch_ohlcv_honours_listing_and_gaps(exchange):
    async with binance(exchange.base_url) as client:
        for timeframe in ("1m", "5m", "1h"):
            rows = await client.fetch_ohlcv("NEW/USDT", timeframe, since=LISTED_MS - 86_400_000)
            assert [tuple(r) for r in rows[:-1]] == expected_candles(
                NEW, timeframe, 0, NOW_MS, NOW_MS
            )
        assert await client.fetch_ohlcv("NEW/USDT", "1m", since=GAP[0], limit=3) == [
            list(c) for c in expected_candles(NEW, "1m", GAP[1], GAP[1] + 3 * MINUTE, NOW_MS)
        ]


def test_klines_limits_and_windows(exchange):
    latest = klines(exchange.base_url, symbol="BTCUSDT", interval="1m")
    assert len(latest) == 500 and latest[-1][0] == T0  # ends with the open candle
    assert [k[0] for k in latest] == sorted(k[0] for k in latest)
    start = T0 - 5000 * MINUTE
    assert (
        len(klines(exchange.base_url, symbol="BTCUSDT", interval="1m", startTime=start, limit=1500))
        == 1000
    )
    window = klines(
        exchange.base_url,
        symbol="BTCUSDT",
        interval="5m",
        startTime=start + 1,
        endTime=start + 25 * MINUTE,
        limit=1000,
    )
    assert [k[0] for k in window] == [start + i * 5 * MINUTE for i in range(1, 6)]
    kline = window[0]
    assert len(kline) == 12 and kline[6] == kline[0] + 5 * MINUTE - 1 and kline[11] == "0"
    assert all(isinstance(kline[i], str) for i in (1, 2, 3, 4, 5, 7, 9, 10))
    assert tuple([kline[0], *map(float, kline[1:6])]) == candle("BTC/USDT", "5m", kline[0])
    before = klines(exchange.base_url, symbol="NEWUSDT", interval="1h", endTime=LISTED_MS - HOUR)
    assert before == []


def test_klines_errors_look_like_binance(exchange):
    cases = [
        ({"symbol": "NOPEUSDT", "interval": "1m"}, -1121),
        ({"symbol": "BTCUSDT", "interval": "7m"}, -1120),
        ({"interval": "1m"}, -1102),
        ({"symbol": "BTCUSDT", "interval": "1m", "limit": "x"}, -1100),
        ({"symbol": "BTCUSDT", "interval": "1m", "startTime": 2, "endTime": 1}, -1023),
    ]
    for params, code in cases:
        status, _, body = asyncio.run(get(exchange.base_url, "klines", **params))
        assert (status, json.loads(body)["code"]) == (400, code)


# --------------------------------------------------------------------------- rate budget


async def test_the_weight_window_counts_another_client_and_refuses_past_its_limit():
    clock = FakeClock(T0 + 50_000)  # 50 s into a minute
    with FakeExchange(make_symbols(1), clock=clock, weight_limit=5, shared_weight=2) as fx:
        answers = [await get(fx.base_url, "ping") for _ in range(3)]
        assert [(s, int(h["X-MBX-USED-WEIGHT-1M"])) for s, h, _ in answers] == [
            (200, 3),
            (200, 4),
            (200, 5),
        ]
        status, headers, body = await get(fx.base_url, "ping")
        assert (status, headers["Retry-After"], json.loads(body)["code"]) == (429, "10", -1003)
        # Another minute: the other client's share again, then ours.
        clock.now_ms = T0 + 60_000
        status, headers, _ = await get(fx.base_url, "ping")
        assert (status, headers["X-MBX-USED-WEIGHT-1M"]) == (200, "3")


async def test_budget_escalates_from_429_to_418():
    with FakeExchange(make_symbols(1), requests_per_second=5, ban_after=2, ban_seconds=7) as fx:
        answers = []
        async with aiohttp.ClientSession() as session:  # one connection: the burst stays < 1 s
            for _ in range(10):
                async with session.get(fx.base_url + "/api/v3/ping") as response:
                    answers.append((response.status, response.headers, await response.text()))
        assert [status for status, _, _ in answers] == [200] * 5 + [429] * 3 + [418] * 2
        assert [int(h["X-MBX-USED-WEIGHT-1M"]) for _, h, _ in answers] == list(range(1, 11))
        assert answers[5][1]["Retry-After"] == "1"
        assert json.loads(answers[5][2])["code"] == -1003
        assert answers[8][1]["Retry-After"] == "7"
        async with binance(fx.base_url) as client:
            with pytest.raises(ccxt.DDoSProtection):
                await client.fetch_time()
        assert fx.counters == {"requests": 11, "429": 3, "418": 3, "faults": 0}


async def test_budget_recovers_after_retry_after_and_weighs_klines():
    with FakeExchange(make_symbols(1), requests_per_second=4, klines_weight=3) as fx:
        params = {"symbol": "BTCUSDT", "interval": "1m", "limit": 1}
        assert (await get(fx.base_url, "klines", **params))[0] == 200
        assert (await get(fx.base_url, "ping"))[0] == 200
        status, headers, _ = await get(fx.base_url, "klines", **params)
        assert status == 429
        await asyncio.sleep(int(headers["Retry-After"]))
        assert (await get(fx.base_url, "klines", **params))[0] == 200


# --------------------------------------------------------------------------- faults


async def test_each_injected_fault_kind():
    with FakeExchange(make_symbols(1), stall_seconds=0.5) as fx:
        fx.inject("500", path="time")
        assert (await get(fx.base_url, "ping"))[0] == 200  # other endpoints untouched
        status, _, body = await get(fx.base_url, "time")
        assert (status, json.loads(body)["code"]) == (500, -1000)
        fx.inject("502", path=None)
        status, headers, body = await get(fx.base_url, "ping")
        assert status == 502 and headers["Content-Type"].startswith("text/html")
        fx.inject("503", count=2)
        params = {"symbol": "BTCUSDT", "interval": "1m", "limit": 10}
        assert [(await get(fx.base_url, "klines", **params))[0] for _ in range(3)] == [
            503,
            503,
            200,
        ]
        fx.inject("truncated")
        status, _, body = await get(fx.base_url, "klines", **params)
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
        assert status == 200 and body.startswith("[[")
        fx.inject("garbage")
        status, _, body = await get(fx.base_url, "klines", **params)
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)
        fx.inject("400")
        async with binance(fx.base_url) as client:
            with pytest.raises(ccxt.BadRequest):  # permanent: a collector must not retry it
                await client.fetch_ohlcv("BTC/USDT", "1m", limit=10)
        fx.inject("429", retry_after=2)
        fx.inject("418", retry_after=3)
        assert [
            (s, h["Retry-After"])
            for s, h, _ in [await get(fx.base_url, "klines", **params) for _ in range(2)]
        ] == [(429, "2"), (418, "3")]
        fx.inject("stall")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await get(fx.base_url, "klines", timeout=0.2, **params)
        assert time.monotonic() - started < 0.45
        faults = [r.fault for r in fx.request_log() if r.fault]
        assert faults == [
            "500",
            "502",
            "503",
            "503",
            "truncated",
            "garbage",
            "400",
            "429",
            "418",
            "stall",
        ]
        assert fx.counters["faults"] == 10


def test_random_faults_are_seeded_and_path_filtered():
    def run() -> list:
        with FakeExchange(
            make_symbols(1),
            fault_rate=0.5,
            seed=7,
            fault_paths=["klines"],
            fault_kinds=("500", "502", "503", "truncated", "garbage"),
        ) as fx:
            assert [asyncio.run(get(fx.base_url, "time"))[0] for _ in range(5)] == [200] * 5
            for _ in range(40):
                asyncio.run(get(fx.base_url, "klines", symbol="BTCUSDT", interval="1h", limit=2))
            return [r.fault for r in fx.klines_requests()]

    faults = run()
    assert faults == run()
    assert 8 <= sum(f is not None for f in faults) <= 32
    assert set(faults) == {None, *("500", "502", "503", "truncated", "garbage")}
    with pytest.raises(ValueError):
        FakeExchange(fault_kinds=("404",))


async def test_latency_does_not_serialise_requests():
    with FakeExchange(make_symbols(1), latency_s=0.2, latency_jitter_s=0.05) as fx:
        started = time.monotonic()
        answers = await asyncio.gather(*(get(fx.base_url, "ping") for _ in range(10)))
        elapsed = time.monotonic() - started
        assert [a[0] for a in answers] == [200] * 10
        assert 0.2 <= elapsed < 0.6


# --------------------------------------------------------------------------- log and lifecycle


def test_request_log_and_reset(exchange):
    klines(exchange.base_url, symbol="BTCUSDT", interval="1m", limit=5)
    klines(exchange.base_url, symbol="NEWUSDT", interval="1h", limit=5)
    asyncio.run(get(exchange.base_url, "klines", symbol="NOPEUSDT", interval="1m"))
    assert len(exchange.klines_requests()) == 3
    [record] = exchange.klines_requests("BTC/USDT")
    assert (record.path, record.params, record.status) == (
        "/api/v3/klines",
        {"symbol": "BTCUSDT", "interval": "1m", "limit": "5"},
        200,
    )
    assert exchange.klines_requests("NOPEUSDT")[0].status == 400
    assert exchange.counters["requests"] == 3
    exchange.reset_log()
    assert exchange.request_log() == [] and exchange.counters["requests"] == 0


def test_restart_on_the_same_port():
    fx = FakeExchange(make_symbols(1))
    url = fx.start()
    assert asyncio.run(get(url, "ping"))[0] == 200
    fx.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        asyncio.run(get(url, "ping"))
    assert fx.start() == url  # same instance keeps its port
    fx.stop()
    with FakeExchange(make_symbols(1), port=fx.port) as again:
        assert again.base_url == url and asyncio.run(get(url, "ping"))[0] == 200


def test_runs_as_a_process():
    script = Path(__file__).parents[1] / "support" / "fake_exchange.py"
    process = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--port",
            "0",
            "--symbols",
            "3",
            "--rps",
            "1",
            "--start-time",
            str(NOW_MS / 1000),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        status, _, body = asyncio.run(get(url, "time"))
        assert status == 200 and 0 <= json.loads(body)["serverTime"] - NOW_MS < 5000
        assert asyncio.run(get(url, "time"))[0] == 429
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=5)
    assert process.returncode == 0
    assert json.loads(out) == {"requests": 2, "429": 1, "418": 0, "faults": 0}
