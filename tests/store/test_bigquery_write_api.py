"""The BigQuery store's Storage Write API paths against the emulator, through the official
clients: a committed stream for live writes, pending streams committed in batches for history.

REST requests are counted by `FaultProxy` in front of the emulator's REST port (no insertAll,
no load job); gRPC answers are lost by `DroppingProxy` in front of its gRPC port.
"""

from __future__ import annotations

import asyncio
import struct
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime

import pyarrow as pa
import pytest
from bigquery_support import (
    FAST_RETRY,
    PROJECT,
    bigquery_emulator_fixture,  # noqa: F401 (registers the fixture)
    bigquery_store,
    client_fixture,  # noqa: F401 (registers the fixture)
    count_stored,
    emulator_grpc,
    emulator_url,
    proxy_fixture,  # noqa: F401 (registers the fixture)
    unique_dataset,
)
from store_support import KEY, MIN, OTHER, T0, batch
from tcp_proxy import DroppingProxy, containing

from tda_collector.config import BigQueryConfig
from tda_collector.errors import PermanentStoreError, TransientStoreError
from tda_collector.jobs.ledger import SqliteState
from tda_collector.models import BASE_COLUMNS, CandleBatch, JobKey
from tda_collector.store.bigquery_arrow import payloads
from tda_collector.store.bigquery_schema import TableNames, conform, schema_fields
from tda_collector.store.bigquery_write_api import StreamType, WriteApi, connect_write_api
from tda_collector.store.write_streams import CommitIntent, candle_spans


@pytest.fixture
async def state(tmp_path):
    opened = SqliteState(str(tmp_path / "state.sqlite"))
    await opened.open()
    yield opened
    await opened.close()


def _owner(dataset: str) -> str:
    return f"{PROJECT}.{dataset}.market_data_ohlcv:live"


@asynccontextmanager
async def _behind_dropping_proxy(tmp_path, dataset, state, retry):
    """A committed-stream store whose gRPC goes through a `DroppingProxy` that recognises an
    append by KEY's symbol: yields (store, rows, proxy)."""
    with DroppingProxy(emulator_grpc(), containing(KEY.symbol.encode())) as grpc_proxy:
        opened = bigquery_store(
            tmp_path,
            dataset=dataset,
            grpc=grpc_proxy.address,
            mode="committed",
            state=state,
            retry=retry,
        )
        async with opened as (store, rows):
            yield store, rows, grpc_proxy


def _closes(rows):
    return [(r["timestamp_ms"], r["close"]) for r in rows]


async def test_live_writes_append_to_one_committed_stream_without_insert_all_or_load_jobs(
    client, proxy, state, tmp_path
):
    dataset = unique_dataset()
    opened = bigquery_store(tmp_path, url=proxy.url, dataset=dataset, mode="committed", state=state)
    async with opened as (store, rows):
        for i in range(3):
            assert await store.write(batch(KEY, T0 + i * 5 * MIN, 5)) == 5
        await store.write(batch(OTHER, T0, 4))
        assert _closes(await rows(KEY)) == _closes(
            [{"timestamp_ms": T0 + i * MIN, "close": 100.5 + i % 5} for i in range(15)]
        )
        assert store.writer.streams_created == 1 and store.writer.appends == 4
    assert count_stored(client, dataset) == 19
    assert (proxy.seen["insert"], proxy.seen["load"]) == (0, 0)
    position = await state.stream_position(_owner(dataset))
    assert position is not None and (position.next_offset, position.in_doubt_rows) == (19, None)


async def test_concurrent_live_writes_share_appends_and_every_row_arrives_once(
    client, state, tmp_path
):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed", state=state) as (
        store,
        _,
    ):
        keys = [JobKey("binance", f"C{i}/USDT", "1m") for i in range(20)]
        await asyncio.gather(*(store.write(batch(key, T0, 3)) for key in keys))
        assert store.writer.appends < len(keys)  # writes waiting for an append went together
    assert count_stored(client, dataset) == 60


async def test_a_restarted_store_appends_to_its_stream_at_the_saved_offset(client, state, tmp_path):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed", state=state) as (
        store,
        _,
    ):
        await store.write(batch(KEY, T0, 5))
    first = await state.stream_position(_owner(dataset))
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed", state=state) as (
        store,
        _,
    ):
        await store.write(batch(KEY, T0 + 5 * MIN, 5))
        assert store.writer.streams_created == 0
    assert await state.stream_position(_owner(dataset)) == replace(first, next_offset=10)
    assert count_stored(client, dataset) == 10


async def test_an_append_never_acknowledged_before_a_crash_ends_its_stream_and_loses_nothing(
    client, state, tmp_path
):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed", state=state) as (
        store,
        _,
    ):
        await store.write(batch(KEY, T0, 5))
        landed = await state.stream_position(_owner(dataset))
        await store.write(batch(KEY, T0 + 5 * MIN, 3))
    # As if the process died after sending the second append, before saving its answer.
    await state.save_stream_position(_owner(dataset), replace(landed, in_doubt_rows=3))
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed", state=state) as (
        store,
        rows,
    ):
        await store.write(batch(KEY, T0 + 8 * MIN, 2))
        assert store.writer.streams_created == 1
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0 + i * MIN for i in range(10)]
    assert count_stored(client, dataset) == 10  # nothing twice: the old stream took no resend
    after = await state.stream_position(_owner(dataset))
    assert after.stream != landed.stream and (after.next_offset, after.in_doubt_rows) == (2, None)


async def test_a_lost_acknowledgement_is_resent_at_its_offset_and_stored_once(
    client, state, tmp_path
):
    dataset = unique_dataset()
    retry = replace(FAST_RETRY, attempts=6, cap_s=1.0)
    async with _behind_dropping_proxy(tmp_path, dataset, state, retry) as (store, rows, grpc_proxy):
        await store.write(batch(KEY, T0, 5))
        grpc_proxy.drop_answers = 1
        await store.write(batch(KEY, T0 + 5 * MIN, 5))
        assert grpc_proxy.drops == 1 and store.writer.appends >= 3
        await store.write(batch(KEY, T0 + 10 * MIN, 5))
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0 + i * MIN for i in range(15)]
    assert count_stored(client, dataset) == 15
    position = await state.stream_position(_owner(dataset))
    assert (position.next_offset, position.in_doubt_rows) == (15, None)


async def test_history_writes_are_committed_together_in_pending_streams_and_recorded(
    client, proxy, state, tmp_path
):
    dataset = unique_dataset()
    opened = bigquery_store(
        tmp_path,
        url=proxy.url,
        dataset=dataset,
        mode="pending",
        state=state,
        flush_rows=400,
        flush_seconds=0.5,
    )
    async with opened as (store, _):
        keys = [JobKey("binance", f"C{i}/USDT", "1m") for i in range(4)]

        async def backfill(key: JobKey) -> None:
            for page in range(5):
                await store.write(batch(key, T0 + page * 100 * MIN, 100))

        await asyncio.gather(*(backfill(key) for key in keys))
        assert store.writer.commits == store.writer.streams_created == 5
    assert count_stored(client, dataset) == 2000
    assert (proxy.seen["insert"], proxy.seen["load"]) == (0, 0)
    for key in keys:  # each commit's candles are in the ledger, settled with it
        assert await state.coverage(key) == [(T0, T0 + 500 * MIN)]
    assert await state.commit_intents() == []


async def test_commits_a_stopped_run_left_in_doubt_are_settled_from_what_bigquery_says(
    client, state, tmp_path
):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, mode="pending", state=state) as (
        store,
        _,
    ):
        api = store.writer._ctx.api()
        committed = await asyncio.to_thread(api.create_stream, StreamType.PENDING)
        uncommitted = await asyncio.to_thread(api.create_stream, StreamType.PENDING)
        for stream in (committed, uncommitted):
            await asyncio.to_thread(api.finalize, stream)
        await asyncio.to_thread(api.commit, [committed])
    landed, lost = batch(KEY, T0, 10), batch(OTHER, T0, 10)
    await state.save_commit_intent(CommitIntent(committed, {KEY: candle_spans(landed)}))
    await state.save_commit_intent(CommitIntent(uncommitted, {OTHER: candle_spans(lost)}))
    async with bigquery_store(tmp_path, dataset=dataset, mode="pending", state=state):
        pass  # ensure() settles them
    assert await state.coverage(KEY) == [(T0, T0 + 10 * MIN)]
    assert await state.coverage(OTHER) == []
    assert await state.commit_intents() == []


async def test_rows_whose_schema_the_table_does_not_have_are_a_permanent_error_naming_them(
    tmp_path,
):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed") as (store, _):
        write_client = store.writer._ctx.api()._client
        stranger = pa.schema([pa.field("no_such_column", pa.float64())])
        api = WriteApi(write_client, TableNames(PROJECT, dataset, "market_data_ohlcv"), stranger)
        stream = await asyncio.to_thread(api.create_stream, StreamType.COMMITTED)
        rows = payloads(pa.table({"no_such_column": [1.5]}, schema=stranger))
        with pytest.raises(PermanentStoreError, match="no_such_column"):
            await asyncio.to_thread(api.append, stream, rows, 0)


@asynccontextmanager
async def _after_an_append_whose_every_answer_was_lost(tmp_path, dataset, state):
    """A committed-stream store that wrote 5 rows of KEY, then 5 more whose rows landed at
    every try while no answer reached it (the write failed): yields (store, rows)."""
    async with _behind_dropping_proxy(tmp_path, dataset, state, FAST_RETRY) as (
        store,
        rows,
        grpc_proxy,
    ):
        await store.write(batch(KEY, T0, 5))
        grpc_proxy.drop_answers = FAST_RETRY.attempts  # every answer to the next append
        with pytest.raises(TransientStoreError):
            await store.write(batch(KEY, T0 + 5 * MIN, 5))
        yield store, rows


async def test_rows_of_an_append_that_kept_failing_are_resent_at_their_offset_and_stored_once(
    client, state, tmp_path
):
    dataset = unique_dataset()
    async with _after_an_append_whose_every_answer_was_lost(tmp_path, dataset, state) as (
        store,
        rows,
    ):
        in_doubt = await state.stream_position(_owner(dataset))
        assert (in_doubt.next_offset, in_doubt.in_doubt_rows) == (5, 5)
        assert count_stored(client, dataset) == 10  # they landed; only their answers were lost
        # Their writer tries again, as the durable writer does; then another writer's rows.
        await store.write(batch(KEY, T0 + 5 * MIN, 5))
        await store.write(batch(OTHER, T0, 4))
        assert store.writer.streams_created == 1  # the ALREADY_EXISTS answer settled it
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0 + i * MIN for i in range(10)]
        assert len(await rows(OTHER)) == 4
    assert count_stored(client, dataset) == 14
    position = await state.stream_position(_owner(dataset))
    assert (position.next_offset, position.in_doubt_rows) == (14, None)


async def test_a_write_after_an_append_that_kept_failing_takes_no_other_rows_for_its_own(
    client, state, tmp_path
):
    dataset = unique_dataset()
    async with _after_an_append_whose_every_answer_was_lost(tmp_path, dataset, state) as (
        store,
        rows,
    ):
        # Another writer comes first: the lost rows go again at their offset (ALREADY_EXISTS),
        # its own after them.
        await store.write(batch(OTHER, T0, 4))
        assert len(await rows(OTHER)) == 4
        # A different version of a lost row is a new version, not a resend.
        await store.write(batch(KEY, T0 + 5 * MIN, 1, price=300.0))
        assert (await rows(KEY))[5]["close"] == 300.5
    assert count_stored(client, dataset) == 15


def _page_with_marked_second_request(count: int, request_bytes: int) -> tuple[CandleBatch, int]:
    """`count` candles of KEY from T0 + 5 min whose rows after the append's first request all
    close at one price found nowhere before (the proxy's marker); and that request's rows."""
    page = batch(KEY, T0 + 5 * MIN, count)
    table = conform(page.to_arrow(datetime.now(UTC)), schema_fields(BASE_COLUMNS))
    first = payloads(table, request_bytes)[0].rows
    close = page.close.copy()
    close[first:] = MARKED_CLOSE
    return replace(page, close=close), first


MARKED_CLOSE = 12_345.678


async def test_a_stream_closed_between_two_requests_of_one_append_gets_only_the_rest_anew(
    client, state, tmp_path
):
    dataset = unique_dataset()
    config = BigQueryConfig(
        project=PROJECT,
        dataset=dataset,
        api_endpoint=emulator_url(),
        write_api_endpoint=emulator_grpc(),
    )
    direct = connect_write_api(config, {})  # not through the proxy, which the hook holds up
    async with _behind_dropping_proxy(tmp_path, dataset, state, FAST_RETRY) as (
        store,
        rows,
        grpc_proxy,
    ):
        store.writer.request_bytes = 20_000
        await store.write(batch(KEY, T0, 5))
        stream = (await state.stream_position(_owner(dataset))).stream
        page, first = _page_with_marked_second_request(1000, store.writer.request_bytes)

        def close_the_stream() -> None:  # the first request is whole at the server
            deadline = time.monotonic() + 20
            while count_stored(client, dataset) < 5 + first and time.monotonic() < deadline:
                time.sleep(0.05)
            direct.finalize_write_stream(name=stream)

        grpc_proxy.pause_before = (struct.pack("<d", MARKED_CLOSE), close_the_stream)
        assert await store.write(page) == 1000
        assert grpc_proxy.pause_before is None  # the pause happened
        assert store.writer.streams_created == 2
        got = await rows(KEY)
        assert [r["timestamp_ms"] for r in got] == [T0 + i * MIN for i in range(1005)]
        assert [r["close"] for r in got[5:]] == page.close.tolist()
    direct.transport.close()
    assert count_stored(client, dataset) == 1005  # the first request's rows not sent again
    after = await state.stream_position(_owner(dataset))
    assert after.stream != stream
    assert (after.next_offset, after.in_doubt_rows) == (1000 - first, None)


async def test_a_stream_bigquery_closed_is_replaced_and_the_write_lands_once(
    client, state, tmp_path
):
    dataset = unique_dataset()
    async with bigquery_store(tmp_path, dataset=dataset, mode="committed", state=state) as (
        store,
        rows,
    ):
        await store.write(batch(KEY, T0, 5))
        first = await state.stream_position(_owner(dataset))
        await asyncio.to_thread(store.writer._ctx.api().finalize, first.stream)  # behind its back
        await store.write(batch(KEY, T0 + 5 * MIN, 5))
        assert store.writer.streams_created == 2
        assert [r["timestamp_ms"] for r in await rows(KEY)] == [T0 + i * MIN for i in range(10)]
    assert count_stored(client, dataset) == 10
    after = await state.stream_position(_owner(dataset))
    assert after.stream != first.stream and after.next_offset == 5
