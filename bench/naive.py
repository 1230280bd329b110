"""The naive baseline: how most scripts backfill, a sequential ccxt loop.

One symbol after another, page after page, with ccxt's own default rate limiting
(`enableRateLimit`, Binance's `rateLimit` of 50 ms), candles collected in a list the way a
script builds a DataFrame. It stores nothing, which flatters it: DuckDB's `executemany`, the
usual next step, costs about 2 ms per candle. Prints one JSON line: candles and requests.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import ccxt.async_support as ccxt


async def backfill(base_url: str, symbols: list[str], start_ms: int, end_ms: int) -> None:
    exchange = ccxt.binance(
        {
            "urls": {"api": {"public": base_url + "/api/v3", "private": base_url + "/api/v3"}},
            "options": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False},
            "enableRateLimit": True,
        }
    )
    collected: list[list[float]] = []
    requests = 0
    await exchange.load_markets()
    started = time.monotonic()
    try:
        for symbol in symbols:
            since = start_ms
            while since < end_ms:
                rows = await exchange.fetch_ohlcv(symbol, "1m", since, 1000)
                requests += 1
                rows = [r for r in rows if r[0] < end_ms]
                if not rows:
                    break
                collected.extend(rows)
                since = rows[-1][0] + 60_000
    finally:
        await exchange.close()
    seconds = time.monotonic() - started
    print(json.dumps({"candles": len(collected), "requests": requests, "seconds": seconds}))


if __name__ == "__main__":
    base, start, end, *names = sys.argv[1:]
    asyncio.run(backfill(base, names, int(start), int(end)))
