"""The BigQuery store's legacy paths, kept as an explicit fallback: streaming inserts
(insertAll, live) and batched load jobs (history).

Why they stay: the Storage Write API speaks gRPC over HTTP/2, which some egress proxies and
networks refuse; there `storage.bigquery.write_path: legacy` still stores every row (the
`_latest` view hides insertAll's best-effort duplicates). Their costs (README): insertAll is
billed per 200 MiB with a 1 KB minimum per row; load jobs are free but limited to 1,500 per
table per day, failed ones included, so pages are buffered and loaded together.
"""

from __future__ import annotations

import io
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyarrow as pa
from google.cloud import bigquery

from ..errors import PermanentStoreError, TransientStoreError
from ..models import CandleBatch
from ..observability.events import EventLog
from .bigquery_load import MAX_PARTITIONS_PER_JOB, parquet_bytes
from .bigquery_schema import RowErrors, TableNames, chunks, partition_ids, stream_rows
from .write_buffer import WriteBuffer

_REQUEST_TIMEOUT_S = 60.0
_LOAD_JOB_TIMEOUT_S = 900.0
Retried = Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]
Run = Callable[..., Awaitable[Any]]


class LegacyContext:
    """What both legacy paths share: the REST client, names, schema, retries, a runner."""

    def __init__(
        self,
        client: Callable[[], bigquery.Client],
        names: TableNames,
        fields: Callable[[], list[bigquery.SchemaField]],
        run: Run,
        retried: Retried,
        events: EventLog,
    ) -> None:
        self.client = client
        self.names = names
        self.fields = fields
        self.run = run
        self.retried = retried
        self.events = events


class InsertAllWriter:
    """Live fallback: each write streamed at once (insertAll), rows with a row id each."""

    pipeline_pages = 1

    def __init__(self, context: LegacyContext) -> None:
        self._ctx = context
        self.insert_requests = 0

    async def open(self) -> None:
        """Nothing to settle."""

    async def close(self) -> None:
        """Nothing buffered."""

    async def write(self, batch: CandleBatch, table: pa.Table) -> None:
        rows, ids = stream_rows(table)
        rejected: dict[str, str] = {}
        for chunk_rows, chunk_ids in chunks(rows, ids):
            rejected.update(await self._insert_chunk(chunk_rows, chunk_ids))
        if rejected:
            reasons = sorted(set(rejected.values()))
            self._ctx.events.error(
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
            errors = await self._ctx.run(
                self._insert, [rows[i] for i in pending], [ids[i] for i in pending]
            )
            triage = RowErrors.of(errors)
            rejected.update({ids[pending[i]]: why for i, why in triage.rejected.items()})
            pending = [pending[i] for i in triage.retry]
            if pending:
                raise TransientStoreError(
                    f"streaming insert failed: {len(pending)} rows failed transiently: {errors[0]}"
                )

        await self._ctx.retried("streaming insert", insert_pending)
        return rejected

    def _insert(self, rows: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
        # retry=None: transient failures are retried above, together with per-row errors.
        errors = self._ctx.client().insert_rows_json(
            self._ctx.names.table_id,
            rows,
            row_ids=ids,
            retry=None,  # type: ignore[arg-type]  # the client accepts None: no retries of its own
            timeout=_REQUEST_TIMEOUT_S,
        )
        return list(errors)


class LoadJobWriter:
    """History fallback: writes buffered into one load job per `flush_rows` rows or
    `flush_seconds` after the first buffered write (see `WriteBuffer`)."""

    pipeline_pages = 16  # load jobs take seconds: pages of a job waiting for the same one

    def __init__(
        self, context: LegacyContext, partitioning: str, flush_rows: int, flush_seconds: float
    ) -> None:
        self._ctx = context
        self._partitioning = partitioning
        self._buffer = WriteBuffer(
            self._load_pages, len, flush_rows, flush_seconds, MAX_PARTITIONS_PER_JOB
        )
        self.load_jobs = 0

    async def open(self) -> None:
        """Nothing to settle."""

    async def write(self, batch: CandleBatch, table: pa.Table) -> None:
        await self._buffer.add(table, partition_ids(batch.timestamps, self._partitioning))

    async def close(self) -> None:
        """Load what is buffered and wait for it."""
        await self._buffer.close()

    async def _load_pages(self, tables: list[pa.Table]) -> list[None]:
        """One load job (Parquet, WRITE_APPEND: all rows or none) for the buffered pages;
        raises the job's last error if it failed."""
        table = pa.concat_tables(tables)
        data = await self._ctx.run(parquet_bytes, table)
        started = time.monotonic()

        async def load() -> None:
            self.load_jobs += 1
            await self._ctx.run(self._load, data)

        try:
            await self._ctx.retried("load job", load)
        except Exception as exc:
            self._ctx.events.error(
                "store_write_error",
                f"load job of {table.num_rows} rows into {self._ctx.names.table_id} failed",
                rows=table.num_rows,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            raise
        self._ctx.events.debug(
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
            schema=self._ctx.fields(),
        )
        job = self._ctx.client().load_table_from_file(
            io.BytesIO(data),
            self._ctx.names.table_id,
            size=len(data),  # a known size lets small files go in one multipart request
            job_config=config,
            num_retries=0,  # retried above as a whole job
            timeout=_REQUEST_TIMEOUT_S,
        )
        # A job that times out here is submitted again; should both land, the rows are
        # duplicates of one version and the view still shows one row per key.
        job.result(timeout=_LOAD_JOB_TIMEOUT_S)
