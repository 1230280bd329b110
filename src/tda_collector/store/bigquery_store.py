"""The cloud store: BigQuery, fed by streaming inserts (live) or batched load jobs (history).

Live mode writes a few rows per series each cycle: they are streamed (insertAll) and queryable
at once. History mode writes thousands of pages, and a load job per page would exhaust the
1,500 load jobs per table per day, so pages are buffered and loaded together. Rows are only
appended; the `<table>_latest` view shows one row per key, the newest version.

Every blocking client call runs on a worker thread: the event loop never waits on the network.
The client's errors are sorted into transient and permanent ones by `bigquery_fault`; only the
transient ones are retried here, and the caller's DurableWriter retries the whole write on top.
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import pyarrow as pa
from google.cloud import bigquery

from ..config import BigQueryConfig
from ..errors import PermanentStoreError, StoreFault, TransientStoreError, UsageError
from ..models import BASE_COLUMNS, CandleBatch, Column, JobKey
from ..observability.events import EventLog
from ..retry import Failure, RetryPolicy, retry_async
from .bigquery_client import connect
from .bigquery_errors import bigquery_fault, lost_creation_race
from .bigquery_load import MAX_PARTITIONS_PER_JOB, parquet_bytes
from .bigquery_schema import (
    RowErrors,
    TableNames,
    check_types,
    chunks,
    conform,
    latest_view_sql,
    layout_differences,
    missing_fields,
    newest_query,
    partition_ids,
    schema_fields,
    series_query,
    stream_rows,
)
from .write_buffer import WriteBuffer

WriteMode = Literal["stream", "load"]
CLUSTERING = ("exchange", "symbol", "timeframe")
_REQUEST_TIMEOUT_S = 60.0
_LOAD_JOB_TIMEOUT_S = 900.0
# Retries inside one write; the caller's DurableWriter retries the whole write on top.
_WRITE_RETRY = RetryPolicy(base_s=0.5, cap_s=8.0, attempts=4)

T = TypeVar("T")


# Tries of the ensure step while other instances create the same dataset, table and view.
ENSURE_ATTEMPTS = 8

# Load mode: pages of one history job that may wait for the same load job, so that jobs keep
# fetching while a batch loads. Memory: concurrency x this x page size.
PIPELINE_PAGES = 16


class BigQueryStore:
    """A `CandleStore` on a BigQuery table, partitioned by day (or month) and clustered by key.

    `mode="stream"` inserts each write at once; `mode="load"` buffers writes into one load job
    per `flush_rows` rows or `flush_seconds` after the first buffered write (see `WriteBuffer`),
    and each `write` returns when the job that carried its rows has succeeded.
    `load_jobs` and `insert_requests` count what was sent, for tests and metrics.
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
    ) -> None:
        if mode not in ("stream", "load"):
            raise ValueError(f"BigQuery store: unknown write mode {mode!r}")
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
        self._buffer = (
            WriteBuffer(self._load_pages, len, flush_rows, flush_seconds, MAX_PARTITIONS_PER_JOB)
            if mode == "load"
            else None
        )
        self._closed = False
        self.pipeline_pages = PIPELINE_PAGES if mode == "load" else 1
        self.load_jobs = 0
        self.insert_requests = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _client(self) -> bigquery.Client:
        # Created on first use, on a worker thread: finding credentials may touch the network.
        with self._client_lock:
            if self._client_instance is None:
                self._client_instance = connect(self._config, self._names.project, self._environ)
            return self._client_instance

    async def _retried(self, doing: str, call: Callable[[], Awaitable[None]]) -> None:
        """`await call()` with the client's errors sorted by `bigquery_fault`: a transient one
        is retried as the policy says, a permanent one raised at once, the last one raised."""

        async def sorted_call() -> None:
            try:
                await call()
            except StoreFault:
                raise
            except Exception as exc:
                failed = bigquery_fault(exc, doing)
                if failed is None:
                    raise
                raise failed from exc

        def log(failure: Failure) -> None:
            if not failure.gives_up:
                self._events.warning(
                    "backoff_retry",
                    f"{doing} failed, retrying",
                    attempt=failure.attempt,
                    error=f"{type(failure.error).__name__}: {failure.error}"[:500],
                )

        await retry_async(
            sorted_call,
            self._retry,
            transient=(TransientStoreError,),
            on_failure=log,
            rng=self._rng,
        )

    # --- ensure -------------------------------------------------------------------------

    def _ensure(self) -> tuple[list[str], list[str]]:
        client = self._client()
        dataset = bigquery.Dataset(self._names.dataset_id)
        dataset.location = self._config.location
        client.create_dataset(dataset, exists_ok=True)
        wanted = bigquery.Table(self._names.table_id, schema=self._fields)
        wanted.time_partitioning = bigquery.TimePartitioning(
            type_=self._partitioning, field="timestamp"
        )
        wanted.clustering_fields = list(CLUSTERING)
        table = client.create_table(wanted, exists_ok=True)  # the existing table if there is one
        added = missing_fields(table.schema, self._columns)
        if added:
            table.schema = [*table.schema, *added]
            table = client.update_table(table, ["schema"])
        by_name = {f.name.lower(): f for f in table.schema}
        self._fields = [by_name[c.name.lower()] for c in self._columns]
        client.query(latest_view_sql(self._names)).result()
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

    # --- writes ---------------------------------------------------------------------------

    async def write(self, batch: CandleBatch) -> int:
        """Rows written; returns once they are durable. Raises PermanentStoreError for columns
        the store does not know (nothing stored) and for rows BigQuery rejected (a streaming
        insert keeps the rows it accepted), TransientStoreError when it kept failing
        transiently; see `bigquery_fault` for the rest."""
        if not len(batch):
            return 0
        known = {c.name for c in self._columns}
        unknown = sorted(set(batch.extra) - known)
        if unknown:
            raise PermanentStoreError(f"columns {unknown} are not in the store's schema")
        table = conform(batch.to_arrow(datetime.now(UTC)), self._fields)
        if self._buffer is not None:
            await self._buffer.add(table, partition_ids(batch.timestamps, self._partitioning))
        else:
            await self._stream(batch, table)
        return len(batch)

    async def _stream(self, batch: CandleBatch, table: pa.Table) -> None:
        rows, ids = stream_rows(table)
        rejected: dict[str, str] = {}
        for chunk_rows, chunk_ids in chunks(rows, ids):
            rejected.update(await self._insert_chunk(chunk_rows, chunk_ids))
        if rejected:
            reasons = sorted(set(rejected.values()))
            self._events.error(
                "store_write_error",
                f"BigQuery rejected {len(rejected)} of {len(rows)} rows",
                exchange=batch.key.exchange,
                symbol=batch.key.symbol,
                timeframe=batch.key.timeframe,
                rows=len(rejected),
                error="; ".join(reasons)[:500],
            )
            raise PermanentStoreError(f"BigQuery rejected {len(rejected)} rows: {reasons[0]}")

    async def _insert_chunk(self, rows: list[dict[str, Any]], ids: list[str]) -> dict[str, str]:
        """Insert one request's rows, sending rows with transient errors again (same ids);
        returns the rejected rows (row id -> reason)."""
        pending = list(range(len(rows)))
        rejected: dict[str, str] = {}

        async def insert_pending() -> None:
            nonlocal pending
            self.insert_requests += 1
            errors = await self._run(
                self._insert, [rows[i] for i in pending], [ids[i] for i in pending]
            )
            triage = RowErrors.of(errors)
            rejected.update({ids[pending[i]]: why for i, why in triage.rejected.items()})
            pending = [pending[i] for i in triage.retry]
            if pending:
                raise TransientStoreError(
                    f"streaming insert failed: {len(pending)} rows failed transiently: {errors[0]}"
                )

        await self._retried("streaming insert", insert_pending)
        return rejected

    def _insert(self, rows: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
        # retry=None: transient failures are retried above, together with per-row errors.
        errors = self._client().insert_rows_json(
            self._names.table_id,
            rows,
            row_ids=ids,
            retry=None,  # type: ignore[arg-type]  # the client accepts None: no retries of its own
            timeout=_REQUEST_TIMEOUT_S,
        )
        return list(errors)

    async def _load_pages(self, tables: list[pa.Table]) -> list[None]:
        """One load job (Parquet, WRITE_APPEND: all rows or none) for the buffered pages;
        raises the job's last error (see `_retried`) if it failed."""
        table = pa.concat_tables(tables)
        data = await self._run(parquet_bytes, table)
        started = time.monotonic()

        async def load() -> None:
            self.load_jobs += 1
            await self._run(self._load, data)

        try:
            await self._retried("load job", load)
        except Exception as exc:
            self._events.error(
                "store_write_error",
                f"load job of {table.num_rows} rows into {self._names.table_id} failed",
                rows=table.num_rows,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            raise
        self._events.debug(
            "store_load_job",
            f"loaded {table.num_rows} rows from {len(tables)} writes",
            rows=table.num_rows,
            duration_ms=round((time.monotonic() - started) * 1000),
        )
        return [None] * len(tables)

    def _load(self, data: bytes) -> None:
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
            create_disposition=bigquery.CreateDisposition.CREATE_NEVER,
            # The table's schema, or BigQuery reads REQUIRED columns as NULLABLE and refuses
            # the append (googleapis/python-bigquery#1981).
            schema=self._fields,
        )
        job = self._client().load_table_from_file(
            io.BytesIO(data),
            self._names.table_id,
            size=len(data),  # a known size lets small files go in one multipart request
            job_config=config,
            num_retries=0,  # retried above as a whole job
            timeout=_REQUEST_TIMEOUT_S,
        )
        # A job that times out here is submitted again; should both land, the rows are
        # duplicates of one version and the view still shows one row per key.
        job.result(timeout=_LOAD_JOB_TIMEOUT_S)

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
        """Stored closed candles of one series, oldest first (for recomputing indicators)."""
        return await self._run(self._series, key)

    def _series(self, key: JobKey) -> CandleBatch:
        sql, config = series_query(self._names, key)
        table = self._client().query(sql, job_config=config).to_arrow(create_bqstorage_client=False)
        return CandleBatch.closed_from_arrow(key, table)

    def _close_client(self) -> None:
        if self._client_instance is not None:
            self._client_instance.close()  # type: ignore[no-untyped-call]
            self._client_instance = None

    async def close(self) -> None:
        """Load what is buffered, wait for it, then release the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._buffer is not None:
                await self._buffer.close()
        finally:
            await self._run(self._close_client)
            self._executor.shutdown(wait=False)
