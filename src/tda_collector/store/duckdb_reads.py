"""Reads of a DuckDB store beside its writer: cursors of the one connection on read threads.

DuckDB lets one process open a file, so readers share the writer's connection: each of
`READ_CURSORS` read threads uses a cursor of it (a connection of its own to the same database,
which DuckDB's MVCC keeps consistent beside the writer's transactions). A read goes a window of
the series at a time (`reads.read_by_windows`), so it holds one chunk of rows, DuckDB pins a few
blocks of the buffer pool the writers share, and neither the event loop nor the writer waits.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from ..errors import TransientStoreError
from ..models import TABLE_NAME
from .duckdb_errors import duckdb_fault
from .reads import CandleQuery, read_by_windows, utc_timestamps

# Reads that may run at once, each on its own thread and cursor; more wait for a free one.
READ_CURSORS = 2
_EPOCH = datetime(1970, 1, 1)
# No ORDER BY: DuckDB's sort (top-N) of even a few thousand rows wants more than 8 MB of the
# buffer pool, where a window's scan pins a few blocks; Arrow sorts a chunk in well under 1 ms.
_WINDOW_SQL = f"""SELECT * FROM {TABLE_NAME}
WHERE exchange = ? AND symbol = ? AND timeframe = ? AND timestamp >= ? AND timestamp < ?
  AND (NOT ? OR is_closed IS NOT FALSE)"""
# min() streams: it finds where a series goes on without holding any of its rows.
_FIRST_SQL = f"""SELECT epoch_ms(min(timestamp)) FROM {TABLE_NAME}
WHERE exchange = ? AND symbol = ? AND timeframe = ? AND timestamp >= ? AND timestamp < ?
  AND (NOT ? OR is_closed IS NOT FALSE)"""

T = TypeVar("T")


def _params(query: CandleQuery, start_ms: int, end_ms: int) -> list[object]:
    key = query.key
    # Naive UTC, the column's own type: an aware datetime would make DuckDB compare as
    # TIMESTAMPTZ, casting every row and skipping no row group by its min/max (~50x slower).
    window = [_EPOCH + timedelta(milliseconds=start_ms), _EPOCH + timedelta(milliseconds=end_ms)]
    return [key.exchange, key.symbol, key.timeframe, *window, query.closed_only]


class DuckDBReader:
    """`read` for a `DuckDBStore`; `open` hands it the connection's cursors, `close` waits for
    the reads in flight and closes them."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(READ_CURSORS, thread_name_prefix="duckdb-read")
        self._cursors: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
        self._opened = False
        self._closing = False

    def open(self, con: duckdb.DuckDBPyConnection) -> None:
        """Make the cursors; on the thread that owns `con` (the store's writer thread)."""
        if not self._opened:
            for _ in range(READ_CURSORS):
                self._cursors.put(con.cursor())
            self._opened = True

    def _query(self, sql: str, params: list[object], take: Callable[[Any], T]) -> T:
        cursor = self._cursors.get()  # never waits: one cursor per read thread
        try:
            return take(cursor.execute(sql, params))
        finally:
            self._cursors.put(cursor)

    def _window(self, query: CandleQuery, start_ms: int, end_ms: int, limit: int) -> pa.Table:
        rows = self._query(_WINDOW_SQL, _params(query, start_ms, end_ms), _arrow)
        return rows.sort_by("timestamp").slice(0, limit)

    def _first_stored(self, query: CandleQuery, start_ms: int, end_ms: int) -> int | None:
        row = self._query(_FIRST_SQL, _params(query, start_ms, end_ms), _one)
        return None if row is None or row[0] is None else int(row[0])

    async def _on_read_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closing or not self._opened:
            raise TransientStoreError("DuckDB read: the store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except Exception as exc:
            failed = duckdb_fault(exc, "DuckDB read")
            if failed is None:
                raise
            raise failed from exc

    async def read(self, query: CandleQuery) -> AsyncGenerator[pa.Table, None]:
        """The query's rows, every column, oldest first, in chunks of bounded size; a failed
        chunk raises TransientStoreError or PermanentStoreError (see `duckdb_fault`)."""

        async def fetch(start_ms: int, end_ms: int, limit: int) -> pa.Table:
            chunk = await self._on_read_thread(self._window, query, start_ms, end_ms, limit)
            return utc_timestamps(chunk)

        async def first_stored(start_ms: int, end_ms: int) -> int | None:
            return await self._on_read_thread(self._first_stored, query, start_ms, end_ms)

        async for chunk in read_by_windows(query, fetch, first_stored):
            yield chunk

    def _close_cursors(self) -> None:
        while not self._cursors.empty():
            self._cursors.get().close()

    async def close(self) -> None:
        self._closing = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._close_cursors()


def _arrow(result: duckdb.DuckDBPyConnection) -> pa.Table:
    return result.to_arrow_table()


def _one(result: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
    return result.fetchone()
