"""`CandleStore.read`, run against DuckDB and BigQuery (the emulator): the rows users query, every
column, oldest first, in bounded chunks, with the candle in progress left out on request."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest
from bigquery_support import bigquery_store
from store_support import KEY, MIN, OTHER, T0, batch, duckdb_store

from tda_collector.models import Column
from tda_collector.store import bigquery_store as bigquery_module
from tda_collector.store import reads
from tda_collector.store.reads import CandleQuery

STORES = [pytest.param(duckdb_store, id="duckdb"), pytest.param(bigquery_store, id="bigquery")]
RSI = Column("rsi_14", "FLOAT64")
DAY = 1440 * MIN


@pytest.fixture(params=STORES)
def store_factory(request):
    return request.param


async def read_all(store, query: CandleQuery) -> list[pa.Table]:
    return [chunk async for chunk in store.read(query)]


def with_rsi(candles, values):
    candles.extra["rsi_14"] = np.asarray(values, dtype=float)
    return candles


async def test_a_read_answers_the_range_exactly_with_every_column(store_factory, tmp_path):
    async with store_factory(tmp_path, extra_columns=(RSI,)) as (store, _):
        await store.write(with_rsi(batch(KEY, T0, 10), [np.nan] * 3 + list(range(7))))
        await store.write(batch(OTHER, T0, 10, price=5.0))
        chunks = await read_all(store, CandleQuery(KEY, T0 + 2 * MIN, T0 + 8 * MIN))
    table = pa.concat_tables(chunks)
    assert table.num_rows == 6
    stamps = table.column("timestamp")
    assert stamps.type == pa.timestamp(stamps.type.unit, tz="UTC")
    assert [t.value // (1000 if stamps.type.unit == "us" else 1) for t in stamps] == [
        T0 + i * MIN for i in range(2, 8)
    ]
    assert table.column("open").to_pylist() == [100.0 + i for i in range(2, 8)]
    assert table.column("close").to_pylist() == [100.5 + i for i in range(2, 8)]
    assert table.column("rsi_14").to_pylist() == [None, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert set(table.column("symbol").to_pylist()) == {KEY.symbol}
    assert {"ingested_at", "is_closed", "volume", "exchange", "timeframe"} <= set(
        table.column_names
    )


async def test_closed_only_leaves_out_the_candle_in_progress(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, _):
        await store.write(batch(KEY, T0, 4))
        await store.write(batch(KEY, T0 + 4 * MIN, 1, closed=False))
        everything = pa.concat_tables(await read_all(store, CandleQuery(KEY, T0, T0 + 60 * MIN)))
        closed = pa.concat_tables(
            await read_all(store, CandleQuery(KEY, T0, T0 + 60 * MIN, closed_only=True))
        )
    assert everything.column("is_closed").to_pylist() == [True] * 4 + [False]
    assert closed.column("is_closed").to_pylist() == [True] * 4


async def test_a_limit_answers_the_oldest_rows(store_factory, tmp_path):
    async with store_factory(tmp_path) as (store, _):
        await store.write(batch(KEY, T0, 10))
        table = pa.concat_tables(await read_all(store, CandleQuery(KEY, T0, T0 + DAY, limit=3)))
    assert table.column("open").to_pylist() == [100.0, 101.0, 102.0]


async def test_nothing_stored_in_the_range_is_one_empty_table_naming_the_columns(
    store_factory, tmp_path
):
    async with store_factory(tmp_path) as (store, _):
        await store.write(batch(KEY, T0, 3))
        chunks = await read_all(store, CandleQuery(KEY, T0 + DAY, T0 + 2 * DAY))
    assert [c.num_rows for c in chunks] == [0]
    assert {"timestamp", "open", "is_closed"} <= set(chunks[0].column_names)


async def test_a_long_range_comes_in_bounded_chunks_in_order(store_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(reads, "READ_CHUNK_ROWS", 64)
    monkeypatch.setattr(bigquery_module, "READ_CHUNK_ROWS", 64)
    async with store_factory(tmp_path) as (store, _):
        # Out of order and with a hole, as backfills and live repairs leave a table.
        await store.write(batch(KEY, T0 + 300 * MIN, 200, price=400.0))
        await store.write(batch(KEY, T0, 150))
        chunks = await read_all(store, CandleQuery(KEY, T0, T0 + DAY))
    assert max(c.num_rows for c in chunks) <= 64 and len(chunks) >= 6
    opens = pa.concat_tables(chunks).column("open").to_pylist()
    assert opens == [100.0 + i for i in range(150)] + [400.0 + i for i in range(200)]


async def test_a_range_far_beyond_the_stored_rows_costs_one_window():
    stored = [T0 + i * MIN for i in range(100)]
    asked: list[tuple[int, int]] = []

    async def fetch(start_ms: int, end_ms: int, limit: int) -> pa.Table:
        asked.append((start_ms, end_ms))
        stamps = [t for t in stored if start_ms <= t < end_ms][:limit]
        return pa.table({"timestamp": pa.array(stamps, pa.timestamp("ms", tz="UTC"))})

    async def first_stored(start_ms: int, end_ms: int) -> int | None:
        return next((t for t in stored if start_ms <= t < end_ms), None)

    year_9999 = 253_402_300_799_999
    query = CandleQuery(KEY, 0, year_9999)
    chunks = [chunk async for chunk in reads.read_by_windows(query, fetch, first_stored)]
    assert [t.value for c in chunks for t in c.column("timestamp")] == stored
    assert asked == [(T0, T0 + reads.READ_CHUNK_ROWS * MIN)]  # one window, from the first row


async def test_a_read_held_open_does_not_hold_up_writes(store_factory, tmp_path, monkeypatch):
    monkeypatch.setattr(reads, "READ_CHUNK_ROWS", 8)
    monkeypatch.setattr(bigquery_module, "READ_CHUNK_ROWS", 8)
    async with store_factory(tmp_path) as (store, rows):
        await store.write(batch(KEY, T0, 40))
        reading = store.read(CandleQuery(KEY, T0, T0 + DAY))
        first = await anext(reading)  # a slow client: the read waits between its chunks
        await asyncio.wait_for(store.write(batch(OTHER, T0, 5)), 30)
        await asyncio.wait_for(store.write(batch(KEY, T0 + 40 * MIN, 5, price=300.0)), 30)
        rest = [chunk async for chunk in reading]
        assert len(await rows(OTHER)) == 5
    opens = pa.concat_tables([first, *rest]).column("open").to_pylist()
    assert opens[:40] == [100.0 + i for i in range(40)]
