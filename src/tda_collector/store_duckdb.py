"""The embedded store: a DuckDB file, upserted from Arrow in bulk.

DuckDB is not safe for concurrent use from several threads on one connection and its calls
block, so every call runs on one dedicated worker thread: the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from .events import EventLog
from .models import BASE_COLUMNS, KEY_COLUMNS, TABLE_NAME, CandleBatch, Column, JobKey

_DUCKDB_TYPES = {"STRING": "VARCHAR", "FLOAT64": "DOUBLE", "BOOL": "BOOLEAN"}


def _ddl_type(column: Column) -> str:
    return _DUCKDB_TYPES.get(column.sql_type, column.sql_type)


class DuckDBStore:
    name = "duckdb"
    pipeline_pages = 1

    def __init__(self, path: str, events: EventLog, extra_columns: tuple[Column, ...] = ()) -> None:
        self._path = path
        self._events = events
        self._columns = (*BASE_COLUMNS, *extra_columns)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._con: duckdb.DuckDBPyConnection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            # One thread: writes are serialised here anyway, and DuckDB's parallel operators
            # cost ~25% more CPU per upserted row on this workload.
            self._con = duckdb.connect(self._path, config={"threads": 1})
        return self._con

    def _ensure(self) -> list[str]:
        con = self._connection()
        definitions = ", ".join(
            f'"{c.name}" {_ddl_type(c)}{"" if c.nullable else " NOT NULL"}' for c in self._columns
        )
        key = ", ".join(f'"{k}"' for k in KEY_COLUMNS)
        con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE_NAME} ({definitions}, PRIMARY KEY ({key}))")
        existing = {
            row[0]
            for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                [TABLE_NAME],
            ).fetchall()
        }
        added = [c.name for c in self._columns if c.name not in existing]
        for name in added:
            column = next(c for c in self._columns if c.name == name)
            con.execute(f'ALTER TABLE {TABLE_NAME} ADD COLUMN "{name}" {_ddl_type(column)}')
        return added

    async def ensure(self) -> None:
        added = await self._run(self._ensure)
        self._events.info(
            "store_ensure_table",
            f"table {TABLE_NAME} ready in {self._path}",
            table=TABLE_NAME,
            added_columns=added or None,
        )

    def _write(self, batch: CandleBatch) -> int:
        table = batch.to_arrow(datetime.now(UTC))
        names = ", ".join(f'"{n}"' for n in table.column_names)
        con = self._connection()
        con.register("incoming", table)
        try:
            con.execute(
                f"INSERT OR REPLACE INTO {TABLE_NAME} ({names}) SELECT {names} FROM incoming"
            )
        finally:
            con.unregister("incoming")
        return len(batch)

    async def write(self, batch: CandleBatch) -> int:
        if not len(batch):
            return 0
        return await self._run(self._write, batch)

    def _newest(self, keys: list[JobKey], closed_only: bool) -> dict[JobKey, int]:
        if not keys:
            return {}
        wanted = pa.table(
            {
                "exchange": [k.exchange for k in keys],
                "symbol": [k.symbol for k in keys],
                "timeframe": [k.timeframe for k in keys],
            }
        )
        con = self._connection()
        con.register("wanted", wanted)
        closed = "AND t.is_closed IS NOT FALSE" if closed_only else ""
        rows = con.execute(
            f"""SELECT t.exchange, t.symbol, t.timeframe, epoch_ms(max(t.timestamp))
                FROM {TABLE_NAME} t JOIN wanted w USING (exchange, symbol, timeframe)
                WHERE TRUE {closed} GROUP BY ALL"""
        ).fetchall()
        con.unregister("wanted")
        return {JobKey(e, s, tf): int(ms) for e, s, tf, ms in rows}

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]:
        """Newest stored candle open time (epoch ms) per key; keys with no rows are absent."""
        return await self._run(self._newest, keys, closed_only)

    def _series(self, key: JobKey) -> CandleBatch:
        table = (
            self._connection()
            .execute(
                f"""SELECT epoch_ms(timestamp) AS ts, open, high, low, close, volume
                    FROM {TABLE_NAME}
                    WHERE exchange = ? AND symbol = ? AND timeframe = ?
                      AND is_closed IS NOT FALSE
                    ORDER BY timestamp""",
                [key.exchange, key.symbol, key.timeframe],
            )
            .to_arrow_table()
        )
        return CandleBatch.closed_from_arrow(key, table)

    async def series(self, key: JobKey) -> CandleBatch:
        """Stored closed candles of one series in time order (for recomputing indicators)."""
        return await self._run(self._series, key)

    def _close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)
