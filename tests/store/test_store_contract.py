"""The store contract, run against every store: DuckDB, the in-memory fake the other tests use
(so it cannot drift from the real ones), and BigQuery where its emulator runs (the legacy
insertAll path and both Storage Write API paths).

`store_factory(tmp_path)` fixtures return an async context manager yielding an opened store
plus a `rows(key)` reader that returns what users query (one row per key, newest version).
`failing_store_factory(tmp_path)` ones yield a store whose writes fail transiently, in the way
that store can (DuckDB: its file locked by another process; BigQuery: 503s; the fake: its
knob), plus `clear()` that ends the fault.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
import pytest
from bigquery_support import bigquery_store, bigquery_store_failing_transiently
from store_support import (
    KEY,
    MIN,
    OTHER,
    T0,
    batch,
    duckdb_store,
    duckdb_store_failing_transiently,
    memory_store,
    memory_store_failing_transiently,
)

from tda_collector.errors import PermanentStoreError, TransientStoreError
from tda_collector.models import Column, JobKey

STORES = [
    pytest.param(duckdb_store, id="duckdb"),
    pytest.param(memory_store, id="memory"),
    pytest.param(bigquery_store, id="bigquery"),
    # The Storage Write API paths: live's committed stream, history's pending streams. (Their
    # transient faults are lost gRPC answers: test_bigquery_write_api.py.)
    pytest.param(partial(bigquery_store, mode="committed"), id="bigquery-committed"),
    pytest.param(
        partial(bigquery_store, mode="pending", flush_seconds=0.05), id="bigquery-pending"
    ),
]
FAILING_STORES = [
    pytest.param(duckdb_store_failing_transiently, id="duckdb"),
    pytest.param(memory_store_failing_transiently, id="memory"),
    pytest.param(bigquery_store_failing_transiently, id="bigquery"),
]


@pytest.fixture(params=STORES)
def store_factory(request):
    return request.param


@pytest.fixture(params=FAILING_STORES)
def failing_store_factory(request):
    return request.param


async def test_ensure_twice_is_harmless(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, rows):
        await store.ensure()
        await store.write(batch(KEY, T0, 3))
        await store.ensure()
        assert len(await rows(KEY)) == 3


async def test_written_values_read_back_exactly(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, rows):
        assert await store.write(batch(KEY, T0, 5)) == 5
        got = await rows(KEY)
        assert [r["timestamp_ms"] for r in got] == [T0 + i * MIN for i in range(5)]
        assert [r["close"] for r in got] == [100.5 + i for i in range(5)]
        assert {(r["exchange"], r["symbol"], r["timeframe"]) for r in got} == {
            ("binance", "BTC/USDT", "1m")
        }


async def test_rewriting_a_key_keeps_one_row_with_the_newest_version(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, rows):
        await store.write(batch(KEY, T0, 4, price=100.0, closed=False))
        await store.write(batch(KEY, T0 + 2 * MIN, 4, price=200.0))
        got = await rows(KEY)
        assert len(got) == 6
        assert [r["open"] for r in got] == [100.0, 101.0, 200.0, 201.0, 202.0, 203.0]
        assert all(r["is_closed"] for r in got[2:])


async def test_newest_per_key(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, _):
        await store.write(batch(KEY, T0, 10))
        await store.write(batch(OTHER, T0, 3))
        await store.write(batch(OTHER, T0 + 3 * MIN, 1, closed=False))
        missing = JobKey("binance", "SOL/USDT", "1m")
        newest = await store.newest([KEY, OTHER, missing])
        assert newest == {KEY: T0 + 9 * MIN, OTHER: T0 + 2 * MIN}
        assert (await store.newest([OTHER], closed_only=False))[OTHER] == T0 + 3 * MIN


async def test_series_reads_back_closed_candles_in_time_order(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, _):
        await store.write(batch(KEY, T0 + 3 * MIN, 2))
        await store.write(batch(KEY, T0, 3, price=50.0))
        await store.write(batch(KEY, T0 + 5 * MIN, 1, closed=False))
        await store.write(batch(OTHER, T0, 2))
        series = await store.series(KEY)
        assert series.timestamps.tolist() == [T0 + i * MIN for i in range(5)]
        assert series.close.tolist() == [50.5, 51.5, 52.5, 100.5, 101.5]
        assert series.closed.all()


async def test_series_carries_the_extra_columns_with_null_as_nan(store_factory, tmp_path):
    async with store_factory(tmp_path, extra_columns=(Column("rsi_14", "FLOAT64"),)) as (
        store,
        _,
    ):
        page = batch(KEY, T0, 3)
        await store.write(replace(page, extra={"rsi_14": np.array([np.nan, 55.5, 60.25])}))
        await store.write(batch(KEY, T0 + 3 * MIN, 1))  # written without the column
        series = await store.series(KEY)
        assert list(series.extra) == ["rsi_14"]
        got = series.extra["rsi_14"]
        assert np.array_equal(got, [np.nan, 55.5, 60.25, np.nan], equal_nan=True)


async def test_a_column_the_table_lacks_is_a_permanent_error_and_nothing_is_stored(
    store_factory, tmp_path
):
    async with store_factory(tmp_path) as (store, rows):
        page = batch(KEY, T0, 3)
        page = replace(page, extra={"rsi_14": np.full(len(page), 50.0)})
        with pytest.raises(PermanentStoreError, match="rsi_14"):
            await store.write(page)
        assert await rows(KEY) == []
        assert await store.newest([KEY], closed_only=False) == {}


async def test_a_transient_fault_is_raised_as_transient_and_the_write_succeeds_once_it_clears(
    failing_store_factory, tmp_path
):
    async with failing_store_factory(tmp_path) as (store, rows, clear):
        with pytest.raises(TransientStoreError) as raised:
            await store.write(batch(KEY, T0, 3))
        assert "\n" not in str(raised.value)
        await clear()
        assert await store.write(batch(KEY, T0, 3)) == 3
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0 + i * MIN for i in range(3)]
