"""Store factories for the contract tests: each yields (store, rows) for a fresh store; the
`..._failing_transiently` ones yield (store, rows, clear), a store whose writes fail
transiently until `await clear()`."""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import asynccontextmanager

import duckdb
import numpy as np
from memory_store import MemoryStore

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
async def duckdb_store(tmp_path, **kw):
    path = str(tmp_path / "ohlcv.duckdb")
    store = DuckDBStore(path, quiet_events(), **kw)
    await store.ensure()

    async def rows(key: JobKey) -> list[dict]:
        return await stored_rows(store, key)

    try:
        yield store, rows
    finally:
        await store.close()


_HOLD_LOCK = """import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


class LockHolder:
    """Another process holding DuckDB's lock on a file (DuckDB allows one writing process)
    until `release()`."""

    def __init__(self, path: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None and self._process.stdin is not None
        if self._process.stdout.readline().strip() != "locked":
            self.release()
            raise RuntimeError(f"the lock holder could not open {path}")

    @property
    def pid(self) -> int:
        return self._process.pid

    def release(self) -> None:
        if self._process.returncode is None:
            self._process.communicate(timeout=30)  # closes its stdin: it exits


@asynccontextmanager
async def duckdb_store_failing_transiently(tmp_path):
    """An opened store whose file another process has taken: as if its connection had been
    lost, the next write must open the file again and finds it locked (an IOException)."""
    async with duckdb_store(tmp_path) as (store, rows):
        await store._run(store._close)
        holder = LockHolder(store._path)

        async def clear() -> None:
            holder.release()

        try:
            yield store, rows, clear
        finally:
            holder.release()


def memory_rows(store: MemoryStore, key: JobKey) -> list[dict]:
    """What users query from the memory store, in the shape of the other stores' rows."""
    names = ("timestamp_ms", "open", "high", "low", "close", "volume", "is_closed")
    series = {"exchange": key.exchange, "symbol": key.symbol, "timeframe": key.timeframe}
    return [
        {**series, **dict(zip(names, row, strict=True)), **store.extra[(key, row[0])]}
        for row in store.series_rows(key)
    ]


@asynccontextmanager
async def memory_store(tmp_path, extra_columns=()):
    """The in-memory fake, held to the same contract (`tmp_path` is unused)."""
    store = MemoryStore(extra_columns=extra_columns)
    await store.ensure()

    async def rows(key: JobKey) -> list[dict]:
        return memory_rows(store, key)

    try:
        yield store, rows
    finally:
        await store.close()


@asynccontextmanager
async def memory_store_failing_transiently(tmp_path):
    async with memory_store(tmp_path) as (store, rows):
        store.fail_next_writes = 1_000

        async def clear() -> None:
            store.fail_next_writes = 0

        yield store, rows, clear


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
