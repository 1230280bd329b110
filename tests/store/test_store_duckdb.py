"""The DuckDB store's group commit and its one-row-per-key bookkeeping without a primary key.

What the shared contract (test_store_contract.py) cannot see: how many transactions carried
the writes, what stays stored when a page overlaps rows of an earlier run, failing commits,
tables created by the previous version (with a primary key), a file that cannot be opened, and
how each of DuckDB's errors is sorted (transient or permanent).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import replace

import duckdb
import numpy as np
import pytest
from store_support import (
    KEY,
    MIN,
    OTHER,
    T0,
    LockHolder,
    batch,
    quiet_events,
    read_duckdb_rows,
    stored_rows,
)

from tda_collector.config import Config
from tda_collector.errors import PermanentStoreError, StoreFault, TransientStoreError
from tda_collector.models import TABLE_NAME, Column, JobKey
from tda_collector.store import build_store
from tda_collector.store.duckdb_store import DuckDBStore, duckdb_fault

RSI = Column("rsi_14", "FLOAT64")
BASE_DDL = """"timestamp" TIMESTAMP NOT NULL, "exchange" VARCHAR NOT NULL,
    "symbol" VARCHAR NOT NULL, "timeframe" VARCHAR NOT NULL, "open" DOUBLE NOT NULL,
    "high" DOUBLE NOT NULL, "low" DOUBLE NOT NULL, "close" DOUBLE NOT NULL,
    "volume" DOUBLE NOT NULL, "ingested_at" TIMESTAMP NOT NULL, "is_closed" BOOLEAN"""
# The table as the previous version created it.
PRIMARY_KEY_DDL = f"""CREATE TABLE {TABLE_NAME} ({BASE_DDL},
    PRIMARY KEY ("exchange", "symbol", "timeframe", "timestamp"))"""


@asynccontextmanager
async def opened(path, extra_columns=(), batch_rows=16_000, batch_seconds=3600.0):
    """An ensured store that flushes only at `batch_rows` rows or on close, unless told."""
    store = DuckDBStore(
        str(path),
        quiet_events(),
        extra_columns,
        batch_rows=batch_rows,
        batch_seconds=batch_seconds,
    )
    await store.ensure()
    try:
        yield store
    finally:
        await store.close()


def create_table(path, ddl: str) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(ddl)


def primary_keys(path) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT count(*) FROM duckdb_constraints() "
            "WHERE table_name = ? AND constraint_type = 'PRIMARY KEY'",
            [TABLE_NAME],
        ).fetchone()[0]


def opens(rows: list[dict]) -> list[tuple[int, float]]:
    return [((r["timestamp_ms"] - T0) // MIN, r["open"]) for r in rows]


def with_rsi(page, value: float):
    return replace(page, extra={"rsi_14": np.full(len(page), value)})


async def test_concurrent_writes_share_a_few_commits_and_a_new_table_has_no_primary_key(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    keys = [JobKey("binance", f"S{i}/USDT", "1m") for i in range(20)]
    async with opened(path, batch_rows=1_000) as store:
        written = await asyncio.gather(*(store.write(batch(key, T0, 100)) for key in keys))
        assert written == [100] * 20
        assert store.commits == 2  # 1,000 rows each
        assert [len(await stored_rows(store, key)) for key in keys] == [100] * 20
    assert primary_keys(path) == 0


async def test_a_flush_is_made_at_most_batch_seconds_after_the_first_write(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb", batch_seconds=0.01) as store:
        await asyncio.wait_for(store.write(batch(KEY, T0, 3)), timeout=5)
        assert store.commits == 1


async def test_a_series_written_twice_in_one_flush_keeps_one_row_per_key_with_the_newest(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb", batch_rows=8) as store:
        await asyncio.gather(
            store.write(batch(KEY, T0, 4, price=100.0, closed=False)),
            store.write(batch(KEY, T0 + 2 * MIN, 4, price=200.0)),
        )
        assert store.commits == 2  # overlapping spans of one series: two statements, in order
        got = await stored_rows(store, KEY)
        assert opens(got) == [
            (0, 100.0),
            (1, 101.0),
            (2, 200.0),
            (3, 201.0),
            (4, 202.0),
            (5, 203.0),
        ]
        assert [r["is_closed"] for r in got] == [False, False, True, True, True, True]


async def test_disjoint_pages_of_one_series_share_a_commit(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb", batch_rows=6) as store:
        await asyncio.gather(
            store.write(batch(KEY, T0, 3)), store.write(batch(KEY, T0 + 3 * MIN, 3))
        )
        assert store.commits == 1
        assert len(await stored_rows(store, KEY)) == 6


async def test_overlapping_rows_stored_by_an_earlier_run_are_replaced_not_duplicated(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    async with opened(path, batch_rows=15) as store:
        await asyncio.gather(
            store.write(batch(KEY, T0, 10, price=100.0)), store.write(batch(OTHER, T0, 5))
        )
    async with opened(path, batch_rows=10) as store:  # the stored ranges come from ensure
        await store.write(batch(KEY, T0 + 5 * MIN, 10, price=300.0))
    expected = [(i, 100.0 + i) for i in range(5)] + [(5 + i, 300.0 + i) for i in range(10)]
    assert opens(read_duckdb_rows(str(path), KEY)) == expected
    assert len(read_duckdb_rows(str(path), OTHER)) == 5


async def test_newest_with_open_candles_comes_from_the_spans_an_earlier_run_stored(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    async with opened(path, batch_seconds=0.01) as store:
        await store.write(batch(KEY, T0, 3))
        await store.write(batch(KEY, T0 + 3 * MIN, 1, closed=False))
    async with opened(path) as store:
        assert await store.newest([KEY, OTHER], closed_only=False) == {KEY: T0 + 3 * MIN}
        assert await store.newest([KEY, OTHER]) == {KEY: T0 + 2 * MIN}


async def test_newest_with_open_candles_before_ensure_is_refused(tmp_path):
    store = DuckDBStore(str(tmp_path / "ohlcv.duckdb"), quiet_events())
    try:
        with pytest.raises(RuntimeError, match="ensure"):
            await store.newest([KEY], closed_only=False)
    finally:
        await store.close()


def without(page, index: int):
    return page.select(np.arange(len(page)) != index)


async def test_a_page_with_a_hole_keeps_the_stored_row_in_the_hole(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb", batch_rows=4) as store:
        await store.write(batch(KEY, T0, 5, price=100.0))
        await store.write(without(batch(KEY, T0, 5, price=200.0), 2))
        got = await stored_rows(store, KEY)
    assert opens(got) == [(0, 200.0), (1, 201.0), (2, 102.0), (3, 203.0), (4, 204.0)]


async def test_a_failing_commit_fails_its_writers_keeps_what_was_stored_and_spares_others(
    tmp_path,
):
    path = tmp_path / "ohlcv.duckdb"
    # A real constraint: NaN indicators are stored as NULL, which this column refuses.
    create_table(path, f'CREATE TABLE {TABLE_NAME} ({BASE_DDL}, "rsi_14" DOUBLE NOT NULL)')
    async with opened(path, (RSI,), batch_rows=8) as store:
        first, second = await asyncio.gather(
            store.write(with_rsi(batch(KEY, T0, 4, price=100.0), 50.0)),
            store.write(with_rsi(batch(KEY, T0 + 2 * MIN, 4, price=200.0), np.nan)),
            return_exceptions=True,
        )
        assert first == 4
        assert isinstance(second, PermanentStoreError) and "NOT NULL" in str(second)
        assert store.commits == 1
        # The second statement deleted rows 2 and 3 before failing: rolled back, they are back.
        got = await stored_rows(store, KEY)
        assert opens(got) == [(i, 100.0 + i) for i in range(4)]
        assert {r["rsi_14"] for r in got} == {50.0}

        with pytest.raises(PermanentStoreError, match="ConstraintException"):
            await store.write(with_rsi(batch(OTHER, T0, 8), np.nan))
        assert await stored_rows(store, OTHER) == []
        await store.write(with_rsi(batch(OTHER, T0, 8), 1.0))  # nothing was taken as stored
        assert len(await stored_rows(store, OTHER)) == 8


async def test_a_cancelled_writers_rows_are_left_out(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    async with opened(path) as store:
        gone = asyncio.create_task(store.write(batch(KEY, T0, 3)))
        kept = asyncio.create_task(store.write(batch(OTHER, T0, 3)))
        await asyncio.sleep(0)
        gone.cancel()
    assert await kept == 3
    assert read_duckdb_rows(str(path), KEY) == []
    assert len(read_duckdb_rows(str(path), OTHER)) == 3


async def test_close_commits_what_is_buffered(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    store = DuckDBStore(str(path), quiet_events(), batch_seconds=3600)
    await store.ensure()
    writing = asyncio.create_task(store.write(batch(KEY, T0, 3)))
    await asyncio.sleep(0)
    assert not writing.done()
    await store.close()
    assert await writing == 3
    assert len(read_duckdb_rows(str(path), KEY)) == 3


async def test_a_table_created_with_a_primary_key_keeps_it_and_takes_overlapping_writes(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    create_table(path, PRIMARY_KEY_DDL)
    async with opened(path, batch_rows=12) as store:
        await store.write(batch(KEY, T0, 12, price=100.0, closed=False))
        # One flush: two pages rewriting stored rows of one series, and a new series.
        await asyncio.gather(
            store.write(batch(KEY, T0 + 2 * MIN, 4, price=200.0)),
            store.write(batch(KEY, T0 + 9 * MIN, 4, price=300.0)),
            store.write(batch(OTHER, T0, 4)),
        )
        assert store.commits == 2
        got = await stored_rows(store, KEY)
    assert [price for _, price in opens(got)] == [
        *(100.0, 101.0),
        *(200.0, 201.0, 202.0, 203.0),
        *(106.0, 107.0, 108.0),
        *(300.0, 301.0, 302.0, 303.0),
    ]
    assert [r["is_closed"] for r in got] == [False] * 2 + [True] * 4 + [False] * 3 + [True] * 4
    assert len(read_duckdb_rows(str(path), OTHER)) == 4
    assert primary_keys(path) == 1


async def test_a_batch_lacking_indicator_columns_keeps_their_stored_values(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb", (RSI,), batch_rows=8) as store:
        await store.write(with_rsi(batch(KEY, T0, 8, price=100.0), 50.0))
        # Different columns cannot share a statement: two commits, in arrival order.
        await asyncio.gather(
            store.write(batch(KEY, T0 + 6 * MIN, 4, price=200.0)),
            store.write(with_rsi(batch(OTHER, T0, 4), 60.0)),
        )
        assert store.commits == 3
        got = await stored_rows(store, KEY)
    assert [price for _, price in opens(got)] == [100.0 + i for i in range(6)] + [
        200.0 + i for i in range(4)
    ]
    assert [r["rsi_14"] for r in got] == [50.0] * 8 + [None] * 2


async def test_a_column_the_store_does_not_know_is_refused(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb") as store:
        with pytest.raises(PermanentStoreError, match="rsi_14"):
            await store.write(with_rsi(batch(KEY, T0, 2), 1.0))


async def test_a_column_dropped_behind_the_stores_back_is_a_permanent_error_naming_it(tmp_path):
    async with opened(tmp_path / "ohlcv.duckdb", (RSI,), batch_rows=2) as store:
        drop = f"ALTER TABLE {TABLE_NAME} DROP COLUMN rsi_14"
        await store._run(lambda: store._connection().execute(drop))
        with pytest.raises(PermanentStoreError) as raised:
            await store.write(with_rsi(batch(KEY, T0, 2), 1.0))
        message = str(raised.value)
        assert message.startswith("DuckDB commit failed: BinderException")
        assert "rsi_14" in message and "\n" not in message
        assert isinstance(raised.value.__cause__.__cause__, duckdb.BinderException)


async def test_a_file_locked_by_another_process_fails_ensure_with_one_transient_line(tmp_path):
    path = str(tmp_path / "ohlcv.duckdb")
    holder = LockHolder(path)
    store = DuckDBStore(path, quiet_events())
    try:
        with pytest.raises(TransientStoreError) as raised:
            await store.ensure()
        message = str(raised.value)
        assert message.startswith(f"opening DuckDB file {path} failed: it is locked by another")
        assert f"(PID {holder.pid}: " in message and "\n" not in message
        holder.release()
        await store.ensure()  # the lock is gone: the same store opens
    finally:
        holder.release()
        await store.close()


async def ensure_error(path) -> BaseException:
    """What `ensure` raised for a store on `path` (it must raise)."""
    store = DuckDBStore(str(path), quiet_events())
    try:
        with pytest.raises(StoreFault) as raised:
            await store.ensure()
        return raised.value
    finally:
        await store.close()


async def test_a_file_that_is_not_a_duckdb_database_fails_ensure_with_one_line(tmp_path):
    path = tmp_path / "ohlcv.duckdb"
    path.write_text("not a database" * 100)
    message = str(await ensure_error(path))
    assert message.startswith(f"opening DuckDB file {path} failed: IOException")
    assert "not a valid DuckDB database file" in message and "\n" not in message


async def test_a_directory_that_is_a_file_fails_ensure_permanently(tmp_path):
    (tmp_path / "data").write_text("a file")
    error = await ensure_error(tmp_path / "data" / "ohlcv.duckdb")
    assert isinstance(error, PermanentStoreError)
    assert str(error).startswith(f"opening DuckDB file {tmp_path}/data/ohlcv.duckdb failed: ")


@pytest.mark.parametrize(
    ("error", "sorted_as"),
    [
        (duckdb.IOException("Could not set lock on file"), TransientStoreError),
        (duckdb.OutOfMemoryException("could not allocate"), TransientStoreError),
        (duckdb.TransactionException("Conflict on update"), TransientStoreError),
        (duckdb.InterruptException("Interrupted!"), TransientStoreError),
        (OSError(28, "No space left on device"), TransientStoreError),
        (duckdb.ConnectionException("Connection already closed!"), PermanentStoreError),
        (duckdb.CatalogException("Table with name t does not exist!"), PermanentStoreError),
        (duckdb.BinderException('Table "t" does not have a column "x"'), PermanentStoreError),
        (duckdb.ConversionException("Could not convert string 'a' to DOUBLE"), PermanentStoreError),
        (duckdb.ConstraintException("NOT NULL constraint failed: t.a"), PermanentStoreError),
        (duckdb.FatalException("database has been invalidated"), PermanentStoreError),
        (PermissionError(13, "Permission denied"), PermanentStoreError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_duckdb_errors_are_sorted_into_transient_and_permanent(error, sorted_as):
    fault = duckdb_fault(error, "DuckDB commit")
    assert type(fault) is sorted_as
    assert fault.__cause__ is error
    assert str(fault).startswith(f"DuckDB commit failed: {type(error).__name__}: ")


def test_errors_that_are_not_duckdbs_are_left_to_propagate():
    assert duckdb_fault(ValueError("a bug"), "DuckDB commit") is None


async def test_writing_before_ensure_is_refused(tmp_path):
    store = DuckDBStore(str(tmp_path / "ohlcv.duckdb"), quiet_events())
    try:
        with pytest.raises(RuntimeError, match="ensure"):
            await store.write(batch(KEY, T0, 2))
    finally:
        await store.close()


def configured(tmp_path, **duckdb_config) -> Config:
    return Config.model_validate(
        {
            "exchanges": [{"id": "binance", "symbols": ["BTC/USDT"]}],
            "storage": {"duckdb": {"path": str(tmp_path / "ohlcv.duckdb"), **duckdb_config}},
        }
    )


async def test_the_configured_batch_size_reaches_the_store(tmp_path):
    config = configured(tmp_path, batch_rows=2, batch_seconds=3600)
    store = build_store(config.storage, quiet_events(), "history")
    await store.ensure()
    try:
        await asyncio.wait_for(store.write(batch(KEY, T0, 2)), timeout=5)  # 2 rows: no waiting
        assert store.commits == 1
    finally:
        await store.close()


async def test_live_mode_commits_without_waiting_for_more_writes(tmp_path):
    store = build_store(configured(tmp_path, batch_seconds=3600).storage, quiet_events(), "live")
    await store.ensure()
    try:
        # Writes made in the same turn of the event loop share a commit; nothing waits longer.
        await asyncio.wait_for(
            asyncio.gather(store.write(batch(KEY, T0, 2)), store.write(batch(OTHER, T0, 2))),
            timeout=5,
        )
        await asyncio.wait_for(store.write(batch(KEY, T0 + 2 * MIN, 1)), timeout=5)
        assert store.commits == 2
    finally:
        await store.close()


async def test_the_configured_memory_limit_and_threads_reach_duckdb(tmp_path):
    store = build_store(
        configured(tmp_path, memory_limit="24MB", threads=2).storage, quiet_events(), "history"
    )
    await store.ensure()
    try:
        assert isinstance(store, DuckDBStore)
        con = store._connection()
        limit, threads = con.execute(
            "SELECT current_setting('memory_limit'), current_setting('threads')"
        ).fetchone()
        assert limit == "22.8 MiB" and threads == 2  # 24,000,000 bytes
    finally:
        await store.close()


def test_the_default_memory_limit_bounds_the_buffer_pool_and_a_bad_one_is_refused(tmp_path):
    assert configured(tmp_path).storage.duckdb.memory_limit == "32MB"
    with pytest.raises(Exception, match="memory_limit"):
        configured(tmp_path, memory_limit="lots")
