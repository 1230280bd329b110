"""The exchange adapter's klines fast path: exact floats, and JSON parsing for anything else."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from collector_support import FROZEN_NOW_S, ccxt_options
from fake_exchange import FakeExchange, SymbolSpec, expected_candles

from tda_collector.errors import RateLimited, TransientFault
from tda_collector.exchange.ccxt_source import CcxtExchange, klines_matrix
from tda_collector.exchange.source import Capabilities
from tda_collector.normalize import _to_matrix

MINUTE_MS = 60_000


def kline(open_ms: int, prices: list[str]) -> str:
    """One Binance kline: open time, OHLCV as strings, then the six fields we do not store."""
    o, h, low, c, v = (f'"{p}"' for p in prices)
    return f'[{open_ms},{o},{h},{low},{c},{v},{open_ms + 59_999},"1.5",7,"0.5","0.7","0"]'


def random_decimal(rng: random.Random) -> str:
    """Decimal strings as exchanges print them, from meme-coin to BTC levels."""
    digits = rng.choice([2, 4, 8, 12])
    return f"{rng.uniform(0, 10 ** rng.randint(-9, 6)):.{digits}f}"


def test_klines_parse_to_exactly_what_float_gives():
    rng = random.Random(7)
    rows = [[random_decimal(rng) for _ in range(5)] for _ in range(2_000)]
    body = "[" + ",".join(kline(i * MINUTE_MS, r) for i, r in enumerate(rows)) + "]"

    matrix = klines_matrix(body)

    expected = np.array([[i * MINUTE_MS, *map(float, r)] for i, r in enumerate(rows)])
    assert matrix is not None and matrix.shape == (2_000, 6)
    assert np.array_equal(matrix, expected)  # bit for bit, not approximately


def test_an_empty_page_is_an_empty_matrix():
    assert klines_matrix("[]").shape == (0, 6)
    assert klines_matrix(" [] \n").shape == (0, 6)


GOOD = kline(0, ["1", "2", "0.5", "1.5", "10"])


@pytest.mark.parametrize(
    "body",
    [
        f"[{GOOD},{GOOD}"[:-20],  # truncated mid-row
        f"[{GOOD},{GOOD[:-5]}]",  # truncated row, closed again
        "<html><body>502 Bad Gateway</body></html>",
        '{"code":-1121,"msg":"Invalid symbol."}',
        f"[{GOOD}, {GOOD}]",  # JSON whitespace: valid, but not the plain shape
        '[[0,"1","2","0.5","1.5"]]',  # five fields
        f'[{GOOD},[60000,"1","2","0.5","1.5"]]',  # ragged rows
        '[[0,"1","2","0.5","1.5",""]]',  # an empty value
        '[[0,"1","2","0.5","1.5","abc"]]',  # not a number
        '[[0,"1","2","0.5","1.5",null]]',
        '[[0,[1],"2","0.5","1.5","1"]]',  # nested
        f"[{GOOD},[],{GOOD}]",  # an empty row
        f"[{GOOD},\n{GOOD}]",  # a line break between rows
    ],
)
def test_anything_but_the_plain_shape_is_left_to_the_json_parser(body):
    assert klines_matrix(body) is None


SPEC = SymbolSpec("BTC/USDT")
NOW_MS = int(FROZEN_NOW_S * 1000)
START = NOW_MS // MINUTE_MS * MINUTE_MS - 1_000 * MINUTE_MS


async def fetch_page(base_url: str, generic: bool) -> object:
    """One 1,000-candle page; `generic` takes ccxt's own fetch_ohlcv, as other exchanges do."""
    exchange = CcxtExchange("binance", ccxt_options(base_url))
    if generic:
        exchange.capabilities = Capabilities(max_page_size=1000)
    try:
        await exchange.open()
        return await exchange.fetch_ohlcv("BTC/USDT", "1m", START, START + 999 * MINUTE_MS, 1000)
    finally:
        await exchange.close()


def expected_page() -> np.ndarray:
    expected = expected_candles(SPEC, "1m", START, START + 1_000 * MINUTE_MS, NOW_MS)
    assert len(expected) == 1_000
    return np.array(expected, dtype=np.float64)


def test_a_binance_spot_page_arrives_as_a_float_matrix_equal_to_the_exchange_candles():
    with FakeExchange([SPEC], clock=lambda: FROZEN_NOW_S) as fake:
        page = asyncio.run(fetch_page(fake.base_url, generic=False))

    assert isinstance(page, np.ndarray)  # the fast path, not ccxt's JSON parsing
    matrix, malformed = _to_matrix(page)
    assert malformed == 0
    assert np.array_equal(matrix, expected_page())


def test_the_generic_path_returns_ccxt_rows_equal_to_the_exchange_candles():
    with FakeExchange([SPEC], clock=lambda: FROZEN_NOW_S) as fake:
        page = asyncio.run(fetch_page(fake.base_url, generic=True))

    assert isinstance(page, list)
    matrix, malformed = _to_matrix(page)
    assert malformed == 0
    assert np.array_equal(matrix, expected_page())


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_the_generic_path_refuses_a_body_ccxt_could_not_parse(kind):
    """ccxt turns such a body into no candles at all, which would skip real data."""
    with FakeExchange([SPEC], clock=lambda: FROZEN_NOW_S) as fake:
        fake.inject(kind)
        with pytest.raises(TransientFault, match="unparsable response body"):
            asyncio.run(fetch_page(fake.base_url, generic=True))


def test_every_answer_reports_the_ips_used_weight_with_when_its_request_left():
    """Markets, server time and candles alike, and a 429 too: the guard must see them all."""
    readings: list[tuple[int, int]] = []

    async def run(fake: FakeExchange) -> None:
        exchange = CcxtExchange("binance", ccxt_options(fake.base_url))
        exchange.watch_used_weight("x-mbx-used-weight-1m", lambda *r: readings.append(r))
        try:
            await exchange.open()
            await exchange.fetch_ohlcv("BTC/USDT", "1m", START, START + 999 * MINUTE_MS, 1000)
            fake.inject("429", retry_after=1)
            with pytest.raises(RateLimited):
                await exchange.fetch_ohlcv("BTC/USDT", "1m", START, START + 999 * MINUTE_MS, 1000)
        finally:
            await exchange.close()

    with FakeExchange([SPEC], clock=lambda: FROZEN_NOW_S, shared_weight=40) as fake:
        asyncio.run(run(fake))

    assert [used for used, _ in readings] == [41, 42, 43, 44]  # exchangeInfo, time, 2 × klines
    # On the exchange's clock once `open` measured it (the fake's is frozen in 2024).
    assert all(abs(sent_ms - NOW_MS) < 5_000 for _, sent_ms in readings[2:])
