"""A year of 1m read as Parquet from a running collector on BigQuery (the emulator) holds a
page at a time, not the year: the same measure as `test_ohlcv_memory.py` (the collector's peak
RSS, VmHWM, after a month's read and then after the year's) on the other store, whose reads
are parameterised queries on the `_latest` view, paged."""

from __future__ import annotations

import asyncio

from bigquery_support import (
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    emulator_client,
    emulator_grpc,
    unique_dataset,
)
from seeding import YEAR_OF_MINUTES, seed_minutes_bigquery
from store_support import quiet_events
from test_ohlcv_memory import START_MS, check_the_year, year_read

from tda_collector.config import BigQueryConfig, IndicatorsConfig
from tda_collector.modes.indicator_stage import indicator_columns
from tda_collector.store.bigquery_store import BigQueryStore


def ensure_table(config: BigQueryConfig) -> None:
    """The collector's own table (with the indicator columns) and its `_latest` view."""

    async def ensure() -> None:
        columns = indicator_columns(IndicatorsConfig().spec())
        store = BigQueryStore(config, quiet_events(), extra_columns=columns)
        await store.ensure()
        await store.close()

    asyncio.run(ensure())


def test_a_year_of_1m_as_parquet_streams_from_bigquery_with_bounded_memory(
    tmp_path, bigquery_emulator
):
    dataset = unique_dataset()
    storage = {
        "project": PROJECT,
        "dataset": dataset,
        "api_endpoint": bigquery_emulator,
        "write_api_endpoint": emulator_grpc(),
    }
    config = BigQueryConfig(**storage)
    ensure_table(config)
    client = emulator_client(bigquery_emulator)
    table_id = f"{PROJECT}.{dataset}.{config.table}"
    close_sum = seed_minutes_bigquery(client, table_id, START_MS, YEAR_OF_MINUTES)
    client.close()
    peaks, body = year_read(tmp_path, {"backend": "bigquery", "bigquery": storage})
    check_the_year(body, close_sum, peaks, "BigQuery")
