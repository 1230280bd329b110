"""The embedded store: a DuckDB file, written from Arrow by group commit.

A statement and its commit cost 2–3 ms of CPU (registering the Arrow table, planning, the
commit), about as much as the rows of a 1,000-candle page, so writes wait briefly in a
`WriteBuffer` and share one transaction. The table has no primary key: its ART index must fit
in memory, and upserting through it roughly doubles the CPU per row. One row per key is kept by
the writer instead: the store remembers each series' stored [first, last] open time, so a page
outside it is a plain insert (backfills), and only a page overlapping it first deletes exactly
the stored rows it replaces. Tables created with the primary key keep it and work the same way.

DuckDB is not safe for concurrent use from several threads on one connection and its calls
block, so every write runs on one dedicated worker thread: the event loop never waits on disk.
Reads (`read`) run on threads of their own, through cursors of the same connection
(`duckdb_reads.DuckDBReader`), in chunks of bounded size.

DuckDB's errors are sorted into transient and permanent ones in one place, `duckdb_fault`
(`duckdb_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from ..errors import PermanentStoreError, TransientStoreError
from ..models import BASE_COLUMNS, KEY_COLUMNS, TABLE_NAME, CandleBatch, Column, JobKey
from ..observability.events import EventLog
from .duckdb_errors import duckdb_fault, lock_holder
from .duckdb_reads import DuckDBReader
from .reads import CandleQuery
from .write_buffer import WriteBuffer

_DUCKDB_TYPES = {"STRING": "VARCHAR", "FLOAT64": "DOUBLE", "BOOL": "BOOLEAN"}
_EPOCH = datetime(1970, 1, 1)
_SAME_KEY = " AND ".join(f't."{k}" = s."{k}"' for k in KEY_COLUMNS)

# Pages of one history job that may wait for a commit while it fetches the next. One, so that a
# crash refetches at most one page per job. More would let few jobs fill a high budget (a
# CPU-bound backfill of 16 jobs at a time: 1 page ~65 requests/s, 2 ~108, 4 ~128), but with the
# short `batch_seconds` default ten jobs already keep a 45 requests/s budget busy.
PIPELINE_PAGES = 1

T = TypeVar("T")


def _ddl_type(column: Column) -> str:
    return _DUCKDB_TYPES.get(column.sql_type, column.sql_type)


def _quoted(names: list[str], alias: str = "") -> str:
    return ", ".join(f'{alias}"{name}"' for name in names)


@contextlib.contextmanager
def _registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    con.register(name, table)
    try:
        yield
    finally:
        con.unregister(name)


def statement_groups(batches: list[CandleBatch]) -> list[list[CandleBatch]]:
    """Split a flush, in arrival order, into runs that one INSERT can carry: the same extra
    columns (a missing column must not become NULL over stored values), and no two batches of
    a series whose time spans meet (one statement must not insert a key twice)."""
    groups: list[list[CandleBatch]] = []
    spans: dict[JobKey, list[tuple[int, int]]] = {}
    columns: frozenset[str] = frozenset()
    for batch in batches:
        first, last = int(batch.timestamps[0]), int(batch.timestamps[-1])
        meets = any(lo <= last and first <= hi for lo, hi in spans.get(batch.key, ()))
        if not groups or meets or frozenset(batch.extra) != columns:
            groups.append([])
            spans, columns = {}, frozenset(batch.extra)
        groups[-1].append(batch)
        spans.setdefault(batch.key, []).append((first, last))
    return groups


class DuckDBStore:
    """A `CandleStore` on a DuckDB file. `write` returns once the transaction carrying its rows
    committed; a flush happens at `batch_rows` waiting rows, `batch_seconds` after the first
    waiting write, and on `close`. `commits` counts transactions, for tests."""

    name = "duckdb"
    pipeline_pages = PIPELINE_PAGES

    def __init__(
        self,
        path: str,
        events: EventLog,
        extra_columns: tuple[Column, ...] = (),
        *,
        batch_rows: int = 262_144,
        batch_seconds: float = 0.05,
        memory_limit: str = "32MB",
        threads: int = 1,
    ) -> None:
        self._path = path
        self._settings: dict[str, str | int] = {"threads": threads}
        if path != ":memory:":  # an in-memory database has nowhere to evict its blocks to
            self._settings["memory_limit"] = memory_limit
        self._events = events
        self._columns = (*BASE_COLUMNS, *extra_columns)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duckdb")
        self._con: duckdb.DuckDBPyConnection | None = None
        self._reader = DuckDBReader()
        # One write at a time: they all run on the one DuckDB thread anyway.
        self._buffer = WriteBuffer(self._flush, len, batch_rows, batch_seconds, max_in_flight=1)
        # Per series, the first and last stored open time (ms); loaded by `ensure`, moved only
        # by commits. Every write goes through this store: DuckDB allows one writing process.
        self._ranges: dict[JobKey, tuple[int, int]] | None = None
        self._table_columns: frozenset[str] = frozenset()
        self.commits = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            # One thread by default: writes are serialised here anyway, and DuckDB's parallel
            # operators cost ~25% more CPU per written row on this workload. The memory limit
            # bounds DuckDB's buffer pool, which otherwise caches every block written (up to
            # 80% of RAM): without it the process grew with the rows stored (bench/memory.py).
            self._con = duckdb.connect(self._path, config=dict(self._settings))
        return self._con

    def _ensure(self) -> list[str]:
        con = self._connection()
        definitions = ", ".join(
            f'"{c.name}" {_ddl_type(c)}{"" if c.nullable else " NOT NULL"}' for c in self._columns
        )
        con.execute(f"CREATE TABLE IF NOT EXISTS {TABLE_NAME} ({definitions})")
        existing = {
            row[0]
            for row in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                [TABLE_NAME],
            ).fetchall()
        }
        added = [c for c in self._columns if c.name not in existing]
        for column in added:
            con.execute(f'ALTER TABLE {TABLE_NAME} ADD COLUMN "{column.name}" {_ddl_type(column)}')
        self._table_columns = frozenset(existing | {c.name for c in added})
        self._reader.open(con)
        self._ranges = {
            JobKey(exchange, symbol, timeframe): (first, last)
            for exchange, symbol, timeframe, first, last in con.execute(
                f"""SELECT exchange, symbol, timeframe,
                           epoch_ms(min(timestamp)), epoch_ms(max(timestamp))
                    FROM {TABLE_NAME} GROUP BY ALL"""
            ).fetchall()
        }
        return [c.name for c in added]

    async def ensure(self) -> None:
        """Create the table if missing (without a primary key), add missing NULLABLE columns,
        and learn the stored range of every series. A file that cannot be opened (locked by
        another process, not a DuckDB file) raises a one-line StoreFault (see `duckdb_fault`)."""
        try:
            added = await self._run(self._ensure)
        except duckdb.IOException as exc:
            holder = lock_holder(str(exc))
            if holder is None:
                raise duckdb_fault(exc, f"opening DuckDB file {self._path}") or exc from exc
            raise TransientStoreError(
                f"opening DuckDB file {self._path} failed: it is locked by another process "
                f"({holder}), "
                "e.g. a running collector: DuckDB lets one process open a file; stop that "
                "one first, or read the candles through its GET /ohlcv"
            ) from exc
        except Exception as exc:
            failed = duckdb_fault(exc, f"opening DuckDB file {self._path}")
            if failed is None:
                raise
            raise failed from exc
        self._events.info(
            "store_ensure_table",
            f"table {TABLE_NAME} ready in {self._path}",
            table=TABLE_NAME,
            added_columns=added or None,
        )

    async def write(self, batch: CandleBatch) -> int:
        """Rows written; returns once they are committed. Raises TransientStoreError or
        PermanentStoreError (see `duckdb_fault`) when their transaction failed: none of them
        is stored then. Columns the store does not know are a PermanentStoreError."""
        if not len(batch):
            return 0
        if self._ranges is None:
            raise RuntimeError("DuckDBStore.write before ensure()")
        unknown = sorted(set(batch.extra) - {c.name for c in self._columns})
        if unknown:
            raise PermanentStoreError(f"columns {unknown} are not in the store's schema")
        await self._buffer.add(batch)
        return len(batch)

    async def _flush(self, batches: list[CandleBatch]) -> list[Exception | None]:
        return await self._run(self._commit_groups, batches)

    def _commit_groups(self, batches: list[CandleBatch]) -> list[Exception | None]:
        """One transaction per statement group, in arrival order; one outcome per batch."""
        outcomes: list[Exception | None] = []
        for group in statement_groups(batches):
            try:
                self._commit(group)
                error: Exception | None = None
            except Exception as exc:  # this group's writers hear of it; later groups still go
                error = duckdb_fault(exc, "DuckDB commit") or exc
            outcomes += [error] * len(group)
        return outcomes

    def _overlaps_stored(self, batch: CandleBatch) -> bool:
        assert self._ranges is not None
        stored = self._ranges.get(batch.key)
        return (
            stored is not None
            and int(batch.timestamps[0]) <= stored[1]
            and int(batch.timestamps[-1]) >= stored[0]
        )

    def _commit(self, group: list[CandleBatch]) -> None:
        """Insert the group's rows in one transaction, after deleting the stored rows that
        batches overlapping their series' stored range replace."""
        con = self._connection()
        ingested_at = datetime.now(UTC)
        tables = [batch.to_arrow(ingested_at) for batch in group]
        names = tables[0].column_names
        replacing = [(b, t) for b, t in zip(group, tables, strict=True) if self._overlaps_stored(b)]
        # Columns of the table the group lacks keep their stored values, as an upsert would.
        carried = sorted(self._table_columns - set(names)) if replacing else []
        with _registered(con, "incoming", pa.concat_tables([t.select(names) for t in tables])):
            con.begin()
            try:
                kept = self._delete_replaced(con, replacing, carried) if replacing else None
                self._insert(con, names, carried, kept)
                con.commit()
            except Exception:
                with contextlib.suppress(duckdb.Error):  # a failed COMMIT has rolled back
                    con.rollback()
                raise
        self.commits += 1
        self._extend_ranges(group)

    def _delete_replaced(
        self,
        con: duckdb.DuckDBPyConnection,
        replacing: list[tuple[CandleBatch, pa.Table]],
        carried: list[str],
    ) -> pa.Table | None:
        """Delete the stored rows with the keys of the replacing batches' rows (never a whole
        range: a page may lack candles that are stored); returns their `carried` columns."""
        keys = pa.concat_tables([table.select(list(KEY_COLUMNS)) for _, table in replacing])
        first = min(int(batch.timestamps[0]) for batch, _ in replacing)
        last = max(int(batch.timestamps[-1]) for batch, _ in replacing)
        returning = f"RETURNING {_quoted([*KEY_COLUMNS, *carried], 't.')}" if carried else ""
        with _registered(con, "replaced", keys):
            # The explicit time range lets DuckDB skip row groups by their min/max.
            cursor = con.execute(
                f"""DELETE FROM {TABLE_NAME} AS t USING replaced AS s
                    WHERE t.timestamp BETWEEN ? AND ? AND {_SAME_KEY} {returning}""",
                [_EPOCH + timedelta(milliseconds=first), _EPOCH + timedelta(milliseconds=last)],
            )
            return cursor.to_arrow_table() if carried else None

    @staticmethod
    def _insert(
        con: duckdb.DuckDBPyConnection,
        names: list[str],
        carried: list[str],
        kept: pa.Table | None,
    ) -> None:
        if kept is None:
            columns = _quoted(names)
            con.execute(f"INSERT INTO {TABLE_NAME} ({columns}) SELECT {columns} FROM incoming")
            return
        with _registered(con, "kept", kept):
            con.execute(
                f"""INSERT INTO {TABLE_NAME} ({_quoted([*names, *carried])})
                    SELECT {_quoted(names, "t.")}, {_quoted(carried, "s.")}
                    FROM incoming AS t LEFT JOIN kept AS s ON {_SAME_KEY}"""
            )

    def _extend_ranges(self, group: list[CandleBatch]) -> None:
        assert self._ranges is not None
        for batch in group:
            first, last = int(batch.timestamps[0]), int(batch.timestamps[-1])
            stored_first, stored_last = self._ranges.get(batch.key, (first, last))
            self._ranges[batch.key] = (min(first, stored_first), max(last, stored_last))

    def _newest_closed(self, keys: list[JobKey]) -> dict[JobKey, int]:
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
        with _registered(con, "wanted", wanted):
            rows = con.execute(
                f"""SELECT t.exchange, t.symbol, t.timeframe, epoch_ms(max(t.timestamp))
                    FROM {TABLE_NAME} t JOIN wanted w USING (exchange, symbol, timeframe)
                    WHERE t.is_closed IS NOT FALSE GROUP BY ALL"""
            ).fetchall()
        return {JobKey(e, s, tf): int(ms) for e, s, tf, ms in rows}

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]:
        """Newest stored candle open time (epoch ms) per key; keys with no rows are absent.

        With open candles counted, that is the end of each series' stored span, which the
        store keeps anyway: no scan of the table."""
        if closed_only:
            return await self._run(self._newest_closed, keys)
        if self._ranges is None:
            raise RuntimeError("DuckDBStore.newest(closed_only=False) before ensure()")
        return {key: self._ranges[key][1] for key in keys if key in self._ranges}

    def _series(self, key: JobKey) -> CandleBatch:
        extra = "".join(f', "{c.name}"' for c in self._columns[len(BASE_COLUMNS) :])
        table = (
            self._connection()
            .execute(
                f"""SELECT epoch_ms(timestamp) AS ts, open, high, low, close, volume{extra}
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
        """Stored closed candles of one series in time order, with the extra columns
        (indicators, NULL as NaN) in `extra`: for recomputing and comparing indicators."""
        return await self._run(self._series, key)

    async def read(self, query: CandleQuery) -> AsyncGenerator[pa.Table, None]:
        """The query's stored rows, every column, oldest first, in chunks of bounded size (see
        `DuckDBReader`)."""
        if self._ranges is None:
            raise RuntimeError("DuckDBStore.read before ensure()")
        async for chunk in self._reader.read(query):
            yield chunk

    def _close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    async def close(self) -> None:
        """Commit what is buffered and finish the reads in flight, then close the file."""
        try:
            await self._buffer.close()
        finally:
            await self._reader.close()
            await self._run(self._close)
            self._executor.shutdown(wait=True)
