"""The naive baseline: how most scripts backfill, a sequential ccxt loop.

One symbol after another, page after page, with ccxt's own default rate limiting
(`enableRateLimit`, Binance's `rateLimit` of 50 ms), each page inserted with `executemany`.
Prints one JSON line: candles stored and requests made.
"""

from __future__ import annotations

import asyncio
import json
import sys

import ccxt.async_support as ccxt
import duckdb


async def backfill(base_url: str, symbols: list[str], start_ms: int, end_ms: int, db: str) -> None:
    exchange = ccxt.binance({
        "urls": {"api": {"public": base_url + "/api/v3", "private": base_url + "/api/v3"}},
        "options": {"fetchMarkets": {"types": ["spot"]}, "fetchCurrencies": False},
        "enableRateLimit": True,
    })
    con = duckdb.connect(db)
    con.execute("CREATE TABLE IF NOT EXISTS ohlcv (symbol VARCHAR, ts BIGINT, o DOUBLE, h DOUBLE,"
                " l DOUBLE, c DOUBLE, v DOUBLE)")
    candles = requests = 0
    try:
        for symbol in symbols:
            since = start_ms
            while since < end_ms:
                rows = await exchange.fetch_ohlcv(symbol, "1m", since, 1000)
                requests += 1
                rows = [r for r in rows if r[0] < end_ms]
                if not rows:
                    break
                con.executemany("INSERT INTO ohlcv VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [(symbol, *r) for r in rows])
                candles += len(rows)
                since = rows[-1][0] + 60_000
    finally:
        await exchange.close()
        con.close()
    print(json.dumps({"candles": candles, "requests": requests}))


if __name__ == "__main__":
    base, db, start, end, *names = sys.argv[1:]
    asyncio.run(backfill(base, names, int(start), int(end), db))
