"""The BigQuery store against the local emulator, through the official client.

What the shared contract (test_store_contract.py) cannot see: table layout and schema
evolution, streaming retries and rejected rows, history-mode load batching, credentials.
Faults are injected by `FaultProxy`, a loopback proxy between the store and the emulator.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import numpy as np
import pytest
from bigquery_support import (
    FAST_RETRY,
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    bigquery_store,
    client_fixture,  # noqa: F401 (registers the fixture)
    count_stored,
    emulator_client,
    emulator_grpc,
    proxy_fixture,  # noqa: F401 (registers the fixture)
    unique_dataset,
)
from event_support import recording_events
from google.cloud import bigquery
from store_support import KEY, MIN, OTHER, T0, batch

from tda_collector.config import BigQueryConfig
from tda_collector.errors import PermanentStoreError, TransientStoreError, UsageError
from tda_collector.models import BASE_COLUMNS, Column, JobKey
from tda_collector.store.bigquery_schema import (
    TableNames,
    chunks,
    conform,
    missing_fields,
    schema_fields,
    stream_rows,
)
from tda_collector.store.bigquery_store import BigQueryStore

RSI = Column("rsi_14", "FLOAT64")


def _table_id(dataset: str) -> str:
    return f"{PROJECT}.{dataset}.market_data_ohlcv"


def _create_table(client, dataset, columns, partitioning=None, rows=0):
    """A table made by hand (as an older collector version or a user would)."""
    client.create_dataset(f"{PROJECT}.{dataset}")
    table = bigquery.Table(_table_id(dataset), schema=schema_fields(columns))
    if partitioning:
        table.time_partitioning = bigquery.TimePartitioning(type_=partitioning, field="timestamp")
    client.create_table(table)
    if rows:
        values = [
            {
                "timestamp": f"2024-01-01 00:0{i}:00",
                "exchange": "binance",
                "symbol": "BTC/USDT",
                "timeframe": "1m",
                **dict.fromkeys(("open", "high", "low", "close", "volume"), 1.0),
                "ingested_at": "2024-01-02 00:00:00",
            }
            for i in range(rows)
        ]
        assert client.insert_rows_json(_table_id(dataset), values) == []


# --- layout and schema evolution ------------------------------------------------------------


@pytest.mark.parametrize("partitioning", ["DAY", "MONTH"])
async def test_table_is_partitioned_on_timestamp_and_clustered_by_series(
    client, tmp_path, partitioning
):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, partitioning=partitioning):
        table = client.get_table(_table_id(dataset))
        assert table.time_partitioning.type_ == partitioning
        assert table.time_partitioning.field == "timestamp"
        assert table.clustering_fields == ["exchange", "symbol", "timeframe"]
        modes = {f.name: f.mode for f in table.schema}
        assert modes == {c.name: "NULLABLE" if c.nullable else "REQUIRED" for c in BASE_COLUMNS}
        assert client.get_table(_table_id(dataset) + "_latest").table_type == "VIEW"


async def test_ensure_adds_missing_columns_as_nullable_and_keeps_rows(client, tmp_path):
    dataset = unique_dataset()
    old_columns = [c for c in BASE_COLUMNS if c.name != "is_closed"]
    _create_table(client, dataset, old_columns, partitioning="DAY", rows=3)
    events, log = recording_events()
    opened = bigquery_store(tmp_path, dataset=dataset, events=events, extra_columns=(RSI,))
    async with opened as (store, rows):
        modes = {f.name: f.mode for f in client.get_table(_table_id(dataset)).schema}
        assert modes["is_closed"] == modes["rsi_14"] == "NULLABLE"
        assert modes["timestamp"] == "REQUIRED"
        assert log.named("store_ensure_table")[-1]["added_columns"] == ["is_closed", "rsi_14"]
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0, T0 + MIN, T0 + 2 * MIN]

        page = batch(KEY, T0 + 3 * MIN, 2)
        page.extra["rsi_14"] = np.array([np.nan, 55.5])
        await store.write(page)
        got = await rows(KEY)
        assert [r["rsi_14"] for r in got] == [None, None, None, None, 55.5]
        assert [r["is_closed"] for r in got] == [None, None, None, True, True]


async def test_a_differing_partitioning_is_reported_and_left_unchanged(client, tmp_path):
    dataset = unique_dataset()
    _create_table(client, dataset, BASE_COLUMNS, partitioning="MONTH")
    events, log = recording_events()
    async with bigquery_store(tmp_path, dataset=dataset, events=events) as (store, rows):
        await store.write(batch(KEY, T0, 2))
        assert len(await rows(KEY)) == 2
    assert client.get_table(_table_id(dataset)).time_partitioning.type_ == "MONTH"
    (warning,) = [e for e in log.named("store_ensure_table") if e["level"] == "WARNING"]
    assert warning["status"] == "layout_differs"
    assert "partitioning is MONTH on timestamp, expected DAY" in warning["message"]


# --- live mode: streaming inserts -----------------------------------------------------------


async def test_live_mode_streams_rows_and_starts_no_load_job(tmp_path):
    async with bigquery_store(tmp_path, mode="stream") as (store, rows):
        assert await store.write(batch(KEY, T0, 3)) == 3
        assert store.writer.insert_requests == 1 and not hasattr(store.writer, "load_jobs")
        assert len(await rows(KEY)) == 3


@pytest.mark.parametrize("fault", ["lost_response", "rows_backend_error"])
async def test_a_retried_insert_leaves_no_duplicate_rows(client, proxy, tmp_path, fault):
    dataset = unique_dataset()
    proxy.insert_faults.append(fault)
    opened = bigquery_store(tmp_path, url=proxy.url, dataset=dataset, retry=FAST_RETRY)
    async with opened as (store, rows):
        await store.write(batch(KEY, T0, 5))
        assert proxy.seen["insert"] == store.writer.insert_requests == 2
        assert count_stored(client, dataset) == 5
        assert len(await rows(KEY)) == 5


async def test_rejected_rows_raise_and_are_logged_while_the_others_are_stored(
    client, proxy, tmp_path
):
    dataset = unique_dataset()
    events, log = recording_events()
    proxy.insert_faults.append("reject_second_row")
    async with bigquery_store(
        tmp_path, url=proxy.url, dataset=dataset, events=events, retry=FAST_RETRY
    ) as (store, rows):
        with pytest.raises(PermanentStoreError, match="rejected 1 rows: invalid at open"):
            await store.write(batch(KEY, T0, 4))
        (error,) = log.named("store_write_error")
        assert error["rows"] == 1
        assert "invalid at open: injected: not a number" in error["error"]
        assert error["symbol"] == "BTC/USDT"
        # The three rows that were only stopped were sent again and stored.
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0, T0 + 2 * MIN, T0 + 3 * MIN]


async def test_an_insert_that_keeps_failing_raises_a_transient_error(proxy, tmp_path):
    proxy.insert_faults.extend(["lost_response"] * FAST_RETRY.attempts)
    events, log = recording_events()
    opened = bigquery_store(tmp_path, url=proxy.url, events=events, retry=FAST_RETRY)
    async with opened as (store, _):
        with pytest.raises(TransientStoreError, match="streaming insert failed: ServiceUnav"):
            await store.write(batch(KEY, T0, 2))
        assert store.writer.insert_requests == FAST_RETRY.attempts
        assert len(log.named("backoff_retry")) == FAST_RETRY.attempts - 1


async def test_a_refused_insert_is_a_permanent_error_at_once(client, proxy, tmp_path):
    dataset = unique_dataset()
    proxy.insert_faults.append("bad_request")
    opened = bigquery_store(tmp_path, url=proxy.url, dataset=dataset, retry=FAST_RETRY)
    async with opened as (store, _):
        with pytest.raises(PermanentStoreError, match=r"BadRequest: 400 .*no such field: rsi_14"):
            await store.write(batch(KEY, T0, 2))
        assert store.writer.insert_requests == 1  # not retried
        assert count_stored(client, dataset) == 0


async def test_a_store_that_cannot_be_reached_at_start_raises_a_one_line_permanent_error(
    proxy, tmp_path
):
    proxy.refuse_all = 403
    with pytest.raises(PermanentStoreError) as raised:
        async with bigquery_store(tmp_path, url=proxy.url):
            pass
    message = str(raised.value)
    assert message.startswith(f"ensuring BigQuery table {PROJECT}.")
    assert "Forbidden: 403" in message and "\n" not in message


# --- history mode: batched load jobs --------------------------------------------------------


async def test_history_writes_share_few_load_jobs_and_every_row_arrives(client, tmp_path):
    dataset = unique_dataset()
    tasks, pages, rows_per_page = 8, 5, 100
    async with bigquery_store(
        tmp_path, dataset=dataset, mode="load", flush_rows=800, flush_seconds=0.5
    ) as (store, _):

        async def backfill(series: int) -> None:
            key = JobKey("binance", f"C{series}/USDT", "1m")
            for page in range(pages):
                start = T0 + page * rows_per_page * MIN
                assert await store.write(batch(key, start, rows_per_page)) == rows_per_page

        await asyncio.gather(*(backfill(i) for i in range(tasks)))
        # 40 pages, 5 jobs: every round of 8 pages fills the 800-row buffer.
        assert store.writer.load_jobs == pages
        assert count_stored(client, dataset) == tasks * pages * rows_per_page
        newest = await store.newest([JobKey("binance", "C3/USDT", "1m")])
        assert list(newest.values()) == [T0 + (pages * rows_per_page - 1) * MIN]


async def test_a_buffered_write_is_loaded_after_the_wait_or_on_close(tmp_path):
    async with bigquery_store(tmp_path, mode="load", flush_seconds=0.05) as (store, rows):
        await asyncio.wait_for(store.write(batch(KEY, T0, 3)), timeout=30)
        assert store.writer.load_jobs == 1
        assert len(await rows(KEY)) == 3

    async with bigquery_store(tmp_path, mode="load", flush_seconds=3600) as (store, rows):
        pending = asyncio.create_task(store.write(batch(OTHER, T0, 2)))
        await asyncio.sleep(0.05)
        assert not pending.done()
        await store.close()
        assert await pending == 2
        assert len(await rows(OTHER)) == 2


async def test_a_failed_load_job_is_retried(client, proxy, tmp_path):
    dataset = unique_dataset()
    events, log = recording_events()
    proxy.failed_load_jobs = 1
    async with bigquery_store(
        tmp_path,
        url=proxy.url,
        dataset=dataset,
        events=events,
        mode="load",
        flush_seconds=0.05,
        retry=FAST_RETRY,
    ) as (store, _):
        await store.write(batch(KEY, T0, 3))
        assert store.writer.load_jobs == proxy.seen["load"] == 2
        assert count_stored(client, dataset) == 3
        assert "injected: load job failed" in log.named("backoff_retry")[0]["error"]


async def test_every_writer_of_a_load_job_that_keeps_failing_gets_the_transient_error(
    proxy, tmp_path
):
    proxy.failed_load_jobs = FAST_RETRY.attempts
    async with bigquery_store(
        tmp_path, url=proxy.url, mode="load", flush_seconds=0.05, retry=FAST_RETRY
    ) as (store, _):
        outcomes = await asyncio.gather(
            store.write(batch(KEY, T0, 3)),
            store.write(batch(OTHER, T0, 3)),
            return_exceptions=True,
        )
        assert [type(o) for o in outcomes] == [TransientStoreError, TransientStoreError]
        assert outcomes[0] is not outcomes[1] and str(outcomes[0]) == str(outcomes[1])
        assert "load job failed: InternalServerError" in str(outcomes[0])
        assert store.writer.load_jobs == FAST_RETRY.attempts


async def test_a_load_job_refused_as_invalid_fails_every_writer_permanently_at_once(
    client, proxy, tmp_path
):
    dataset = unique_dataset()
    proxy.failed_load_jobs, proxy.load_job_error = 1, "invalid"
    async with bigquery_store(
        tmp_path, url=proxy.url, dataset=dataset, mode="load", flush_rows=6, retry=FAST_RETRY
    ) as (store, _):
        outcomes = await asyncio.gather(
            store.write(batch(KEY, T0, 3)),
            store.write(batch(OTHER, T0, 3)),
            return_exceptions=True,
        )
        assert [type(o) for o in outcomes] == [PermanentStoreError, PermanentStoreError]
        assert "load job failed: BadRequest" in str(outcomes[0])
        assert store.writer.load_jobs == 1
        assert count_stored(client, dataset) == 0


# --- reading back, configuration ------------------------------------------------------------


async def test_newest_reads_the_cursor_back_after_a_restart(tmp_path):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset) as (store, _):
        await store.write(batch(KEY, T0, 4))
        await store.write(batch(KEY, T0 + 4 * MIN, 1, closed=False))
    async with bigquery_store(tmp_path, dataset=dataset) as (restarted, rows):
        assert await restarted.newest([KEY, OTHER]) == {KEY: T0 + 3 * MIN}
        assert await restarted.newest([KEY], closed_only=False) == {KEY: T0 + 4 * MIN}
        assert len(await rows(KEY)) == 5


def test_a_missing_project_is_a_one_line_usage_error():
    config = BigQueryConfig(project=None)
    with pytest.raises(UsageError) as raised:
        BigQueryStore(config, recording_events()[0], environ={})
    assert str(raised.value) == (
        "storage.bigquery.project: not set and GOOGLE_CLOUD_PROJECT is empty"
    )
    store = BigQueryStore(config, recording_events()[0], environ={"GOOGLE_CLOUD_PROJECT": "p-1"})
    assert store.name == "bigquery"


@pytest.mark.parametrize(
    ("field", "value"),
    [("project", "p`; DROP"), ("dataset", "market-data"), ("table", "ohlcv.x")],
)
def test_identifiers_are_validated_before_reaching_sql(field, value):
    names = {"project": "p", "dataset": "d", "table": "t", field: value}
    with pytest.raises(UsageError, match=f"storage.bigquery.{field}:"):
        TableNames(**names)


def test_streaming_requests_stay_within_row_and_size_limits():
    rows = [{"i": i, "pad": "x" * 1000} for i in range(1200)]
    ids = [str(i) for i in range(1200)]
    by_rows = list(chunks(rows, ids))
    assert [len(r) for r, _ in by_rows] == [500, 500, 200]
    by_bytes = list(chunks(rows, ids, max_bytes=100_000))
    assert all(len(r) <= 98 for r, _ in by_bytes)
    assert [row for r, _ in by_bytes for row in r] == rows


async def test_a_closed_version_wins_over_a_newer_open_one(tmp_path):
    async with bigquery_store(tmp_path) as (store, rows):
        await store.write(batch(KEY, T0, 2, price=100.0, closed=True))
        await store.write(batch(KEY, T0 + MIN, 2, price=300.0, closed=False))
        got = await rows(KEY)
        assert [(r["open"], r["is_closed"]) for r in got] == [
            (100.0, True),
            (101.0, True),
            (301.0, False),
        ]


def test_row_ids_name_a_version_of_a_row():
    page = batch(KEY, T0, 3)
    fields = schema_fields(BASE_COLUMNS)
    first = conform(page.to_arrow(datetime(2024, 1, 2, tzinfo=UTC)), fields)
    later = conform(page.to_arrow(datetime(2024, 1, 3, tzinfo=UTC)), fields)
    rows, ids = stream_rows(first)
    assert stream_rows(first)[1] == ids  # a retry of the same write: the same ids
    assert len(set(ids)) == 3
    assert set(stream_rows(later)[1]).isdisjoint(ids)  # a newer version: new ids
    assert rows[0]["timestamp"] == "2024-01-01 00:00:00.000000Z"


async def test_a_missing_credentials_file_is_a_one_line_usage_error(tmp_path):
    environ = {
        "GOOGLE_CLOUD_PROJECT": "p-1",
        "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "missing.json"),
    }
    store = BigQueryStore(BigQueryConfig(), recording_events()[0], environ=environ)
    try:
        with pytest.raises(UsageError, match=r"^GOOGLE_APPLICATION_CREDENTIALS: no such file: /"):
            await store.ensure()
    finally:
        await store.close()


def test_a_table_lacking_a_required_column_is_a_usage_error():
    existing = schema_fields([c for c in BASE_COLUMNS if c.name != "volume"])
    with pytest.raises(UsageError, match=r"lacks required column\(s\) volume"):
        missing_fields(existing, BASE_COLUMNS)
    without_closed = schema_fields(BASE_COLUMNS[:-1])
    assert [(f.name, f.mode) for f in missing_fields(without_closed, BASE_COLUMNS)] == [
        ("is_closed", "NULLABLE")
    ]


async def test_instances_ensuring_one_new_dataset_at_once_all_get_it(bigquery_emulator):
    """Several instances start together on a dataset nobody made yet: each ensure succeeds
    (the emulator answers the losers of a creation race 400 "failed to commit", BigQuery 409)."""
    dataset = unique_dataset()
    config = BigQueryConfig(
        project=PROJECT,
        dataset=dataset,
        api_endpoint=bigquery_emulator,
        write_api_endpoint=emulator_grpc(),
    )
    stores = [BigQueryStore(config, events=recording_events()[0]) for _ in range(4)]
    try:
        await asyncio.gather(*(store.ensure() for store in stores))
    finally:
        await asyncio.gather(*(store.close() for store in stores))
    client = emulator_client(bigquery_emulator)
    try:
        assert (
            client.get_table(f"{PROJECT}.{dataset}.market_data_ohlcv_latest").table_type == "VIEW"
        )
    finally:
        client.close()
