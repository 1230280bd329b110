"""Store factories for the contract tests: each yields (store, rows) for a fresh store."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import duckdb
import numpy as np

from tda_collector.models import TABLE_NAME, CandleBatch, JobKey
from tda_collector.observability.events import EventLog
from tda_collector.store.duckdb_store import DuckDBStore


def quiet_events() -> EventLog:
    logger = logging.getLogger("tests.store")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    return EventLog(logger)


ROWS_SQL = f"""SELECT epoch_ms(timestamp) AS timestamp_ms, * FROM {TABLE_NAME}
    WHERE exchange = ? AND symbol = ? AND timeframe = ? ORDER BY timestamp"""


def _rows(con: duckdb.DuckDBPyConnection, key: JobKey) -> list[dict]:
    cursor = con.execute(ROWS_SQL, [key.exchange, key.symbol, key.timeframe])
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def read_duckdb_rows(path: str, key: JobKey) -> list[dict]:
    """What users query, read from a closed DuckDB file (after a collector process ended)."""
    with duckdb.connect(path, read_only=True) as con:
        return _rows(con, key)


async def stored_rows(store: DuckDBStore, key: JobKey) -> list[dict]:
    """What users query, read while the store is open: DuckDB allows one writer process, so
    through the store's own connection thread."""
    return await store._run(lambda: _rows(store._connection(), key))


@asynccontextmanager
async def duckdb_store(tmp_path):
    path = str(tmp_path / "ohlcv.duckdb")
    store = DuckDBStore(path, quiet_events())
    await store.ensure()

    async def rows(key: JobKey) -> list[dict]:
        return await stored_rows(store, key)

    try:
        yield store, rows
    finally:
        await store.close()


KEY = JobKey("binance", "BTC/USDT", "1m")
OTHER = JobKey("binance", "ETH/USDT", "1m")
MIN = 60_000
T0 = 1_704_067_200_000


def batch(key, start, count, price=100.0, closed=True):
    ts = np.arange(count, dtype=np.int64) * MIN + start
    base = np.full(count, price) + np.arange(count)
    return CandleBatch(
        key=key,
        timestamps=ts,
        open=base,
        high=base + 1,
        low=base - 1,
        close=base + 0.5,
        volume=np.full(count, 2.0),
        closed=np.full(count, closed),
    )
