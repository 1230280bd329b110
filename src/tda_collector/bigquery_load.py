"""Batching for BigQuery load jobs: many history writes, one job.

BigQuery allows 1,500 load jobs per table per day and 4,000 partitions touched per job, so
writes are gathered until enough rows are waiting, a little time has passed, or one more write
would touch too many partitions. Each writer waits for the job that carried its rows, so
`write` still returns only once its rows are durable.
https://cloud.google.com/bigquery/quotas#load_jobs
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreFault

MAX_PARTITIONS_PER_JOB = 4_000


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue()


class LoadBuffer:
    """Writes waiting for one load job. A flush happens at `max_rows` rows, `max_wait_s` after
    the first buffered write, before a write that would take the job past `max_partitions`,
    and on `close`. `load` runs the job for a flush's tables and raises if it failed.
    Writes whose writer was cancelled before the flush are left out."""

    def __init__(
        self,
        load: Callable[[list[pa.Table]], Awaitable[None]],
        max_rows: int,
        max_wait_s: float,
        max_partitions: int = MAX_PARTITIONS_PER_JOB,
    ) -> None:
        self._load = load
        self._max_rows = max_rows
        self._max_wait_s = max_wait_s
        self._max_partitions = max_partitions
        self._pages: list[tuple[pa.Table, asyncio.Future[None]]] = []
        self._rows = 0
        self._partitions: set[object] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def add(self, table: pa.Table, partitions: set[object]) -> None:
        """Returns when the load job holding `table` succeeded; raises StoreFault if it failed."""
        loop = asyncio.get_running_loop()
        if self._pages and len(self._partitions | partitions) > self._max_partitions:
            self._flush()
        future: asyncio.Future[None] = loop.create_future()
        self._pages.append((table, future))
        self._rows += table.num_rows
        self._partitions |= partitions
        if self._rows >= self._max_rows:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_wait_s, self._flush)
        await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pages, self._pages, self._rows, self._partitions = self._pages, [], 0, set()
        # A cancelled writer (shutdown) moved no cursor: its rows will be fetched again.
        pages = [(table, future) for table, future in pages if not future.done()]
        if pages:
            task = asyncio.get_running_loop().create_task(self._settle(pages))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _settle(self, pages: list[tuple[pa.Table, asyncio.Future[None]]]) -> None:
        try:
            await self._load([table for table, _ in pages])
            error = None
        except Exception as exc:  # every writer of this job must hear of it
            error = exc
        for _, future in pages:
            if future.done():  # its writer was cancelled during the job
                continue
            if error is None:
                future.set_result(None)
            else:
                fault = StoreFault(str(error))
                fault.__cause__ = error
                future.set_exception(fault)

    async def close(self) -> None:
        """Flush what is buffered and wait for every job in flight."""
        self._flush()
        while self._flushes:
            # Remove them here: on Python >= 3.12 gathering finished tasks never yields to the
            # loop, so their done-callbacks would not run before the next check.
            finished = list(self._flushes)
            await asyncio.gather(*finished)
            self._flushes.difference_update(finished)
