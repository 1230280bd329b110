"""The cloud store: BigQuery, fed through the Storage Write API (or the legacy fallback).

Live mode appends each write to a committed stream at offsets kept in the state store: rows are
queryable on acknowledgement and stored exactly once, retries and restarts included. History
mode gathers writes into pending streams committed in batches: atomic like a load job, without
the 1,500 load jobs per table per day. Both send Arrow record batches (`bigquery_streams`). The
legacy paths (insertAll, load jobs) stay as a fallback for networks without gRPC
(`bigquery_legacy`). Rows are only appended; the `<table>_latest` view shows one row per key,
the newest version.

Every blocking client call runs on a worker thread: the event loop never waits on the network.
The client's errors are sorted into transient and permanent ones by `bigquery_fault`; only the
transient ones are retried here, and the caller's DurableWriter retries the whole write on top.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

import pyarrow as pa
from google.cloud import bigquery
from google.cloud.bigquery.retry import DEFAULT_RETRY

from ..config import BigQueryConfig
from ..errors import PermanentStoreError, StoreFault, UsageError
from ..models import BASE_COLUMNS, CandleBatch, Column, JobKey
from ..observability.events import EventLog
from ..retry import RetryPolicy
from .bigquery_client import connect
from .bigquery_errors import bigquery_fault, lost_creation_race, retry_sorted
from .bigquery_legacy import InsertAllWriter, LegacyContext, LoadJobWriter
from .bigquery_schema import (
    TableNames,
    check_types,
    conform,
    latest_view_sql,
    layout_differences,
    missing_fields,
    newest_query,
    read_query,
    schema_fields,
    series_query,
)
from .bigquery_streams import CommittedStreamWriter, PendingStreamWriter, StreamContext
from .bigquery_write_api import WriteApi, connect_write_api
from .reads import READ_CHUNK_ROWS, CandleQuery, utc_timestamps
from .write_streams import MemoryStreamState, WriteStreamState

# committed/pending: the Storage Write API (live/history); stream/load: the legacy fallback.
WriteMode = Literal["committed", "pending", "stream", "load"]
CLUSTERING = ("exchange", "symbol", "timeframe")
_REQUEST_TIMEOUT_S = 60.0
_QUERY_RESULT_TIMEOUT_S = 900.0
# Opening the store at start: the client's own retries, but for a minute rather than its default
# ten (an unreachable endpoint kept a collector silent for 9 minutes before `startup_failed`).
_ENSURE_RETRY = DEFAULT_RETRY.with_timeout(60.0)
# Retries inside one write; the caller's DurableWriter retries the whole write on top.
_WRITE_RETRY = RetryPolicy(base_s=0.5, cap_s=8.0, attempts=4)

T = TypeVar("T")


# Tries of the ensure step while other instances create the same dataset, table and view.
ENSURE_ATTEMPTS = 8


class RowWriter(Protocol):
    """One way of making a conformed write durable (see `bigquery_streams`, `bigquery_legacy`):
    `open` settles what a stopped run left, after the table is ensured; `write` returns once
    the rows are durable; `close` finishes what is buffered."""

    pipeline_pages: int

    async def open(self) -> None: ...

    async def write(self, batch: CandleBatch, table: pa.Table) -> None: ...

    async def close(self) -> None: ...


class BigQueryStore:
    """A `CandleStore` on a BigQuery table, partitioned by day (or month) and clustered by key.

    `mode` picks the writer: "committed" (live, exactly once per append, offsets in `state`
    under `owner`), "pending" (history, one pending stream per `flush_rows` rows or
    `flush_seconds`, committed atomically), or the legacy "stream" (insertAll) and "load"
    (load jobs, buffered the same way). `writer` exposes its counters for tests and metrics.
    """

    name = "bigquery"

    def __init__(
        self,
        config: BigQueryConfig,
        events: EventLog,
        mode: WriteMode = "stream",
        extra_columns: tuple[Column, ...] = (),
        environ: Mapping[str, str] | None = None,
        *,
        partitioning: Literal["DAY", "MONTH"] = "DAY",
        flush_rows: int = 50_000,
        flush_seconds: float = 5.0,
        retry: RetryPolicy = _WRITE_RETRY,
        workers: int = 8,
        state: WriteStreamState | None = None,
        owner: str = "live",
    ) -> None:
        environ = environ or {}
        project = config.project or environ.get("GOOGLE_CLOUD_PROJECT")
        if not project:
            raise UsageError("storage.bigquery.project: not set and GOOGLE_CLOUD_PROJECT is empty")
        self._names = TableNames(project, config.dataset, config.table)
        self._config = config
        self._environ = environ
        self._events = events
        self._columns = (*BASE_COLUMNS, *extra_columns)
        check_types(self._columns)
        self._fields = schema_fields(self._columns)  # ensure() adopts the table's own modes
        self._partitioning = partitioning
        self._retry = retry
        self._rng = random.Random()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bigquery")
        self._client_lock = threading.Lock()
        self._client_instance: bigquery.Client | None = None
        self._write_api: WriteApi | None = None
        self._uses_write_api = mode in ("committed", "pending")
        state = state or MemoryStreamState()
        self.writer = self._writer(mode, state, owner, flush_rows, flush_seconds)
        self.pipeline_pages = self.writer.pipeline_pages
        self._closed = False

    def _writer(
        self,
        mode: WriteMode,
        state: WriteStreamState,
        owner: str,
        flush_rows: int,
        flush_seconds: float,
    ) -> RowWriter:
        if mode in ("committed", "pending"):
            streams = StreamContext(
                self._api, self._run, state, self._events, self._retry, self._rng
            )
            if mode == "committed":
                return CommittedStreamWriter(streams, f"{self._names.table_id}:{owner}")
            return PendingStreamWriter(streams, flush_rows, flush_seconds)
        legacy = LegacyContext(
            self._client, self._names, lambda: self._fields, self._run, self._retried, self._events
        )
        if mode == "stream":
            return InsertAllWriter(legacy)
        if mode == "load":
            return LoadJobWriter(legacy, self._partitioning, flush_rows, flush_seconds)
        raise ValueError(f"BigQuery store: unknown write mode {mode!r}")

    def _api(self) -> WriteApi:
        if self._write_api is None:
            raise RuntimeError("BigQuery store written to before ensure()")
        return self._write_api

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _client(self) -> bigquery.Client:
        # Created on first use, on a worker thread: finding credentials may touch the network.
        with self._client_lock:
            if self._client_instance is None:
                self._client_instance = connect(self._config, self._names.project, self._environ)
            return self._client_instance

    async def _retried(self, doing: str, call: Callable[[], Awaitable[None]]) -> None:
        await retry_sorted(doing, call, self._retry, self._events, self._rng)

    # --- ensure -------------------------------------------------------------------------

    def _ensure(self) -> tuple[list[str], list[str]]:
        client = self._client()
        dataset = bigquery.Dataset(self._names.dataset_id)
        dataset.location = self._config.location
        client.create_dataset(dataset, exists_ok=True, retry=_ENSURE_RETRY)
        wanted = bigquery.Table(self._names.table_id, schema=self._fields)
        wanted.time_partitioning = bigquery.TimePartitioning(
            type_=self._partitioning, field="timestamp"
        )
        wanted.clustering_fields = list(CLUSTERING)
        # The existing table if there is one.
        table = client.create_table(wanted, exists_ok=True, retry=_ENSURE_RETRY)
        added = missing_fields(table.schema, self._columns)
        if added:
            table.schema = [*table.schema, *added]
            table = client.update_table(table, ["schema"], retry=_ENSURE_RETRY)
        by_name = {f.name.lower(): f for f in table.schema}
        self._fields = [by_name[c.name.lower()] for c in self._columns]
        client.query(latest_view_sql(self._names), retry=_ENSURE_RETRY).result(retry=_ENSURE_RETRY)
        if self._uses_write_api and self._write_api is None:
            schema = conform(pa.table({}), self._fields).schema  # the table's own modes
            write_client = connect_write_api(self._config, self._environ)
            self._write_api = WriteApi(write_client, self._names, schema)
        return [f.name for f in added], layout_differences(table, self._partitioning, CLUSTERING)

    async def _ensure_racing(self) -> tuple[list[str], list[str]]:
        """`_ensure`, again after losing a creation race to another instance (a short random
        wait apart, so racers fall out of step), up to ENSURE_ATTEMPTS times."""
        for attempt in range(1, ENSURE_ATTEMPTS + 1):
            try:
                return await self._run(self._ensure)
            except Exception as exc:
                if attempt < ENSURE_ATTEMPTS and lost_creation_race(exc):
                    await asyncio.sleep(self._rng.uniform(0.05, 0.3 * attempt))
                    continue
                failed = bigquery_fault(exc, f"ensuring BigQuery table {self._names.table_id}")
                if failed is None:
                    raise
                raise failed from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def ensure(self) -> None:
        """Create the dataset, table and view if missing; add missing NULLABLE columns to an
        existing table and leave everything else as it is (differences are reported). A table
        that cannot be reached or made raises a one-line StoreFault (see `bigquery_fault`)."""
        added, differences = await self._ensure_racing()
        if differences:
            self._events.warning(
                "store_ensure_table",
                f"table {self._names.table_id} is laid out differently than this collector "
                f"would create it; left unchanged: {'; '.join(differences)}",
                table=self._names.table_id,
                status="layout_differs",
            )
        self._events.info(
            "store_ensure_table",
            f"table {self._names.table_id} and view {self._names.view_id} ready",
            table=self._names.table_id,
            added_columns=added or None,
        )
        await self.writer.open()

    # --- writes ---------------------------------------------------------------------------

    async def write(self, batch: CandleBatch) -> int:
        """Rows written; returns once they are durable. Raises PermanentStoreError for columns
        the store does not know (nothing stored) and for rows BigQuery rejected (named),
        TransientStoreError when it kept failing transiently; see `bigquery_fault` for the
        rest."""
        if not len(batch):
            return 0
        known = {c.name for c in self._columns}
        unknown = sorted(set(batch.extra) - known)
        if unknown:
            raise PermanentStoreError(f"columns {unknown} are not in the store's schema")
        table = conform(batch.to_arrow(datetime.now(UTC)), self._fields)
        await self.writer.write(batch, table)
        return len(batch)

    # --- reads and shutdown ------------------------------------------------------------------

    async def newest(self, keys: list[JobKey], closed_only: bool = True) -> dict[JobKey, int]:
        """Newest stored candle open time (epoch ms) per key; keys with no rows are absent."""
        if not keys:
            return {}
        return await self._run(self._newest, list(dict.fromkeys(keys)), closed_only)

    def _newest(self, keys: list[JobKey], closed_only: bool) -> dict[JobKey, int]:
        sql, config = newest_query(self._names, keys, closed_only)
        rows = self._client().query(sql, job_config=config).result()
        return {
            JobKey(r["exchange"], r["symbol"], r["timeframe"]): int(r["newest_ms"]) for r in rows
        }

    async def series(self, key: JobKey) -> CandleBatch:
        """Stored closed candles of one series, oldest first, with the extra columns
        (indicators, NULL as NaN) in `extra`: for recomputing and comparing indicators."""
        return await self._run(self._series, key)

    def _series(self, key: JobKey) -> CandleBatch:
        sql, config = series_query(self._names, key, self._columns[len(BASE_COLUMNS) :])
        table = self._client().query(sql, job_config=config).to_arrow(create_bqstorage_client=False)
        return CandleBatch.closed_from_arrow(key, table)

    def _start_read(self, query: CandleQuery) -> Iterator[pa.RecordBatch]:
        sql, config = read_query(self._names, query)
        job = self._client().query(sql, job_config=config, timeout=_REQUEST_TIMEOUT_S)
        # Result pages over the REST API (tabledata.list), READ_CHUNK_ROWS rows a request.
        rows = job.result(page_size=READ_CHUNK_ROWS, timeout=_QUERY_RESULT_TIMEOUT_S)
        return iter(rows.to_arrow_iterable())

    @staticmethod
    def _next_page(pages: Iterator[pa.RecordBatch]) -> pa.RecordBatch | None:
        return next(pages, None)

    async def read(self, query: CandleQuery) -> AsyncGenerator[pa.Table, None]:
        """The query's rows from the `_latest` view, every column, oldest first: one
        parameterised query, its result fetched a page at a time on a worker thread. A failure
        raises TransientStoreError or PermanentStoreError (see `bigquery_fault`)."""
        doing = f"reading {self._names.view_id}"
        yielded = False
        try:
            pages = await self._run(self._start_read, query)
            while (page := await self._run(self._next_page, pages)) is not None:
                if page.num_rows:
                    yielded = True
                    yield utc_timestamps(pa.Table.from_batches([page]))
        except StoreFault:
            raise
        except Exception as exc:
            failed = bigquery_fault(exc, doing)
            if failed is None:
                raise
            raise failed from exc
        if not yielded:  # nothing stored in the range: the columns still tell what would be
            yield utc_timestamps(conform(pa.table({}), self._fields))

    def _close_client(self) -> None:
        if self._client_instance is not None:
            self._client_instance.close()  # type: ignore[no-untyped-call]
            self._client_instance = None
        if self._write_api is not None:
            self._write_api.close()
            self._write_api = None

    async def close(self) -> None:
        """Finish what is buffered (a commit or load job), wait for it, then release the
        clients. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.writer.close()
        finally:
            await self._run(self._close_client)
            self._executor.shutdown(wait=False)
